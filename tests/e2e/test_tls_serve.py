"""``worklist-broker serve`` with TLS on every link, as a real process: an order over MLLP/TLS,
a C-FIND with findscu +tls, the status message to a TLS RIS; one-line start-up errors (exit 2);
certificates reloaded on SIGHUP."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import TlsListenerConfig
from broker.tls import server_context
from hl7_listener.mllp import MllpClient
from tests.dicom.scu import findscu
from tests.e2e.broker_process import REPO, start_broker, write_config
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import free_port, listening, wait_for
from tests.tls_certs import Pki, client_context, shared_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


def _listener_tls(port: int) -> dict[str, object]:
    # Relative paths: they resolve against the config file's folder.
    return {"port": port, "certificate": "certs/server.pem", "private_key": "certs/server.key",
            "ca_certificates": "certs/ca.pem", "require_client_certificate": True}


def _copy_certs(pki: Pki, directory: Path) -> Path:
    certs = directory / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki.directory / name, certs / name)
    return certs


def _peer_common_name(port: int, pki: Pki) -> str:
    context = client_context(pki)
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname="localhost") as tls):
        subject = dict(pair for rdn in tls.getpeercert()["subject"] for pair in rdn)
        return subject["commonName"]


def test_every_link_over_tls_and_a_reload_on_sighup(tmp_path: Path, pki: Pki) -> None:
    certs = _copy_certs(pki, tmp_path)
    ris = FakeRis(ssl_context=server_context(
        TlsListenerConfig(port=0, certificate=pki.cert("server"),
                          private_key=pki.key("server")), base_dir=REPO, where="ris"))
    dicom_tls, hl7_tls = free_port(), free_port()
    broker = start_broker(
        tmp_path, ris_port=ris.port,
        ris={"host": "localhost",
             "tls": {"enabled": True, "ca_certificates": "certs/ca.pem"}},
        dicom={"tls": _listener_tls(dicom_tls)},
        hl7={"tls": _listener_tls(hl7_tls)})
    try:
        wait_for(lambda: listening(dicom_tls) and listening(hl7_tls), what="the TLS ports")
        context = client_context(pki)
        with MllpClient("127.0.0.1", hl7_tls, tls=lambda: context,
                        server_name="localhost") as mllp:
            ack = mllp.send(orm(control_id="TLS-E2E", accession="ACC-TLS-1").encode()).decode()
        assert (field_of(ack, "MSA", 1), field_of(ack, "MSA", 2)) == ("AA", "TLS-E2E")
        rows = findscu(dicom_tls, "AccessionNumber=ACC-TLS-1", "StudyInstanceUID",
                       out_dir=tmp_path / "q", options=(
                           "+tls", str(pki.key("client")), str(pki.cert("client")),
                           "+cf", str(pki.ca)))
        assert [row.AccessionNumber for row in rows] == ["ACC-TLS-1"]
        # The administrator's send command speaks TLS too.
        message = tmp_path / "order.hl7"
        message.write_text(orm(control_id="TLS-SEND", accession="ACC-TLS-2"))
        send = [sys.executable, "-m", "broker.cli", "send", str(message), "--port",
                str(hl7_tls), "--tls", "--ca", str(pki.ca), "--timeout", "10"]
        sent = subprocess.run([*send, "--cert", str(pki.cert("client")), "--key",
                               str(pki.key("client"))],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "MSA|AA|TLS-SEND" in sent.stdout, sent.stderr
        refused = subprocess.run(send, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "cannot send" in refused.stderr  # no certificate
        missing = subprocess.run([*send, "--cert", "nope.pem", "--key", "nope.key"], cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2
        assert missing.stderr.strip() == (
            f"worklist-broker: config error: send.certificate: cannot read {REPO / 'nope.pem'}: "
            "No such file or directory")
        started = subprocess.run(
            [sys.executable, "-m", "broker.cli", "mpps", "in-progress", "--accession",
             "ACC-TLS-1", "--port", str(broker.dicom_port), "--modality", "CT"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        # The status message goes out over TLS, the RIS's certificate checked by name.
        message = ris.wait_for_messages(1)[0]
        assert field_of(message, "OBR", 18) == "ACC-TLS-1"
        assert ris.tls_failures == []

        # Renewed certificates: new connections get them after SIGHUP.
        assert _peer_common_name(hl7_tls, pki) == "localhost"
        shutil.copy(pki.cert("renewed"), certs / "server.pem")
        shutil.copy(pki.key("renewed"), certs / "server.key")
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: broker.log().count("TLS certificates of") >= 3,
                 what="the certificates to be reloaded")
        assert _peer_common_name(hl7_tls, pki) == "renewed.localhost"
        assert _peer_common_name(dicom_tls, pki) == "renewed.localhost"
        # A broken file on the next reload keeps the certificates in use.
        (certs / "server.key").write_text("not a key\n")
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "not reloaded, the previous ones stay in use" in broker.log(),
                 what="the refused reload")
        assert _peer_common_name(hl7_tls, pki) == "renewed.localhost"
    finally:
        assert broker.stop() == 0
        ris.close()
    log = broker.log()
    assert "Traceback" not in log
    assert "HL7 TLS connection from" in log


@pytest.mark.parametrize("breakage, message", [
    ("missing", r"hl7\.tls\.certificate: cannot read .*server\.pem: No such file"),
    ("mismatch", r"hl7\.tls\.private_key: .*server\.key does not match the certificate"),
    ("unreadable_ca", r"hl7\.tls\.ca_certificates: cannot load .*ca\.pem"),
])
def test_broken_certificate_files_stop_startup_with_one_line(tmp_path: Path, pki: Pki,
                                                             breakage: str,
                                                             message: str) -> None:
    import re

    certs = _copy_certs(pki, tmp_path)
    if breakage == "missing":
        (certs / "server.pem").unlink()
    elif breakage == "mismatch":
        shutil.copy(pki.key("client"), certs / "server.key")
    else:
        (certs / "ca.pem").write_text("garbage\n")
    path, dicom_port, hl7_port, _ = write_config(
        tmp_path, hl7={"tls": _listener_tls(free_port())})
    done = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr
    assert not (tmp_path / "worklist.db").exists()  # stopped before opening anything
    assert not listening(hl7_port) and not listening(dicom_port)


def test_the_console_over_https_with_client_certificates_and_a_reload(tmp_path: Path,
                                                                      pki: Pki) -> None:
    import httpx

    certs = _copy_certs(pki, tmp_path)
    https = free_port()
    broker = start_broker(tmp_path, web={"tls": {**_listener_tls(https), "plain_port": False}})
    try:
        wait_for(lambda: listening(https), what="the console's HTTPS port")
        import yaml

        plain = yaml.safe_load(broker.config_path.read_text())["web"]["port"]
        assert not listening(plain)  # plain_port: false
        with httpx.Client(verify=client_context(pki), timeout=10) as http:
            health = http.get(f"https://localhost:{https}/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert http.get(f"https://localhost:{https}/api/worklist").status_code == 200
        with (httpx.Client(verify=client_context(pki, client=None), timeout=10) as anonymous,
              pytest.raises(httpx.HTTPError)):
            anonymous.get(f"https://localhost:{https}/health")  # no client certificate
        assert _peer_common_name(https, pki) == "localhost"
        shutil.copy(pki.cert("renewed"), certs / "server.pem")
        shutil.copy(pki.key("renewed"), certs / "server.key")
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "TLS certificates of web.tls reloaded" in broker.log(),
                 what="the console's certificates to be reloaded")
        wait_for(lambda: _common_name_or_none(https, pki) == "renewed.localhost",
                 what="the HTTPS port to serve the renewed certificate")
    finally:
        assert broker.stop() == 0
    assert "Traceback" not in broker.log()
    assert f"https://127.0.0.1:{https}/" in broker.log()


def _common_name_or_none(port: int, pki: Pki) -> str | None:
    try:
        return _peer_common_name(port, pki)
    except OSError:
        return None  # the port is starting again on the new files
