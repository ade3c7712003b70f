"""The MLLP listener and order handler over real sockets, against a real store."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from broker.models import Patient, WorklistItem
from broker.store import Store
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.mllp import END_BLOCK, START_BLOCK, MllpClient, MllpError
from hl7_listener.server import MllpServer
from hl7_listener.status_message import parse_ack
from tests.fake_ris import field_of
from tests.messages import orm
from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(store: Store) -> Iterator[tuple[MllpServer, Store]]:
    handler = OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    # No waiting room: past three connections one is closed at once.
    server = MllpServer(handler, host="127.0.0.1", port=0, max_connections=3, max_waiting=0,
                        idle_timeout=1.0, max_message_bytes=4096)
    server.start()
    yield server, store
    server.stop()


def _items(store: Store) -> dict[str, str]:
    with store.reading() as s:
        return dict(s.execute(select(WorklistItem.accession_number, WorklistItem.status)).all())


def _ack(server: MllpServer, message: str) -> str:
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as client:
        return client.send(message.encode()).decode()


def test_several_messages_on_one_connection_then_cancel(listener):
    server, store = listener
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as client:
        first = client.send(orm(control_id="M1", accession="A1").encode()).decode()
        second = client.send(orm(control_id="M2", accession="A2").encode()).decode()
        cancel = client.send(orm(control="CA", control_id="M3", accession="A1").encode())
    assert (field_of(first, "MSA", 1), field_of(first, "MSA", 2)) == ("AA", "M1")
    assert field_of(second, "MSA", 2) == "M2"
    assert field_of(cancel.decode(), "MSA", 1) == "AA"
    # MSH-5/6 answer the sender's MSH-3/4; the version is the sender's.
    assert (field_of(first, "MSH", 5), field_of(first, "MSH", 6)) == ("RIS", "HOSP")
    assert field_of(first, "MSH", 12) == "2.3.1"
    assert field_of(first, "MSH", 9) == "ACK^O01^ACK"
    assert _items(store) == {"A1": "CANCELLED", "A2": "SCHEDULED"}


def test_missing_field_gets_ae_with_err_naming_it_and_nothing_is_stored(listener):
    server, store = listener
    v23 = _ack(server, orm(accession=""))
    assert field_of(v23, "MSA", 1) == "AE"
    assert parse_ack(v23.encode()).text == "OBR-18 AccessionNumber is required"
    assert field_of(v23, "ERR", 1) == "OBR^1^18^101&Required field missing&HL70357"
    v25 = _ack(server, orm(accession="", version="2.5", tq1=True))
    assert field_of(v25, "ERR", 2) == "OBR^1^18"
    assert field_of(v25, "ERR", 3) == "101^Required field missing^HL70357"
    assert field_of(v25, "ERR", 8) == "OBR-18 AccessionNumber is required"
    assert _items(store) == {}


@pytest.mark.parametrize(("fields", "location"), [
    ({"patient_name": "DOE\x00^JOHN"}, "PID-5"),
    ({"accession": "ACC\x00-2"}, "OBR-18"),
])
def test_a_nul_character_gets_ae_naming_its_field_and_nothing_is_stored(listener, fields,
                                                                       location, caplog):
    # SQLite stored it inside names and accession numbers; PostgreSQL refused it as a
    # "database unavailable, please resend" (AE): a RIS would resend it for ever.
    server, store = listener
    ack = _ack(server, orm(control_id="NUL-1", **fields))
    assert field_of(ack, "MSA", 1) == "AE"
    assert field_of(ack, "MSA", 2) == "NUL-1"
    assert parse_ack(ack.encode()).text.startswith(f"{location} holds a NUL character")
    assert field_of(ack, "ERR", 1).startswith(f"{location.replace('-', '^1^')}^102&")
    assert _items(store) == {}
    assert "database error" not in caplog.text


def test_a_nul_character_in_the_header_gets_ar_and_the_refusal_is_kept(listener):
    # The ACK echoes MSH-10 byte for byte (the RIS matches it); the log keeps it with the
    # NUL shown as U+FFFD, where PostgreSQL failed to keep the refusal at all.
    server, store = listener
    ack = _ack(server, orm(control_id="NUL\x00-2"))
    assert field_of(ack, "MSA", 1) == "AR"
    assert field_of(ack, "MSA", 2) == "NUL\x00-2"
    assert "MSH-10 holds a NUL character" in parse_ack(ack.encode()).text
    assert _items(store) == {}
    with store.reading() as s:
        logged = s.execute(text("SELECT control_id, outcome FROM inbound_message")).all()
    assert [tuple(row) for row in logged] == [("NUL\ufffd-2", "rejected")]


@pytest.mark.parametrize(("payload", "code", "reason"), [
    (b"this is not HL7 at all", "AR", "no MSH segment"),
    (b"PID|||123\rOBR|1\r", "AR", "no MSH segment"),
    (orm(message_type="ORU^R01").encode(), "AR", "message type ORU^R01 is not supported"),
    (orm(message_type="ORM^O02").encode(), "AR", "ORM^O02 is not supported"),
    (orm(version="2.9").encode(), "AR", "HL7 version '2.9' is not supported"),
    (orm(birth_date="1965-04-12").encode(), "AE", "PID-7 PatientBirthDate"),
])
def test_bad_input_is_answered_and_the_listener_keeps_serving(listener, payload, code, reason):
    server, store = listener
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as client:
        nak = client.send(payload).decode()
        assert field_of(nak, "MSA", 1) == code
        assert reason in parse_ack(nak.encode()).text  # MSA-3, escapes decoded
        good = client.send(orm(accession="OK-1").encode()).decode()
    assert field_of(good, "MSA", 1) == "AA"
    assert _items(store) == {"OK-1": "SCHEDULED"}


def _raw_connection(server: MllpServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def _read_frame(sock: socket.socket) -> bytes:
    data = b""
    while END_BLOCK not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_bytes_outside_frames_are_skipped_and_truncated_frames_dropped(listener):
    server, store = listener
    with _raw_connection(server) as sock:
        # Noise, then a frame cut short by a new start block, then a whole frame.
        sock.sendall(b"garbage\r\n" + START_BLOCK + b"MSH|^~\\&|trunc" +
                     START_BLOCK + orm(accession="WHOLE").encode() + END_BLOCK)
        reply = _read_frame(sock).decode()
    assert field_of(reply.strip("\x0b\x1c\r"), "MSA", 1) == "AA"
    assert _items(store) == {"WHOLE": "SCHEDULED"}


def test_oversized_message_gets_ar_and_connection_closes(listener):
    server, store = listener
    huge = orm(accession="BIG", patient_name="X" * 5000).encode()
    with _raw_connection(server) as sock:
        sock.sendall(START_BLOCK + huge + END_BLOCK)
        reply = _read_frame(sock).decode()
        assert "exceeds 4096 bytes" in reply
        assert sock.recv(100) == b""  # closed
    assert _items(store) == {}
    assert field_of(_ack(server, orm(accession="AFTER")), "MSA", 1) == "AA"


def test_idle_connection_is_closed(listener):
    server, _ = listener
    with _raw_connection(server) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the server closed it after its 1 s idle timeout


def test_connection_limit_and_reset_mid_message(listener):
    server, store = listener
    held = [_raw_connection(server) for _ in range(3)]
    try:
        wait_for(lambda: len(server._writers) == 3, what="three open connections")
        with _raw_connection(server) as extra:
            extra.settimeout(5)
            # Over max_connections with no waiting room: closed at once, while the three
            # are still open (not served later, once they idled out).
            assert extra.recv(100) == b""
            assert len(server._writers) == 3
    finally:
        for sock in held:
            # Half a message, then a reset: the broker must drop it and keep serving.
            sock.sendall(START_BLOCK + b"MSH|^~\\&|RIS|HOSP")
            # SO_LINGER on, 0 s: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    wait_for(lambda: not server._writers, what="connections to be dropped")
    assert field_of(_ack(server, orm(accession="AFTER-RESET")), "MSA", 1) == "AA"
    assert _items(store) == {"AFTER-RESET": "SCHEDULED"}


def test_client_reports_an_unreachable_peer():
    with pytest.raises(MllpError), MllpClient("127.0.0.1", free_port(), connect_timeout=1) as c:
        c.send(b"MSH|^~\\&|x")


def test_database_failure_answers_ae_and_leaves_nothing_half_written(store):
    handler = OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    # A real database error in the middle of the transaction: the patient row is written
    # first, then the worklist item insert fails.
    with store.writing() as s:
        s.execute(text("DROP TABLE mpps_item"))
        s.execute(text("DROP TABLE study_arrival"))  # its foreign key, on PostgreSQL
        s.execute(text("DROP TABLE worklist_item"))
    nak = handler.handle(orm(accession="X").encode())
    assert field_of(nak.decode(), "MSA", 1) == "AE"
    assert "database unavailable" in parse_ack(nak).text
    with store.reading() as s:
        assert s.scalar(select(func.count(Patient.id))) == 0
