"""orthanc.config_file: Orthanc's JSON with comments supplies what the broker's own config
does not set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker.config import load_config
from broker.errors import ConfigError
from broker.orthanc.config_file import apply_orthanc_config, read_orthanc_config, strip_comments
from tests.e2e.broker_process import REPO

ORTHANC_JSON = """{
  /* The old companion worklist server read these two keys. */
  "Name" : "PACS // not a comment",   // a comment after a string holding //
  "MPPSAet" : "WORKLISTS2",
  "DicomPortMPPS" : 5300,
  "HttpPort" : 8043,   /* a block
                          over two lines */
  "Comment" : "a \\"quoted /* */\\" text",
  "RegisteredUsers" : { "alice" : "s3cret" }
}
"""


def _config(tmp_path: Path, broker: dict, environ: dict | None = None,
            orthanc_json: str = ORTHANC_JSON):
    (tmp_path / "orthanc.json").write_text(orthanc_json)
    (tmp_path / "mapping.yaml").write_text((REPO / "config" / "mapping.yaml").read_text())
    broker = {**broker, "orthanc": {"config_file": "orthanc.json", **broker.get("orthanc", {})}}
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump(broker))
    return apply_orthanc_config(load_config(tmp_path / "broker.yaml", environ or {}))


def test_comments_go_and_strings_stay():
    parsed = json.loads(strip_comments(ORTHANC_JSON))
    assert parsed["Name"] == "PACS // not a comment"
    assert parsed["Comment"] == 'a "quoted /* */" text'
    assert parsed["HttpPort"] == 8043


def test_the_keys_of_the_old_server_and_the_rest_link_unless_set(tmp_path):
    # As the shipped broker.yaml documents them: empty orthanc keys are not values.
    config = _config(tmp_path, {"orthanc": {"url": None, "username": None, "password": None}})
    assert (config.dicom.ae_title, config.dicom.port) == ("WORKLISTS2", 5300)
    assert config.orthanc.url == "http://127.0.0.1:8043"
    assert (config.orthanc.username, config.orthanc.password) == ("alice", "s3cret")

    explicit = _config(tmp_path, {"dicom": {"ae_title": "WORKLISTS", "port": 5243},
                                  "orthanc": {"url": "http://pacs:8042", "username": "bob"}})
    assert (explicit.dicom.ae_title, explicit.dicom.port) == ("WORKLISTS", 5243)
    assert (explicit.orthanc.url, explicit.orthanc.username) == ("http://pacs:8042", "bob")
    # A key set to its default value is still set: the environment counts as well.
    from_env = _config(tmp_path, {}, {"WLB_DICOM_PORT": "5243"})
    assert (from_env.dicom.ae_title, from_env.dicom.port) == ("WORKLISTS2", 5243)


def test_debians_configuration_folder_is_read_as_orthanc_reads_it():
    folder = Path("/etc/orthanc")
    if not (folder / "orthanc.json").is_file():
        pytest.skip("the orthanc package is not installed")
    data = read_orthanc_config(folder)
    assert isinstance(data.get("HttpPort"), int) and "RegisteredUsers" in data


@pytest.mark.parametrize("text, expected", [
    ('{"MPPSAet": "X", }', "is not valid JSON"),
    ('{"DicomPortMPPS": "port"}', "DicomPortMPPS must be a port number"),
    ('{"MPPSAet": "A_TITLE_LONGER_THAN_16"}', "MPPSAet must be an AE title"),
    ('{/* never closed', "comment is never closed"),
])
def test_a_bad_file_is_one_clear_error(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        _config(tmp_path, {}, orthanc_json=text)


def test_an_unreadable_file_stops_the_command_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path / 'w.db'}"},
        "mapping": str(REPO / "config" / "mapping.yaml"),
        "orthanc": {"config_file": "missing/orthanc.json"}}))
    done = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--config",
                           str(tmp_path / "broker.yaml")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "orthanc.config_file: cannot read" in done.stderr and "missing" in done.stderr


def test_the_shipped_config_lets_orthanc_json_supply_the_keys(tmp_path):
    (tmp_path / "orthanc.json").write_text(ORTHANC_JSON)
    config = apply_orthanc_config(load_config(
        REPO / "config" / "broker.yaml",
        {"WLB_ORTHANC_CONFIG_FILE": str(tmp_path / "orthanc.json")}))
    assert (config.dicom.ae_title, config.dicom.port) == ("WORKLISTS2", 5300)
    assert (config.orthanc.url, config.orthanc.username) == ("http://127.0.0.1:8043", "alice")


def test_credentials_from_the_environment_stay_text(tmp_path):
    config = _config(tmp_path, {}, {"WLB_ORTHANC_PASSWORD": "0123", "WLB_ORTHANC_USERNAME": "7"})
    assert (config.orthanc.username, config.orthanc.password) == ("7", "0123")
    off = load_config(REPO / "config" / "broker.yaml", {"WLB_ORTHANC_URL": ""})
    assert off.orthanc.url is None
