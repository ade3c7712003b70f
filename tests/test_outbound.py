"""Outbox delivery against a fake RIS that is a real MLLP server."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import select

from broker.config import Hl7Config, RisConfig
from broker.domain import (
    MppsCreate,
    MppsSet,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
)
from broker.models import OutboxMessage, OutboxState
from broker.mpps import record_mpps_create, record_mpps_set
from broker.orders import apply_order
from broker.store import Store
from hl7_listener.outbound import OutboundReport, OutboundSender
from tests.fake_ris import FakeRis, field_of
from tests.support import free_port, wait_for


def _order_with_mpps(store, accession: str = "ACC1") -> None:
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="DOE^JOHN"),
                             ProcedureData(accession, placer_order_number="PL1",
                                           filler_order_number="FI1", modality="MR",
                                           scheduled_start=dt.datetime(2026, 11, 29, 9))),
                    uid_root="1.2.3")
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.2.3.9", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number=accession),)))
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.2.3.9", "COMPLETED", end=dt.datetime(2026, 11, 29, 10)))


def _sender(store, port: int, **retry: float) -> OutboundSender:
    retry.setdefault("retry_initial_seconds", 0.05)
    ris = RisConfig(enabled=True, host="127.0.0.1", port=port, connect_timeout_seconds=1,
                    ack_timeout_seconds=2, **retry)
    return OutboundSender(store, ris, Hl7Config(), batch_size=10)


def _run_until(sender: OutboundSender, done) -> None:
    """Run the outbound job (as the scheduler would) until ``done()``; backoffs are short."""
    wait_for(lambda: sender.run_once() and done(), timeout=10, what="outbox state")


def _states(store) -> list[str]:
    with store.reading() as s:
        return list(s.scalars(select(OutboxMessage.state).order_by(OutboxMessage.id)))


def test_delivers_in_order_and_marks_sent_only_on_matching_aa(store):
    _order_with_mpps(store)
    ris = FakeRis()
    sender = _sender(store, ris.port)
    try:
        assert sender.run_once().sent == 2
        messages = ris.wait_for_messages(2)
        assert [field_of(m, "ORC", 5) for m in messages] == ["IP", "CM"]
        assert field_of(messages[0], "OBR", 18) == "ACC1"
        assert ris.connections == 1  # the connection is reused between messages
        assert _states(store) == [OutboxState.SENT, OutboxState.SENT]
        assert sender.run_once().sent == 0  # nothing sent twice
    finally:
        sender.close()
        ris.close()


def test_negative_ack_and_down_ris_keep_messages_pending_for_retry(store):
    _order_with_mpps(store)
    down = _sender(store, free_port())
    try:
        report = down.run_once()
    finally:
        down.close()
    assert (report.sent, report.failed) == (0, 1)
    with store.reading() as s:
        first = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).first()
        assert first.attempts == 1 and "unreachable" in first.last_error

    ris = FakeRis(ack_code="AE")
    sender = _sender(store, ris.port)
    try:
        wait_for(lambda: sender.run_once().failed, what="a due retry")
        # The IP failed: the CM of the same order waits behind it, never overtakes it.
        assert [field_of(m, "ORC", 5) for m in ris.wait_for_messages(1)] == ["IP"]
        assert _states(store) == [OutboxState.PENDING, OutboxState.PENDING]
        ris.ack_code = "AA"
        _run_until(sender, lambda: _states(store) == [OutboxState.SENT] * 2)
        messages = ris.wait_for_messages(3)
        # The retried IP carries the same MSH-10, so the RIS can drop a duplicate.
        assert field_of(messages[0], "MSH", 10) == field_of(messages[1], "MSH", 10)
        assert _states(store) == [OutboxState.SENT, OutboxState.SENT]
    finally:
        sender.close()
        ris.close()


def test_rejection_dead_letters_and_holds_the_order_until_an_admin_acts(store):
    from broker import outbox

    _order_with_mpps(store, "ACC1")
    _order_with_mpps_uid(store, "ACC2", "1.2.3.10")
    ris = FakeRis(ack_code="AR")
    sender = _sender(store, ris.port)
    try:
        report = sender.run_once()
        # ACC1's IP and ACC2's IP are both rejected; neither CM is sent behind them.
        assert (report.sent, report.failed) == (0, 2)
        assert _states(store) == [OutboxState.FAILED, OutboxState.PENDING,
                                  OutboxState.FAILED, OutboxState.PENDING]
        with store.reading() as s:
            assert "RIS answered AR" in outbox.list_messages(s, OutboxState.FAILED)[0].last_error
        ris.ack_code = "AA"
        assert sender.run_once().sent == 0  # dead letters stay put until an administrator acts
        with store.writing() as s:
            assert outbox.retry(s, None) == 2
        _run_until(sender, lambda: _states(store) == [OutboxState.SENT] * 4)
    finally:
        sender.close()
        ris.close()


def test_negative_acks_dead_letter_after_max_attempts_and_drop_unblocks(store):
    from broker import outbox

    _order_with_mpps(store, "ACC1")
    ris = FakeRis(ack_code="AE")
    sender = _sender(store, ris.port, max_attempts=2, retry_initial_seconds=0.01)
    try:
        _run_until(sender, lambda: _states(store)[0] == OutboxState.FAILED)
        with store.reading() as s:
            first = outbox.list_messages(s, OutboxState.FAILED)[0]
        assert first.attempts == 2
        with store.writing() as s:
            assert outbox.drop(s, first.id) is not None
        ris.ack_code = "AA"
        assert sender.run_once().sent == 1  # the CM, no longer held behind the dropped IP
        assert field_of(ris.wait_for_messages(3)[-1], "ORC", 5) == "CM"
    finally:
        sender.close()
        ris.close()


def _order_with_mpps_uid(store, accession: str, uid: str) -> None:
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P2"), ProcedureData(accession)),
                    uid_root="1.2.3")
    with store.writing() as s:
        record_mpps_create(s, MppsCreate(uid, "IN PROGRESS",
                                         (ScheduledStepRef(accession_number=accession),)))
    with store.writing() as s:
        record_mpps_set(s, MppsSet(uid, "COMPLETED", end=dt.datetime(2026, 11, 29, 11)))


def test_reconnects_when_the_ris_closed_the_idle_connection(store):
    from hl7_listener.mllp import MllpClient

    ris = FakeRis()
    try:
        with MllpClient("127.0.0.1", ris.port, read_timeout=5) as client:
            client.send(b"MSH|^~\\&|A|B|C|D|2026||ORM^O01|ONE|P|2.3.1\r")
            ris.drop_connections()
            wait_for(lambda: ris.open_connections == 0, what="the RIS to hang up")
            ack = client.send(b"MSH|^~\\&|A|B|C|D|2026||ORM^O01|TWO|P|2.3.1\r")
        assert field_of(ack.decode(), "MSA", 2) == "TWO"
        assert ris.connections == 2
    finally:
        ris.close()


def _received_ids(ris: FakeRis) -> list[tuple[str, str]]:
    return [(field_of(m, "MSH", 10), field_of(m, "ORC", 5)) for m in ris.received]


def test_slow_ris_times_out_then_gets_the_same_msh10_again_in_order(store):
    _order_with_mpps(store)
    ris = FakeRis(ack_delay=2.0)  # slower than the sender's 0.5 s ACK timeout
    sender = OutboundSender(store, RisConfig(
        enabled=True, host="127.0.0.1", port=ris.port, connect_timeout_seconds=1,
        ack_timeout_seconds=0.5, retry_initial_seconds=0.05), Hl7Config(), batch_size=10)
    try:
        report = sender.run_once()
        assert (report.sent, report.failed) == (0, 1)
        assert _states(store) == [OutboxState.PENDING, OutboxState.PENDING]
        ris.ack_delay = 0.0
        _run_until(sender, lambda: _states(store) == [OutboxState.SENT] * 2)
        received = _received_ids(ris)
        # The IP went out twice under one MSH-10 (the RIS can drop the copy); CM only after.
        assert received[0] == received[1] and received[0][1] == "IP"
        assert [status for _, status in received[1:]] == ["IP", "CM"]
    finally:
        sender.close()
        ris.close()


def test_connection_dropped_mid_ack_is_retried_not_lost(store):
    _order_with_mpps(store)
    ris = FakeRis(cut_acks=1)
    sender = _sender(store, ris.port)
    try:
        report = sender.run_once()
        assert (report.sent, report.failed) == (0, 1)
        with store.reading() as s:
            error = s.scalars(select(OutboxMessage.last_error).order_by(OutboxMessage.id)).first()
        assert "complete reply" in error
        _run_until(sender, lambda: _states(store) == [OutboxState.SENT] * 2)
        received = _received_ids(ris)
        assert [status for _, status in received] == ["IP", "IP", "CM"]
        assert received[0][0] == received[1][0]
        assert ris.connections == 2  # a fresh connection after the hang-up
    finally:
        sender.close()
        ris.close()


def test_two_brokers_on_one_database_never_deliver_the_same_order_twice(store):
    """The second broker's outbound job stands aside while the first one delivers."""
    _order_with_mpps(store)
    ris = FakeRis(ack_delay=0.5)
    other_store = Store(store.url, pool_size=2)
    first, second = _sender(store, ris.port), _sender(other_store, ris.port)
    reports: list = []
    worker = threading.Thread(target=lambda: reports.append(first.run_once()))
    try:
        worker.start()
        ris.wait_for_messages(1)  # the first broker is mid-delivery, waiting for an ACK
        assert second.run_once().skipped is True
        worker.join(timeout=15)
        assert reports and reports[0].sent == 2
        assert [field_of(m, "ORC", 5) for m in ris.received] == ["IP", "CM"]
        assert second.run_once() == OutboundReport(sent=0, failed=0)  # nothing left to send
    finally:
        worker.join(timeout=15)
        first.close()
        second.close()
        other_store.dispose()
        ris.close()
