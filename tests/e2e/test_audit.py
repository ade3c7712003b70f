"""The audit trail of the real ``serve`` process, on SQLite and PostgreSQL: an order over MLLP,
C-FINDs by DCMTK's findscu (one refused at association), MPPS by pynetdicom (the ``mpps``
command), the status messages the fake RIS ACKs, console logins over HTTP and an operator
action; then the database (``audit list``), the JSON lines file and a syslog collector that
is a real UDP socket must all tell who saw order ACC-AU-1, and the ordinary log must not."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.web.security import hash_password
from hl7_listener.mllp import MllpClient
from tests.dicom.scu import findscu
from tests.e2e.broker_process import BrokerProcess, start_broker
from tests.e2e.test_end_to_end import run_cli
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import dcmtk, fresh_pg_store, wait_for

DAY = "20261129"
PASSWORD = "correct horse battery"


# Once, on PostgreSQL (several brokers on one database): the SQL behind it runs on both
# backends in its unit tests, and this end-to-end run costs 14-18 s on a 2-core machine.
@pytest.fixture(params=["postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worklist.db'}"
        return
    with fresh_pg_store() as store:
        yield store.url


class Collector:
    """A syslog collector: a UDP socket on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []

    def drain(self) -> list[bytes]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536))
            except TimeoutError:
                return self.messages


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.sock.close()


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _activity(broker: BrokerProcess, ris: FakeRis, tmp_path: Path) -> None:
    with MllpClient("127.0.0.1", broker.hl7_port) as client:
        for control_id, accession in (("AU-1", "ACC-AU-1"), ("AU-2", "ACC-AU-2")):
            ack = client.send(orm(control_id=control_id, accession=accession, modality="CT",
                                  start=f"{DAY}093000").encode())
            assert field_of(ack.decode(), "MSA", 1) == "AA"
    rows = findscu(broker.dicom_port, "(0040,0100)[0].Modality=CT", "AccessionNumber",
                   "PatientName", out_dir=tmp_path / "q1", options=("-aet", "CT_ROOM1"))
    assert sorted(r.AccessionNumber for r in rows) == ["ACC-AU-1", "ACC-AU-2"]
    refused = subprocess.run([dcmtk("findscu"), "-W", "-to", "10", "-aet", "INTRUDER",
                              "-k", "AccessionNumber", "127.0.0.1", str(broker.dicom_port)],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    started = run_cli("mpps", "in-progress", "--accession", "ACC-AU-1", "--port",
                      str(broker.dicom_port), "--modality", "CT", "--calling-aet", "CT_ROOM1")
    assert started.returncode == 0, started.stderr
    ris.wait_for_messages(1)
    with httpx.Client(base_url=broker.url, timeout=10) as web:
        bad = web.post("/login", data={"name": "alice", "password": "wrong"})
        assert bad.status_code == 401
        good = web.post("/login", data={"name": "alice", "password": PASSWORD})
        assert good.status_code == 303
        deleted = web.delete("/worklists/ACC-AU-2", auth=("alice", PASSWORD))
        assert deleted.status_code == 200, deleted.text


def _audit_page(broker: BrokerProcess) -> None:
    """The console's audit page is for administrators; its JSON twin has the events."""
    with httpx.Client(base_url=broker.url, timeout=10) as web:
        assert web.post("/login", data={"name": "alice", "password": PASSWORD}
                        ).status_code == 303
        assert web.get("/audit").status_code == 403  # an operator
    with httpx.Client(base_url=broker.url, timeout=10) as web:
        assert web.post("/login", data={"name": "sec", "password": PASSWORD}
                        ).status_code == 303
        page = web.get("/audit", params={"accession": "ACC-AU-2"})
        assert page.status_code == 200 and "worklist-delete" in page.text
        data = web.get("/audit", params={"accession": "ACC-AU-2", "format": "json"}).json()
        # Newest first on the page.
        assert [e["kind"] for e in data["events"]] == [
            "operator-action", "c-find", "hl7-received"]
        assert web.get("/audit", params={"limit": "0"}).status_code == 400


def test_who_saw_an_order_is_in_the_database_the_file_and_syslog(
        tmp_path: Path, database_url: str, collector: Collector):
    ris = FakeRis()
    audit_file = tmp_path / "audit" / "audit.jsonl"
    broker = start_broker(
        tmp_path, database_url=database_url, ris_port=ris.port,
        dicom={"allowed_calling_ae_titles": ["CT_ROOM1"]},
        web={"users": [{"name": "alice", "role": "operator",
                        "password_hash": hash_password(PASSWORD)},
                       {"name": "sec", "role": "admin",
                        "password_hash": hash_password(PASSWORD)}]},
        sections={"audit": {"file": str(audit_file), "syslog_host": "127.0.0.1",
                            "syslog_port": collector.port, "syslog_protocol": "udp",
                            "flush_seconds": 0.1}})
    config = str(broker.config_path)
    try:
        _activity(broker, ris, tmp_path)
        wait_for(lambda: any(line["kind"] == "operator-action" for line in _lines(audit_file)),
                 timeout=15, what="the operator action's audit line")
        _audit_page(broker)
    finally:
        assert broker.stop() == 0
        ris.close()

    kinds = [(line["kind"], line["actor"], line["outcome"]) for line in _lines(audit_file)]
    assert ("hl7-received", "RIS^HOSP", "AA") in kinds, kinds
    assert ("association-accepted", "CT_ROOM1", "accepted") in kinds
    assert ("association-rejected", "INTRUDER", "rejected") in kinds
    assert ("c-find", "CT_ROOM1", "success") in kinds
    assert ("mpps-n-create", "CT_ROOM1", "success") in kinds
    assert any(k == "hl7-sent" and o == "AA" for k, _, o in kinds), kinds
    assert ("login-failed", "alice", "failed") in kinds
    assert ("login", "alice", "success") in kinds
    assert ("operator-action", "alice", "worklist-delete") in kinds
    received = next(line for line in _lines(audit_file) if line["kind"] == "hl7-received")
    assert received["control_id"] == "AU-1" and received["accessions"] == ["ACC-AU-1"]
    assert str(received["address"]).startswith("127.0.0.1:")
    assert received["tls_subject"] is None  # the plain port
    cfind = next(line for line in _lines(audit_file) if line["kind"] == "c-find")
    assert sorted(cfind["accessions"]) == ["ACC-AU-1", "ACC-AU-2"]  # type: ignore[arg-type]
    assert cfind["sent"] == 2 and str(cfind["address"]).startswith("127.0.0.1:")

    # The collector got the same events as RFC 5424 messages.
    datagrams = collector.drain()
    assert len(datagrams) == len(kinds)
    assert all(m.startswith((b"<85>1 ", b"<84>1 ")) for m in datagrams)
    assert sum(b" c-find - " in m for m in datagrams) == 1

    # The database answers "who saw ACC-AU-1?" through the CLI, one line per event.
    listed = run_cli("audit", "list", "--accession", "ACC-AU-1", "--config", config)
    assert listed.returncode == 0, listed.stderr
    by_kind = [line.split("\t")[1] for line in listed.stdout.splitlines()]
    assert by_kind == ["hl7-received", "c-find", "mpps-n-create", "hl7-sent"], listed.stdout
    second = run_cli("audit", "list", "--accession", "ACC-AU-2", "--config", config)
    assert [line.split("\t")[1] for line in second.stdout.splitlines()] == [
        "hl7-received", "c-find", "operator-action"], second.stdout
    by_ae = run_cli("audit", "list", "--calling-ae", "INTRUDER", "--config", config)
    assert [line.split("\t")[1] for line in by_ae.stdout.splitlines()] == [
        "association-rejected"]

    # Who saw which patient is the audit trail's business, not the ordinary log's.
    log = broker.log()
    assert "MUSTERMANN" not in log and "ERIKA" not in log
    assert "MUSTERMANN" not in audit_file.read_text()
    assert "Traceback" not in log


def test_audit_off_records_nothing(tmp_path: Path):
    audit_file = tmp_path / "audit.jsonl"
    broker = start_broker(tmp_path, sections={"audit": {"enabled": False,
                                                        "file": str(audit_file)}})
    try:
        with MllpClient("127.0.0.1", broker.hl7_port) as client:
            ack = client.send(orm(control_id="OFF-1", accession="ACC-OFF").encode())
        assert field_of(ack.decode(), "MSA", 1) == "AA"
    finally:
        assert broker.stop() == 0
    assert not audit_file.exists()
    listed = run_cli("audit", "list", "--accession", "ACC-OFF", "--config",
                     str(broker.config_path))
    assert listed.returncode == 0 and listed.stdout == ""
