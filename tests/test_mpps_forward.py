"""The MPPS forward queue in the core: written with the MPPS change, ordered per instance and
destination, backoff and dead letters, the administrator's retry and drop."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from broker import mpps_forward
from broker.config import MppsDestination
from broker.delivery import Outcome, RetryPolicy
from broker.domain import MppsCreate, MppsSet, ScheduledStepRef
from broker.errors import MppsError
from broker.models import MppsForward, OutboxState
from broker.mpps import record_mpps_create, record_mpps_set

PACS = MppsDestination(ae_title="PACS", host="127.0.0.1", port=11112)
ARCHIVE = MppsDestination(ae_title="ARCHIVE", host="127.0.0.1", port=11113)
NOW = dt.datetime(2026, 11, 29, 12, 0)
POLICY = RetryPolicy(initial_seconds=10, max_seconds=60, max_attempts=2)


def _create(store, uid: str, *, to=(PACS,), attributes: str | None = '{"x": 1}') -> None:
    with store.writing() as s:
        record_mpps_create(s, MppsCreate(uid, "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="NONE"),),
                                         attributes_json=attributes), forward_to=to)


def _set(store, uid: str, status: str = "COMPLETED", *, to=(PACS,)) -> None:
    with store.writing() as s:
        record_mpps_set(s, MppsSet(uid, status, end=NOW, attributes_json='{"y": 2}'),
                        forward_to=to)


def forwarded_step(store, uid: str, destination: MppsDestination = PACS) -> None:
    """An MPPS created, then updated, each change queued for ``destination``."""
    _create(store, uid, to=(destination,))
    _set(store, uid, "IN PROGRESS", to=(destination,))


def _rows(store) -> list[tuple[str, str, str, str]]:
    with store.reading() as s:
        return [tuple(r) for r in s.execute(
            select(MppsForward.destination, MppsForward.sop_instance_uid,
                   MppsForward.operation, MppsForward.state).order_by(MppsForward.id))]


def _due(store, destination: MppsDestination = PACS, now: dt.datetime = NOW,
         ) -> list[tuple[str, str]]:
    with store.reading() as s:
        return [(row.sop_instance_uid, row.operation)
                for row in mpps_forward.deliverable(s, destination.key, 10, now=now)]


def _fail(store, uid: str, outcome: str = Outcome.NEGATIVE) -> str:
    with store.writing() as s:
        row = s.scalars(select(MppsForward).where(
            MppsForward.sop_instance_uid == uid, MppsForward.state == OutboxState.PENDING)
            .order_by(MppsForward.id)).first()
        return mpps_forward.record_failure(s, row.id, "0x0110 from PACS", outcome=outcome,
                                           policy=POLICY, now=NOW)


def test_each_accepted_change_is_queued_per_destination_in_its_transaction(store):
    _create(store, "1.1", to=(PACS, ARCHIVE))
    _set(store, "1.1", "IN PROGRESS", to=(PACS, ARCHIVE))
    with pytest.raises(MppsError):
        _create(store, "1.1", to=(PACS, ARCHIVE))  # duplicate: refused, nothing forwarded
    with pytest.raises(MppsError):
        _set(store, "9.9", to=(PACS, ARCHIVE))  # unknown instance: likewise
    _create(store, "1.2", to=())  # forwarding off: nothing queued
    assert _rows(store) == [
        (PACS.key, "1.1", "create", "pending"), (ARCHIVE.key, "1.1", "create", "pending"),
        (PACS.key, "1.1", "set", "pending"), (ARCHIVE.key, "1.1", "set", "pending"),
    ]
    with store.reading() as s:
        kept = s.scalars(select(MppsForward.dataset_json).order_by(MppsForward.id)).all()
    assert kept == ['{"x": 1}', '{"x": 1}', '{"y": 2}', '{"y": 2}']


def test_a_set_waits_behind_its_failing_create_other_instances_do_not(store):
    _create(store, "1.1")
    _set(store, "1.1")
    _create(store, "1.2")
    # All due: the create comes before its set in the same list, the caller keeps the order.
    assert _due(store) == [("1.1", "create"), ("1.1", "set"), ("1.2", "create")]
    assert _due(store, ARCHIVE) == []

    assert _fail(store, "1.1") == OutboxState.PENDING
    assert _due(store) == [("1.2", "create")]  # 1.1's create backs off, its set waits
    later = NOW + POLICY.delay(1) + dt.timedelta(seconds=1)
    assert _due(store, now=later) == [("1.1", "create"), ("1.1", "set"), ("1.2", "create")]

    assert _fail(store, "1.1") == OutboxState.FAILED  # second failure status: max_attempts
    assert _due(store, now=later) == [("1.2", "create")]  # a dead create holds its set


def test_unreachable_only_delays_and_a_rejection_dead_letters_at_once(store):
    _create(store, "1.1")
    _create(store, "1.2")
    for _ in range(POLICY.max_attempts + 2):
        assert _fail(store, "1.1", Outcome.UNREACHABLE) == OutboxState.PENDING
    with store.reading() as s:
        row = s.scalars(select(MppsForward).where(MppsForward.sop_instance_uid == "1.1")).one()
        assert (row.attempts, row.refusals, row.last_error) == (4, 0, "0x0110 from PACS")
        assert row.next_attempt_at == NOW + POLICY.delay(4)
    assert _fail(store, "1.2", Outcome.REJECTED) == OutboxState.FAILED


def test_retry_and_drop(store):
    _create(store, "1.1")
    _set(store, "1.1")
    _fail(store, "1.1", Outcome.REJECTED)
    with store.writing() as s:
        assert mpps_forward.retry(s, None) == 1
        assert mpps_forward.retry(s, None) == 0  # nothing failed any more
    assert _due(store) == [("1.1", "create"), ("1.1", "set")]

    _fail(store, "1.1", Outcome.REJECTED)
    with store.reading() as s:
        failed = mpps_forward.list_forwards(s, OutboxState.FAILED)
    # Attempts add up; refusals restart from zero after an administrator's retry.
    assert [(row.operation, row.attempts, row.refusals) for row in failed] == [("create", 2, 1)]
    with store.writing() as s:
        dropped = mpps_forward.drop(s, failed[0].id)
        assert dropped is not None and dropped.operation == "create"
    assert _due(store) == [("1.1", "set")]  # no longer held behind the dropped create
    with store.writing() as s:
        set_id = mpps_forward.deliverable(s, PACS.key, 10, now=NOW)[0].id
        mpps_forward.mark_sent(s, set_id)
        assert mpps_forward.drop(s, set_id) is None  # a sent row is history, not dropped
    assert _rows(store) == [(PACS.key, "1.1", "set", "sent")]


def test_one_broker_at_a_time_delivers_to_a_destination(store):
    with mpps_forward.destination_lock(store, PACS.key) as first:
        assert first
        with mpps_forward.destination_lock(store, ARCHIVE.key) as other:
            assert other  # another destination is not held
        with mpps_forward.destination_lock(store, PACS.key) as second:
            assert second is False  # another broker on the same database stands aside
    with mpps_forward.destination_lock(store, PACS.key) as again:
        assert again  # released at the end of the block
