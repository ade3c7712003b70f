from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_with_documented_defaults():
    config = load_config(REPO / "config" / "broker.yaml", environ={})
    assert (config.dicom.ae_title, config.dicom.port, config.hl7.port) == ("WORKLISTS", 5243, 2575)
    assert config.ris.enabled is False
    assert config.jobs.purge_cron == "0 3 * * *"
    # Relative paths resolve against the config file's folder, not the working directory.
    assert config.database.url == f"sqlite:///{REPO / 'config' / 'data' / 'worklist.db'}"
    assert config.mapping == REPO / "config" / "mapping.yaml"


def test_environment_overrides_every_section():
    config = load_config(REPO / "config" / "broker.yaml", environ={
        "WLB_DICOM_PORT": "11112", "WLB_RIS_ENABLED": "true", "WLB_JOBS_RETENTION_DAYS": "7",
        "WLB_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/test",
        "WLB_RIS_HL7_VERSION": "2.5"})
    assert config.dicom.port == 11112 and config.ris.enabled is True
    assert config.jobs.retention_days == 7
    assert config.database.url.startswith("postgresql+psycopg://")
    assert config.ris.hl7_version == "2.5"


@pytest.mark.parametrize(("yaml_text", "environ", "message"), [
    ("dicom: {port: abc}\n", {}, "dicom.port: Input should be a valid integer"),
    ("dicom: {portt: 1}\n", {}, "dicom.portt: unknown key"),
    ("jobs: {purge_cron: 'every day'}\n", {}, "jobs.purge_cron"),
    ("mapping: missing.yaml\n", {}, "mapping: cannot read mapping file"),
    ("{}\n", {"WLB_DICOM_PROT": "1"}, "WLB_DICOM_PROT names no config key"),
    ("dicom: [1\n", {}, "not valid YAML"),
])
def test_invalid_config_names_the_key(tmp_path, yaml_text, environ, message):
    (tmp_path / "mapping.yaml").write_text((REPO / "config" / "mapping.yaml").read_text())
    path = tmp_path / "broker.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ=environ)
    assert "\n" not in str(info.value)
