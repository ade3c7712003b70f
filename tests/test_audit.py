"""The audit trail's core (broker.audit), its writer (broker.audit_trail) with a real syslog
collector on 127.0.0.1 (UDP and TCP), its purge, the ``audit list`` command and the
0007_audit revision."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import yaml
from sqlalchemy import inspect, text

from broker.audit import AuditEvent, Kind, list_events, write_events
from broker.audit_trail import AuditTrail, SyslogSender, rfc5424
from broker.cli import main
from broker.models import Base
from broker.operator_actions import record_action
from broker.purge import Retention, purge
from broker.schema import head
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 11, 29, 8, 0, 0)


def _cfind(ae: str, accessions: tuple[str, ...], at: dt.datetime = T0) -> AuditEvent:
    return AuditEvent(Kind.CFIND, ae, "success", at=at, address="127.0.0.1:40000",
                      accessions=accessions, detail={"matches": len(accessions)})


def test_events_are_found_by_accession_and_by_actor_with_operator_actions(store):
    with store.writing() as s:
        write_events(s, [
            _cfind("CT01", ("ACC1", "ACC2")),
            _cfind("MR01", ("ACC2",), T0 + dt.timedelta(minutes=1)),
            AuditEvent(Kind.HL7_RECEIVED, "RIS^HOSP", "AA", at=T0 - dt.timedelta(hours=1),
                       accessions=("ACC1",), detail={"control_id": "MSG-1"}),
            AuditEvent(Kind.ASSOCIATION_ACCEPTED, "CT01", "accepted", at=T0,
                       tls_subject="CN=ct01"),
        ])
        record_action(s, user="alice", action="retry", accession_number="ACC1",
                      target="outbox message 3", detail="1 row(s) put back to pending",
                      at=T0 + dt.timedelta(minutes=5))
    with store.reading() as s:
        acc1 = list_events(s, accession_number="ACC1")
        acc2 = list_events(s, accession_number="ACC2")
        ct01 = list_events(s, actor="CT01")
        recent = list_events(s, accession_number="ACC1", since=T0)
        only_hl7 = list_events(s, accession_number="ACC1", kinds=[Kind.HL7_RECEIVED])
        newest = list_events(s, accession_number="ACC1", limit=1)
    assert [(e.kind, e.actor) for e in acc1] == [
        (Kind.HL7_RECEIVED, "RIS^HOSP"), (Kind.CFIND, "CT01"), (Kind.OPERATOR_ACTION, "alice")]
    assert acc1[0].detail == {"control_id": "MSG-1"}
    assert acc1[1].accessions == ("ACC1", "ACC2")
    assert acc1[2].outcome == "retry" and acc1[2].detail["target"] == "outbox message 3"
    assert [e.actor for e in acc2] == ["CT01", "MR01"]
    assert [e.kind for e in ct01] == [Kind.CFIND, Kind.ASSOCIATION_ACCEPTED]  # as written
    assert {e.tls_subject for e in ct01} == {None, "CN=ct01"}
    assert [e.kind for e in recent] == [Kind.CFIND, Kind.OPERATOR_ACTION]
    assert [e.kind for e in only_hl7] == [Kind.HL7_RECEIVED]
    assert [e.kind for e in newest] == [Kind.OPERATOR_ACTION]


def test_a_nul_in_what_a_sender_sent_is_stored_visibly_damaged(store):
    # PostgreSQL refused the whole batch, and a failed batch is retried: one HL7 header
    # with a NUL stopped the audit trail's storage for good.
    with store.writing() as s:
        write_events(s, [AuditEvent(Kind.HL7_RECEIVED, "RIS\x00^HOSP", "AR", at=T0,
                                    detail={"control_id": "C\x001"}),
                         _cfind("CT01", ("ACC1",))])
    with store.reading() as s:
        events = list_events(s, since=T0 - dt.timedelta(minutes=1))
    assert sorted(e.actor for e in events) == ["CT01", "RIS\ufffd^HOSP"]
    assert next(e for e in events if e.kind == Kind.HL7_RECEIVED).detail == {
        "control_id": "C\x001"}


def test_the_purge_deletes_audit_events_by_their_own_retention(store):
    now = T0 + dt.timedelta(days=400)
    with store.writing() as s:
        write_events(s, [_cfind("CT01", ("OLD",), T0), _cfind("CT01", ("NEW",), now)])
    retention = Retention(audit_days=365)
    assert purge(store, retention=retention, now=now, dry_run=True).audit_events == 1
    assert purge(store, retention=retention, now=now).audit_events == 1
    with store.reading() as s:
        assert list_events(s, accession_number="OLD") == []
        assert [e.accessions for e in list_events(s, actor="CT01")] == [("NEW",)]
        links = s.execute(text("SELECT accession_number FROM audit_accession")).scalars()
        assert list(links) == ["NEW"]


class _UdpCollector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def receive(self, count: int) -> list[bytes]:
        return [self.sock.recv(65536) for _ in range(count)]


_RFC5424 = re.compile(rb"<(\d+)>1 (\S+) (\S+) worklist-broker (\d+) (\S+) - (\{.*\})$")


def test_the_trail_writes_database_json_lines_and_udp_syslog_in_one_flush(sqlite_store,
                                                                         tmp_path: Path):
    collector = _UdpCollector()
    log_file = tmp_path / "logs" / "audit.jsonl"
    trail = AuditTrail(sqlite_store, file=log_file,
                       syslog=SyslogSender("127.0.0.1", collector.port, "udp"))
    trail.record(_cfind("CT01", ("ACC1",)))
    trail.record(AuditEvent(Kind.LOGIN_FAILED, "mallory", "failed", at=T0,
                            address="10.0.0.9"))
    trail.record(AuditEvent(Kind.OPERATOR_ACTION, "alice", "drop", at=T0), stored=False)
    assert trail.flush() == 2
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(line["kind"], line["actor"]) for line in lines] == [
        ("c-find", "CT01"), ("login-failed", "mallory"), ("operator-action", "alice")]
    assert lines[0] == {"at": "2026-11-29T08:00:00.000Z", "kind": "c-find", "actor": "CT01",
                        "outcome": "success", "address": "127.0.0.1:40000",
                        "tls_subject": None, "accessions": ["ACC1"], "matches": 1}
    datagrams = collector.receive(3)
    parsed = [_RFC5424.match(d) for d in datagrams]
    assert all(parsed), datagrams
    assert [(int(m.group(1)), m.group(5)) for m in parsed] == [  # type: ignore[union-attr]
        (85, b"c-find"), (84, b"login-failed"), (85, b"operator-action")]
    assert json.loads(parsed[0].group(6))["accessions"] == ["ACC1"]  # type: ignore[union-attr]
    with sqlite_store.reading() as s:
        assert [e.kind for e in list_events(s, actor="alice")] == []  # not stored twice
        assert [e.kind for e in list_events(s, actor="mallory")] == [Kind.LOGIN_FAILED]
    assert trail.flush() == 0  # nothing buffered any more
    trail.stop()


def test_tcp_syslog_frames_by_octet_counting_and_reconnects(tmp_path: Path):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    received: list[bytes] = []

    def accept(n: int) -> None:
        for _ in range(n):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                received.append(data)

    thread = threading.Thread(target=accept, args=(2,), daemon=True)
    thread.start()
    sender = SyslogSender("127.0.0.1", port, "tcp")
    sender.send([_cfind("CT01", ("ACC1",)), _cfind("CT02", ("ACC2",))])
    sender.close()  # the collector sees the first connection end
    sender.send([_cfind("CT03", ())])
    sender.close()
    thread.join(10)
    server.close()
    assert len(received) == 2
    first = received[0]
    frames = []
    while first:
        length, _, rest = first.partition(b" ")
        frames.append(rest[:int(length)])
        first = rest[int(length):]
    assert [f.split(b" ")[5] for f in frames] == [b"c-find", b"c-find"]
    assert b'"actor":"CT02"' in frames[1]
    assert received[1].startswith(b"%d <85>1 " % (len(received[1]) - len(
        received[1].split(b" ")[0]) - 1))


def test_an_unreachable_collector_or_database_loses_nothing_else(tmp_path: Path, sqlite_store):
    closed = _UdpCollector()
    port = closed.port
    closed.sock.close()
    log_file = tmp_path / "audit.jsonl"
    trail = AuditTrail(sqlite_store, file=log_file,
                       syslog=SyslogSender("127.0.0.1", port, "tcp"))  # nobody listens
    with sqlite_store.write_engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    trail.record(_cfind("CT01", ("ACC1",)))
    assert trail.flush() == 0  # kept for the next try
    assert len(log_file.read_text().splitlines()) == 1
    with sqlite_store.write_engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
    assert trail.flush() == 1
    assert len(log_file.read_text().splitlines()) == 1  # the line is not written twice
    with sqlite_store.reading() as s:
        assert [e.actor for e in list_events(s, accession_number="ACC1")] == ["CT01"]


def test_an_event_the_database_can_never_take_does_not_hold_back_the_others(
        tmp_path: Path, sqlite_store, caplog):
    # A failed batch was kept whole for the next flush: one event that can never be stored
    # (a NUL in its actor on PostgreSQL, until this session; here a bug's event without a
    # kind) failed every flush after it, and the trail stored nothing more until its bound
    # dropped events.
    log_file = tmp_path / "audit.jsonl"
    trail = AuditTrail(sqlite_store, file=log_file)
    trail.record(_cfind("CT01", ("ACC1",)))
    trail.record(AuditEvent(None, "BAD", "success", at=T0))  # type: ignore[arg-type]
    trail.record(_cfind("MR01", ("ACC2",)))
    assert trail.flush() == 2
    assert len(log_file.read_text().splitlines()) == 3  # the file has every one
    assert trail.dropped == 1
    assert "audit: an event could not be stored and is dropped" in caplog.text
    trail.record(_cfind("US01", ("ACC3",)))
    assert trail.flush() == 1  # nothing left over from the bad one
    with sqlite_store.reading() as s:
        stored = sorted(e.actor for e in list_events(s, since=T0 - dt.timedelta(days=1)))
    assert stored == ["CT01", "MR01", "US01"]


def test_rfc5424_header_fields_are_printable_and_bounded():
    event = AuditEvent(Kind.LOGIN, "user with spaces", "success", at=T0)
    message = rfc5424(event, hostname="host name", procid="12")
    assert message.startswith(b"<85>1 2026-11-29T08:00:00.000Z hostname worklist-broker 12 "
                              b"login - {")


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url}, "audit": {"file": "audit.log"},
                                    "mapping": str(REPO / "config" / "mapping.yaml")}))
    return path


def test_audit_list_prints_one_line_per_event(store, tmp_path: Path, capsys):
    with store.writing() as s:
        write_events(s, [_cfind("CT01", ("ACC1",)),
                         AuditEvent(Kind.MPPS_CREATE, "CT01", "success",
                                    at=T0 + dt.timedelta(seconds=1), accessions=("ACC1",),
                                    detail={"sop_instance_uid": "1.2.3", "status":
                                            "IN PROGRESS"})])
    config = str(_config(tmp_path, store.url))
    assert main(["audit", "list", "--accession", "ACC1", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "2026-11-29T08:00:00.000Z\tc-find\tCT01\tsuccess\t127.0.0.1:40000\t-\tACC1\tmatches=1",
        "2026-11-29T08:00:01.000Z\tmpps-n-create\tCT01\tsuccess\t-\t-\tACC1\t"
        "sop_instance_uid=1.2.3 status=IN PROGRESS"]
    assert main(["audit", "list", "--calling-ae", "CT01", "--since", "2026-11-29T08:00:01",
                 "--json", "--config", config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["kind"] for line in out] == ["mpps-n-create"]


@pytest.mark.parametrize("args, message", [
    (["audit", "list"], "needs --accession or --calling-ae"),
    (["audit", "list", "--accession", "A", "--since", "yesterday"], "--since 'yesterday'"),
    (["audit", "list", "--accession", "A", "--limit", "0"], "--limit must be at least 1"),
])
def test_audit_list_refuses_bad_arguments_in_one_line(sqlite_store, tmp_path, capsys, args,
                                                     message):
    config = str(_config(tmp_path, sqlite_store.url))
    assert main([*args, "--config", config]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("tables_present", [True, False])
def test_the_audit_revision_creates_its_tables_from_0006_keeping_rows(store, tables_present):
    from alembic import command

    from broker.schema import _alembic_config

    with store.writing() as s:
        record_action(s, user="alice", action="drop", accession_number="ACC1", target="t",
                      detail="d")
    with store.write_engine.begin() as conn:
        if not tables_present:
            conn.execute(text("DROP TABLE audit_accession"))
            conn.execute(text("DROP TABLE audit_event"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0006_item_dataset'"))
        config = _alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    with store.write_engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
        for table in ("audit_event", "audit_accession"):
            columns = {c["name"] for c in inspect(conn).get_columns(table)}
            assert columns == set(Base.metadata.tables[table].columns.keys())
            indexes = {i["name"] for i in inspect(conn).get_indexes(table)}
            assert indexes >= {i.name for i in Base.metadata.tables[table].indexes}
    with store.writing() as s:
        write_events(s, [_cfind("CT01", ("ACC1",))])
    with store.reading() as s:
        assert [e.kind for e in list_events(s, accession_number="ACC1")] == [
            Kind.CFIND, Kind.OPERATOR_ACTION]


def test_the_trail_thread_flushes_without_being_asked(sqlite_store, tmp_path: Path):
    log_file = tmp_path / "audit.jsonl"
    trail = AuditTrail(sqlite_store, file=log_file, flush_seconds=0.05)
    trail.start()
    try:
        trail.record(_cfind("CT01", ("ACC9",)))
        wait_for(lambda: log_file.exists() and log_file.read_text(), what="the audit line")
    finally:
        trail.stop()
    with sqlite_store.reading() as s:
        assert len(list_events(s, accession_number="ACC9")) == 1
