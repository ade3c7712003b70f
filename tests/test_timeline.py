"""The console's core read models on both backends: the exposure and query record, the
operator actions log, the order timeline and the purge's part in them."""

from __future__ import annotations

import datetime as dt

from broker import cfind_log, outbox
from broker.cfind_log import AskedQuery, Exposure
from broker.domain import (
    MppsCreate,
    MppsSet,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
)
from broker.models import utcnow
from broker.mpps import record_mpps_create, record_mpps_set
from broker.operator_actions import list_actions, record_action
from broker.orders import apply_order
from broker.purge import Retention, purge
from broker.store import Store
from broker.timeline import KINDS, order_timeline

T0 = dt.datetime(2026, 11, 29, 8, 0)


def _order(store: Store, accession: str, start: dt.datetime | None = None) -> None:
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="DOE^JANE"),
                             ProcedureData(accession, modality="CT", scheduled_start=start)),
                    uid_root="1.2.3")


def _started(store: Store, accession: str, mpps_uid: str) -> None:
    """An order, and CT1's N-CREATE for it."""
    _order(store, accession, T0)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate(mpps_uid, "IN PROGRESS",
                                         (ScheduledStepRef(accession_number=accession),),
                                         calling_ae_title="CT1"))


def test_exposure_batches_add_up_whatever_order_they_arrive_in(store: Store):
    later = T0 + dt.timedelta(hours=1)
    with store.writing() as s:
        cfind_log.write_exposures(s, [Exposure("CT1", "A1", later, later, 2),
                                      Exposure("MR1", "A1", T0, T0, 1)])
    with store.writing() as s:  # an older batch from a second broker, written late
        cfind_log.write_exposures(s, [Exposure("CT1", "A1", T0, T0 + dt.timedelta(minutes=5),
                                               3)])
    with store.reading() as s:
        found = cfind_log.exposures_of(s, "A1")
    assert found == [Exposure("CT1", "A1", T0, later, 5), Exposure("MR1", "A1", T0, T0, 1)]


def test_only_the_newest_queries_of_each_calling_ae_are_kept(store: Store):
    def asked(n: int, ae: str = "CT1", minute: int | None = None) -> AskedQuery:
        at = T0 + dt.timedelta(minutes=n if minute is None else minute)
        return AskedQuery(ae, f"d{n}", f'{{"n": {n}}}', at, at, 1, n)

    with store.writing() as s:
        cfind_log.write_queries(s, [asked(n) for n in range(4)] + [asked(9, "MR1")], keep=3)
    with store.writing() as s:
        cfind_log.write_queries(s, [asked(1, minute=6), asked(5)], keep=3)  # d1 asked again
    with store.reading() as s:
        kept = cfind_log.recent_queries(s, "CT1", limit=10)
        assert [(q.digest, q.count) for q in kept] == [("d1", 2), ("d5", 1), ("d3", 1)]
        assert [q.digest for q in cfind_log.recent_queries(s, "MR1")] == ["d9"]
        assert cfind_log.recorded_calling_aes(s) == ["CT1", "MR1"]


def test_operator_actions_are_listed_newest_first(store: Store):
    with store.writing() as s:
        record_action(s, user="alice", action="retry", accession_number="A1",
                      target="outbox message 3", detail="dead letter sent again")
        record_action(s, user="bob", action="worklist-create", accession_number="A2",
                      target="worklist item A2", detail="created over REST")
        record_action(s, user="alice", action="replay", accession_number=None,
                      target="inbound message 9", detail="ACK AA")
    with store.reading() as s:
        assert [a.action for a in list_actions(s)] == ["replay", "worklist-create", "retry"]
        assert [a.target for a in list_actions(s, accession_number="A1")] == [
            "outbox message 3"]
        assert [a.action for a in list_actions(s, user="alice", limit=1)] == ["replay"]


