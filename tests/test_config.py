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


def test_the_test_suites_own_variables_are_no_config_keys():
    # WLB_TEST_PG_URL is the tests' PostgreSQL; commands they run must not trip over it.
    config = load_config(REPO / "config" / "broker.yaml", environ={
        "WLB_TEST_PG_URL": "postgresql+psycopg://postgres@127.0.0.1:5999/test",
        "WLB_TEST_PG": "throwaway", "WLB_HL7_MAX_WAITING_CONNECTIONS": "10"})
    assert config.hl7.max_waiting_connections == 10
    assert config.database.url.startswith("sqlite:")


def test_mpps_forward_destinations_from_the_file_or_the_environment(tmp_path):
    assert load_config(REPO / "config" / "broker.yaml", environ={}).dicom.mpps_forward == []
    config = load_config(REPO / "config" / "broker.yaml", environ={
        "WLB_DICOM_MPPS_FORWARD": "[{ae_title: PACS, host: 10.0.0.5, port: 104}]",
        "WLB_DICOM_MPPS_FORWARD_MAX_ATTEMPTS": "3"})
    assert [d.key for d in config.dicom.mpps_forward] == ["PACS@10.0.0.5:104"]
    assert config.dicom.mpps_forward_max_attempts == 3
    (tmp_path / "mapping.yaml").write_text((REPO / "config" / "mapping.yaml").read_text())
    path = tmp_path / "broker.yaml"
    path.write_text("dicom:\n  mpps_forward:\n    - {ae_title: PACS, host: pacs, port: 104}\n"
                    "    - {ae_title: ARCHIVE, host: archive, port: 11112}\n")
    assert [d.ae_title for d in load_config(path, environ={}).dicom.mpps_forward] == [
        "PACS", "ARCHIVE"]


@pytest.mark.parametrize(("yaml_text", "environ", "message"), [
    ("dicom: {port: abc}\n", {}, "dicom.port: Input should be a valid integer"),
    ("dicom: {portt: 1}\n", {}, "dicom.portt: unknown key"),
    ("jobs: {purge_cron: 'every day'}\n", {}, "jobs.purge_cron"),
    ("mapping: missing.yaml\n", {}, "mapping: cannot read mapping file"),
    ("{}\n", {"WLB_DICOM_PROT": "1"}, "WLB_DICOM_PROT names no config key"),
    ("dicom: [1\n", {}, "not valid YAML"),
    ("dicom: {mpps_forward: [{ae_title: PACS, host: h}]}\n", {},
     "dicom.mpps_forward.0.port: Field required"),
    ("dicom: {mpps_forward: [{ae_title: PACS, host: h, port: 104, aet: X}]}\n", {},
     "dicom.mpps_forward.0.aet: unknown key"),
    ("dicom: {mpps_forward: [{ae_title: PACS, host: h, port: 104}, "
     "{ae_title: PACS, host: h, port: 104}]}\n", {}, "destination listed twice: PACS@h:104"),
    ("web: {users: [{name: a, password_hash: 'my-password'}]}\n", {},
     "web.users.0.password_hash: String should match pattern"),
])
def test_invalid_config_names_the_key(tmp_path, yaml_text, environ, message):
    (tmp_path / "mapping.yaml").write_text((REPO / "config" / "mapping.yaml").read_text())
    path = tmp_path / "broker.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ=environ)
    assert "\n" not in str(info.value)
