"""HL7 as real RIS send it, over real sockets against a real store: reused control IDs, the
start in ORC-7.4, NAKs that name their message, tolerant headers, bursts of connections."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.models import InboundMessage, Patient, WorklistItem
from broker.store import Store
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.mllp import END_BLOCK, MllpClient, frame
from hl7_listener.server import MllpServer
from hl7_listener.status_message import parse_ack
from tests.fake_ris import field_of
from tests.messages import adt, orm
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]


def _server(store: Store, **limits: int | float) -> MllpServer:
    handler = OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    settings: dict[str, int | float] = {"max_connections": 4, "idle_timeout": 5.0,
                                        "max_message_bytes": 4096, **limits}
    server = MllpServer(handler, host="127.0.0.1", port=0, **settings)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def listener(store: Store) -> Iterator[tuple[MllpServer, Store]]:
    server = _server(store)
    yield server, store
    server.stop()


def _send(server: MllpServer, message: str | bytes) -> str:
    payload = message.encode() if isinstance(message, str) else message
    with MllpClient("127.0.0.1", server.port, read_timeout=10) as client:
        return client.send(payload).decode("utf-8", errors="replace")


def _items(store: Store) -> dict[str, str]:
    with store.reading() as s:
        return dict(s.execute(select(WorklistItem.accession_number, WorklistItem.status)).all())


def _log_rows(store: Store) -> list[tuple[str, str, str | None]]:
    with store.reading() as s:
        return [tuple(r) for r in s.execute(  # type: ignore[misc]
            select(InboundMessage.control_id, InboundMessage.ack_code, InboundMessage.warnings)
            .order_by(InboundMessage.id)).all()]


# --- 1. A reused MSH-10 with different content is a new message ------------------------------

def test_a_reused_control_id_with_other_content_is_applied_and_flagged(listener):
    server, store = listener
    first = _send(server, orm(control_id="CTRL-1", accession="DUPA1"))
    second = _send(server, orm(control_id="CTRL-1", accession="DUPB2", patient_id="PAT-2"))

    assert (field_of(first, "MSA", 1), field_of(first, "MSA", 2)) == ("AA", "CTRL-1")
    assert (field_of(second, "MSA", 1), field_of(second, "MSA", 2)) == ("AA", "CTRL-1")
    assert "CTRL-1 reused with different content" in parse_ack(second.encode()).text
    assert _items(store) == {"DUPA1": "SCHEDULED", "DUPB2": "SCHEDULED"}
    rows = _log_rows(store)
    assert [r[:2] for r in rows] == [("CTRL-1", "AA"), ("CTRL-1", "AA")]
    assert rows[0][2] is None
    assert "reused with different content" in (rows[1][2] or "")


def test_an_exact_resend_changes_nothing_and_gets_the_original_ack(listener):
    server, store = listener
    message = orm(control_id="CTRL-7", accession="ONCE-1")
    first = _send(server, message)
    # The same message sent again a minute later: only MSH-7 differs.
    again = _send(server, message.replace("20261129080000", "20261129080100", 1))
    assert again == first
    assert _items(store) == {"ONCE-1": "SCHEDULED"}
    assert len(_log_rows(store)) == 1


def test_a_reused_control_id_on_an_adt_applies_the_update(listener):
    server, store = listener
    assert field_of(_send(server, orm(control_id="O-1", patient_id="PAT-5")), "MSA", 1) == "AA"
    a08 = _send(server, adt("A08", patient_id="PAT-5", patient_name="NEW^NAME",
                            control_id="ADT-9"))
    a31 = _send(server, adt("A31", patient_id="PAT-5", patient_name="NEWER^NAME",
                            control_id="ADT-9"))
    assert field_of(a08, "MSA", 1) == field_of(a31, "MSA", 1) == "AA"
    assert "reused" in parse_ack(a31.encode()).text
    with store.reading() as s:
        name = s.scalar(select(Patient.patient_name).where(Patient.patient_id == "PAT-5"))
    assert name == "NEWER^NAME"


# --- 2. The scheduled start from ORC-7.4, and a warning when there is none -------------------

def test_the_start_is_read_from_orc_7_when_obr_27_is_empty(listener):
    server, store = listener
    ack = _send(server, orm(version="2.3", accession="ORC7-1", start="20261129101500",
                            start_in="ORC-7"))
    assert field_of(ack, "MSA", 1) == "AA"
    assert parse_ack(ack.encode()).text == ""  # no warning: the start was found
    with store.reading() as s:
        start = s.scalar(select(WorklistItem.scheduled_start))
    assert start is not None and start.strftime("%Y%m%d%H%M") == "202611291015"


@pytest.mark.parametrize("version", ["2.3", "2.5"])
def test_an_order_without_a_start_is_taken_with_a_warning(listener, version):
    server, store = listener
    ack = _send(server, orm(version=version, accession="NOSTART", start_in=None))
    assert field_of(ack, "MSA", 1) == "AA"
    text = parse_ack(ack.encode()).text
    assert "no scheduled start (TQ1-7.1, ORC-7.4, OBR-27.4 empty)" in text
    segments = [line.split("|")[0] for line in ack.split("\r") if line]
    if version == "2.5":  # ERR with severity W where the version has it
        assert field_of(ack, "ERR", 4) == "W"
    else:
        assert "ERR" not in segments
    assert _items(store) == {"NOSTART": "SCHEDULED"}
    assert "no scheduled start" in (_log_rows(store)[0][2] or "")


# --- 3. Every NAK names its message ----------------------------------------------------------

@pytest.mark.parametrize(("message", "reason"), [
    (orm(control_id="V-29", version="2.9"), "HL7 version '2.9' is not supported"),
    (orm(control_id="V-NONE", version=""), "MSH-12 version is required"),
    (orm(control_id="MSH2-BAD").replace("MSH|^~\\&|", "MSH|^^|", 1), "MSH-2"),
    (orm(control_id="CS-BAD", charset="KLINGON"), "MSH-18 character set"),
])
def test_a_header_refusal_echoes_msh_10_and_answers_msh_3_4(listener, message, reason):
    server, store = listener
    control_id = message.split("|")[9]
    nak = _send(server, message)
    assert field_of(nak, "MSA", 1) in ("AR", "AE")
    assert field_of(nak, "MSA", 2) == control_id
    assert (field_of(nak, "MSH", 5), field_of(nak, "MSH", 6)) == ("RIS", "HOSP")
    assert reason in parse_ack(nak.encode()).text
    assert _items(store) == {}


def test_an_over_long_message_is_refused_naming_its_msh_10(listener):
    server, store = listener
    message = orm(control_id="HUGE-1", accession="HUGE").rstrip("\r") + "\rNTE|1||" + (
        "x" * 10_000) + "\r"
    nak = _send(server, message)
    assert (field_of(nak, "MSA", 1), field_of(nak, "MSA", 2)) == ("AR", "HUGE-1")
    assert "exceeds 4096 bytes" in parse_ack(nak.encode()).text
    assert _items(store) == {}
    # The connection was closed to resynchronise; the next one is served.
    assert field_of(_send(server, orm(accession="AFTER")), "MSA", 1) == "AA"


def test_a_non_ascii_field_separator_is_echoed_byte_for_byte(listener):
    server, _ = listener
    # MSH-1 is 0xA6 (broken bar in Latin-1) and the bytes are not the UTF-8 MSH-18 says.
    raw = orm(control_id="SEP-1", charset="UNICODE UTF-8").encode().replace(b"|", b"\xa6")
    with MllpClient("127.0.0.1", server.port, read_timeout=10) as client:
        nak = client.send(raw)
    assert nak.startswith(b"MSH\xa6^~\\&\xa6")
    fields = nak.split(b"\r")[1].split(b"\xa6")
    assert (fields[0], fields[2]) == (b"MSA", b"SEP-1")


# --- 4. Tolerant where the standard's readers are --------------------------------------------

@pytest.mark.parametrize(("message", "ack_version", "ack_msh2"), [
    ("\ufeff" + orm(control_id="BOM-1"), "2.3.1", "^~\\&"),
    (orm(control_id="V250", version="2.5.0", tq1=True), "2.5", "^~\\&"),
    (orm(control_id="V231", version="2.3.1."), "2.3.1", "^~\\&"),
    (orm(control_id="V24", version="2.4 "), "2.4", "^~\\&"),
    (orm(control_id="MSH2-3").replace("MSH|^~\\&|", "MSH|^~\\|", 1), "2.3.1", "^~\\"),
    (orm(control_id="MSH2-5", version="2.7", tq1=True).replace("MSH|^~\\&|", "MSH|^~\\&#|", 1),
     "2.7", "^~\\&#"),
])
def test_tolerated_headers_are_accepted_and_answered_in_kind(listener, message, ack_version,
                                                              ack_msh2):
    server, store = listener
    ack = _send(server, message)
    assert (field_of(ack, "MSA", 1), field_of(ack, "MSA", 2)) == ("AA",
                                                                 message.split("|")[9])
    assert field_of(ack, "MSH", 12) == ack_version
    assert ack.split("|")[1] == ack_msh2
    assert _items(store) == {"ACC-1": "SCHEDULED"}


def test_a_tolerated_quirk_is_logged_once_per_sender(listener, caplog):
    server, _ = listener
    with caplog.at_level(logging.INFO, logger="hl7_listener.handler"):
        for n in range(3):
            assert field_of(_send(server, "\ufeff" + orm(control_id=f"B-{n}")),
                            "MSA", 1) == "AA"
    quirks = [r for r in caplog.records if "byte-order mark" in r.getMessage()]
    assert len(quirks) == 1 and quirks[0].levelno == logging.INFO


# --- 5. A burst of connections waits its turn ------------------------------------------------

def test_fifty_connections_at_once_each_get_their_ack(store):
    server = _server(store, max_connections=8)
    try:
        start = threading.Barrier(50, timeout=20)
        acks: dict[int, str] = {}
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                with MllpClient("127.0.0.1", server.port, read_timeout=60) as mllp:
                    start.wait()
                    acks[n] = mllp.send(orm(control_id=f"C-{n}", accession=f"BURST-{n}",
                                            patient_id=f"P-{n}").encode()).decode()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
    finally:
        server.stop()
    assert not errors
    assert sorted(field_of(a, "MSA", 2) for a in acks.values()) == sorted(
        f"C-{n}" for n in range(50))
    assert {field_of(a, "MSA", 1) for a in acks.values()} == {"AA"}
    assert len(_items(store)) == 50


def test_a_waiting_connection_is_served_when_a_slot_frees_and_past_the_queue_one_is_closed(
        store):
    server = _server(store, max_connections=1, max_waiting=1, wait_timeout=30)
    try:
        held = MllpClient("127.0.0.1", server.port, read_timeout=10)
        held.__enter__()
        assert field_of(held.send(orm(control_id="H-1", accession="HELD").encode()).decode(),
                        "MSA", 1) == "AA"  # this connection now holds the only slot
        waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        waiting.sendall(frame(orm(control_id="W-1", accession="WAITED").encode()))
        wait_for(lambda: server._waiting == 1, what="the second connection to wait")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            assert extra.recv(100) == b""  # past max_waiting: closed unanswered
        held.__exit__(None, None, None)  # frees the slot: the waiting one is served
        with waiting:
            reply = b""
            while not reply.endswith(END_BLOCK):
                chunk = waiting.recv(4096)
                assert chunk, "closed without an ACK"
                reply += chunk
        assert field_of(reply.decode(), "MSA", 2) == "W-1"
        assert _items(store) == {"HELD": "SCHEDULED", "WAITED": "SCHEDULED"}
    finally:
        server.stop()