def test_timeline_reads_mpps_outbox_exposure_and_actions_oldest_first(store: Store):
    _started(store, "A1", "1.2.3.9")
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.2.3.9", "DISCONTINUED", end=utcnow()))
        messages = outbox.list_messages(s)
    first, second = sorted(m.id for m in messages)
    with store.writing() as s:
        outbox.mark_sent(s, first)
        outbox.record_failure(s, second, "RIS answered AR: no", outcome=outbox.Outcome.REJECTED)
        cfind_log.write_exposures(s, [Exposure("CT1", "A1", utcnow(), utcnow(), 4)])
        record_action(s, user="alice", action="drop", accession_number="A1",
                      target=f"outbox message {second}", detail="dropped the DC message")
    with store.reading() as s:
        events = order_timeline(s, "A1")
        assert order_timeline(s, "NOPE") == []
    assert {e.kind for e in events} <= set(KINDS)
    assert [e.at for e in events] == sorted(e.at for e in events)
    titles = [e.title for e in events]
    assert "MPPS N-CREATE: IN PROGRESS" in titles and "MPPS N-SET: DISCONTINUED" in titles
    assert "status message ORC-5 IP sent, ACKed by the RIS" in titles
    dead = next(e for e in events if e.title == "status message ORC-5 DC dead-lettered")
    assert "RIS answered AR: no" in dead.detail
    cfind = next(e for e in events if e.kind == "cfind")
    assert cfind.ref["calling_ae"] == "CT1" and cfind.ref["count"] == 4
    operator = next(e for e in events if e.kind == "operator")
    assert operator.title == "drop by alice" and operator.ref["user"] == "alice"


def test_purge_takes_the_exposure_with_the_item_and_shows_in_the_timeline(store: Store):
    now = dt.datetime(2026, 11, 29, 12, 0)
    _order(store, "OLD", now - dt.timedelta(days=40))
    _order(store, "NEW", now - dt.timedelta(days=1))
    with store.writing() as s:
        cfind_log.write_exposures(s, [Exposure("CT1", "OLD", T0, T0, 1),
                                      Exposure("CT1", "NEW", T0, T0, 1)])
    assert purge(store, retention=Retention(), now=now).worklist_items == 1
    with store.reading() as s:
        assert cfind_log.exposures_of(s, "OLD") == []
        assert len(cfind_log.exposures_of(s, "NEW")) == 1
        events = order_timeline(s, "OLD")
        assert [(e.kind, e.title, e.at) for e in events] == [
            ("purge", "Purged by the retention rules", now)]
        assert [e.kind for e in order_timeline(s, "NEW")] == ["cfind"]


def test_exposure_of_an_item_deleted_otherwise_is_swept_with_the_inbound_log(store: Store):
    now = dt.datetime(2026, 11, 29, 12, 0)
    with store.writing() as s:
        cfind_log.write_exposures(s, [
            Exposure("CT1", "GONE-OLD", T0 - dt.timedelta(days=40), now - dt.timedelta(days=31),
                     1),
            Exposure("CT1", "GONE-RECENT", T0, now - dt.timedelta(days=1), 1)])
    purge(store, retention=Retention(), now=now)
    with store.reading() as s:
        assert cfind_log.exposures_of(s, "GONE-OLD") == []
        assert len(cfind_log.exposures_of(s, "GONE-RECENT")) == 1


def test_an_mpps_only_created_shows_no_n_set(store: Store):
    # Created and updated times were taken one after the other, microseconds apart: every
    # MPPS showed an "N-SET: IN PROGRESS" that no modality sent.
    _started(store, "A2", "1.2.3.10")
    with store.reading() as s:
        created = [e.title for e in order_timeline(s, "A2") if e.kind == "mpps"]
    assert created == ["MPPS N-CREATE: IN PROGRESS"]
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.2.3.10", None, attributes_json='{"00400254": '
                                   '{"vr": "LO", "Value": ["CT HEAD"]}}'))
    with store.reading() as s:
        updated = [e.title for e in order_timeline(s, "A2") if e.kind == "mpps"]
    assert updated == ["MPPS N-CREATE: IN PROGRESS", "MPPS N-SET: IN PROGRESS"]
