from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import func, select

from broker.domain import (
    MppsCreate,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
)
from broker.models import MPPSTracking, Patient, WorklistItem
from broker.mpps import record_mpps_create
from broker.orders import apply_order
from broker.purge import Retention, purge
from broker.store import Store

NOW = dt.datetime(2026, 11, 29, 12, 0)


def _add(store, accession: str, patient: str, days_ago: int) -> None:
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData(patient),
                             ProcedureData(accession, modality="CT",
                                           scheduled_start=NOW - dt.timedelta(days=days_ago))),
                    uid_root="1.2.3")


def test_purge_deletes_expired_items_with_their_mpps_and_orphan_patients(store):
    _add(store, "OLD1", "P-OLD", 40)
    _add(store, "OLD2", "P-BOTH", 31)
    _add(store, "NEW1", "P-BOTH", 29)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.2.3.4", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="OLD1"),)))
    dry = purge(store, retention=Retention(), now=NOW, dry_run=True)
    assert (dry.worklist_items, dry.mpps) == (2, 1)
    with store.reading() as s:
        assert s.scalar(select(func.count(WorklistItem.id))) == 3  # dry run changed nothing
    result = purge(store, retention=Retention(), now=NOW)
    assert (result.worklist_items, result.mpps, result.patients) == (2, 1, 1)
    with store.reading() as s:
        assert list(s.scalars(select(WorklistItem.accession_number))) == ["NEW1"]
        assert list(s.scalars(select(Patient.patient_id))) == ["P-BOTH"]
        assert s.scalar(select(func.count(MPPSTracking.id))) == 0


def test_separate_retention_per_status_and_pending_outbox_is_kept(store):
    from broker.domain import MppsSet
    from broker.models import OutboxMessage
    from broker.mpps import record_mpps_set

    _add(store, "DONE", "P1", 10)
    _add(store, "CANC", "P2", 10)
    _add(store, "TODO", "P3", 10)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.2.3.5", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="DONE"),)))
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.2.3.5", "COMPLETED", end=NOW))
    with store.writing() as s:
        apply_order(s, Order(OrderControl.CANCEL, PatientData("P2"), ProcedureData("CANC")),
                    uid_root="1.2.3")
    rules = Retention(completed_days=5, cancelled_days=5, unperformed_days=60, mpps_days=5,
                      outbox_days=5)
    result = purge(store, retention=rules, now=NOW)
    assert result.worklist_items == 2
    with store.reading() as s:
        assert list(s.scalars(select(WorklistItem.accession_number))) == ["TODO"]
        # The unsent IP/CM for the purged order stay: they are still owed to the RIS.
        assert s.scalar(select(func.count(OutboxMessage.id))) == 2


def test_a_second_purge_at_the_same_time_stands_aside(store):
    _add(store, "OLD1", "P-OLD", 40)
    other = Store(store.url, pool_size=2)  # another broker, or the purge command
    try:
        with other.exclusive("purge"):
            skipped = purge(store, retention=Retention(), now=NOW)
        assert skipped.skipped and skipped.worklist_items == 0
        with store.reading() as s:
            assert s.scalar(select(func.count(WorklistItem.id))) == 1
        assert purge(store, retention=Retention(), now=NOW).worklist_items == 1
    finally:
        other.dispose()


def test_sent_mpps_forwards_age_with_the_outbox_and_unsent_ones_stay(store):
    from broker import mpps_forward
    from broker.models import MppsForward
    from tests.test_mpps_forward import forwarded_step

    forwarded_step(store, "1.2.3.6")
    with store.writing() as s:
        create, _ = s.scalars(select(MppsForward).order_by(MppsForward.id)).all()
        mpps_forward.mark_sent(s, create.id)
        create.sent_at = NOW - dt.timedelta(days=6)
    rules = Retention(outbox_days=5, mpps_days=60)
    assert purge(store, retention=rules, now=NOW, dry_run=True).mpps_forwards == 1
    assert purge(store, retention=rules, now=NOW).mpps_forwards == 1
    with store.reading() as s:
        # The N-SET is still owed downstream: it stays, whatever its age.
        assert s.scalars(select(MppsForward.operation)).all() == ["set"]
    assert purge(store, retention=Retention(outbox_days=5), now=NOW + dt.timedelta(days=90)
                 ).mpps_forwards == 0


def test_an_mpps_goes_with_its_last_item_only(store):
    """Group case: one MPPS performed two requested procedures; while one of them is kept, so
    is the MPPS. One that performed two expired ones goes."""
    _add(store, "OLD-A", "P1", 40)
    _add(store, "NEW-A", "P1", 5)
    _add(store, "OLD-B", "P2", 40)
    _add(store, "OLD-C", "P2", 45)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.2.3.10", "IN PROGRESS", (
            ScheduledStepRef(accession_number="OLD-A"),
            ScheduledStepRef(accession_number="NEW-A"))))
        record_mpps_create(s, MppsCreate("1.2.3.11", "IN PROGRESS", (
            ScheduledStepRef(accession_number="OLD-B"),
            ScheduledStepRef(accession_number="OLD-C"))))
    assert purge(store, retention=Retention(), now=NOW, dry_run=True).mpps == 1
    result = purge(store, retention=Retention(), now=NOW)
    assert (result.worklist_items, result.mpps) == (3, 1)
    with store.reading() as s:
        assert list(s.scalars(select(MPPSTracking.sop_instance_uid))) == ["1.2.3.10"]


def test_rounds_and_batches_smaller_than_what_expired(store, monkeypatch):
    """Expired and kept items interleaved: every expired item goes in one run and every kept
    one stays."""
    import broker.purge

    monkeypatch.setattr(broker.purge, "BATCH_SIZE", 2)
    monkeypatch.setattr(broker.purge, "ROUND_SIZE", 3)
    for n in range(9):
        _add(store, f"ACC{n}", f"P{n}", 40 if n % 3 else 1)
    result = purge(store, retention=Retention(), now=NOW)
    assert (result.worklist_items, result.patients) == (6, 6)
    with store.reading() as s:
        assert sorted(s.scalars(select(WorklistItem.accession_number))) == [
            "ACC0", "ACC3", "ACC6"]


def test_the_purge_says_what_it_deleted_and_how_long_it_took(store, caplog):
    import logging

    _add(store, "OLD1", "P-OLD", 400)
    with caplog.at_level(logging.INFO, logger="broker.purge"):
        purge(store, retention=Retention(), now=NOW)
    lines = [r.getMessage() for r in caplog.records if r.name == "broker.purge"]
    assert len(lines) == 1
    assert re.fullmatch(r"purge done items=1 mpps=0 patients=1 outbox=0 inbound=0 "
                        r"mpps_forwards=0 studies=0 audit_events=0 seconds=\d+\.\d", lines[0])


def test_an_item_rescheduled_after_its_ids_were_read_stays(store, monkeypatch):
    """The ids are read a round ahead of their deletion: each batch is checked again in its
    own transaction, so an item the RIS moved to next week meanwhile is not deleted."""
    from contextlib import contextmanager

    import broker.purge

    _add(store, "OLD1", "P1", 40)
    _add(store, "OLD2", "P2", 40)
    writing, calls = store.writing, []

    @contextmanager
    def reschedule_first(*args, **kwargs):
        if not calls:  # after the round's ids were read, before its first batch
            calls.append(1)
            with writing() as other:
                item = other.scalars(select(WorklistItem).where(
                    WorklistItem.accession_number == "OLD2")).one()
                item.scheduled_start = NOW + dt.timedelta(days=7)
        with writing(*args, **kwargs) as session:
            yield session

    monkeypatch.setattr(broker.purge, "BATCH_SIZE", 1)
    monkeypatch.setattr(store, "writing", reschedule_first)
    assert purge(store, retention=Retention(), now=NOW).worklist_items == 1
    with store.reading() as s:
        assert list(s.scalars(select(WorklistItem.accession_number))) == ["OLD2"]


def test_each_purged_item_leaves_a_purge_action_for_its_timeline(store):
    from broker.operator_actions import list_actions

    _add(store, "OLD-ACCESSION-16", "P1", 40)
    _add(store, "KEPT", "P2", 1)
    purge(store, retention=Retention(), now=NOW)
    with store.reading() as s:
        actions = list_actions(s)
    assert [(a.at, a.user, a.action, a.accession_number, a.target, a.detail)
            for a in actions] == [(NOW, "system", "purge", "OLD-ACCESSION-16",
                                   "worklist item OLD-ACCESSION-16", "retention rules")]


def test_a_purge_asked_to_stop_ends_after_its_batch_and_the_next_run_goes_on(store,
                                                                              monkeypatch,
                                                                              caplog):
    """A broker that is stopping sets the event: the purge of a long backlog does not hold
    it up, and what is left goes on the next run."""
    import logging
    import threading
    from contextlib import contextmanager

    import broker.purge

    for n in range(3):
        _add(store, f"OLD{n}", f"P{n}", 40)
    stop = threading.Event()
    writing = store.writing

    @contextmanager
    def stop_during_the_first_batch(*args, **kwargs):
        with writing(*args, **kwargs) as session:
            yield session
        stop.set()

    monkeypatch.setattr(broker.purge, "BATCH_SIZE", 1)
    monkeypatch.setattr(store, "writing", stop_during_the_first_batch)
    with caplog.at_level(logging.INFO, logger="broker.purge"):
        first = purge(store, retention=Retention(), now=NOW, stop=stop)
    assert (first.worklist_items, first.patients, first.stopped) == (1, 0, True)
    assert any(r.getMessage().startswith("purge stopped early items=1 ")
               for r in caplog.records)
    monkeypatch.setattr(store, "writing", writing)
    second = purge(store, retention=Retention(), now=NOW)
    assert (second.worklist_items, second.patients, second.stopped) == (2, 3, False)
    with store.reading() as s:
        assert s.scalar(select(func.count(WorklistItem.id))) == 0


def test_the_brokers_purge_job_stops_with_the_broker(tmp_path):
    from pathlib import Path

    import yaml

    from broker.app import Broker
    from broker.config import load_config
    from broker.store import Store

    path = tmp_path / "broker.yaml"
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path.write_text(yaml.safe_dump({
        "database": {"url": url}, "dicom": {"port": 0}, "hl7": {"port": 0},
        "mapping": str(Path(__file__).resolve().parent.parent / "config" / "mapping.yaml")}))
    broker = Broker(load_config(path, environ={}))
    _add(broker.store, "OLD1", "P1", 400)
    broker.stop()
    broker.run_purge()  # the job, had the scheduler started it as the broker stopped
    other = Store(url)
    try:
        with other.reading() as s:
            assert list(s.scalars(select(WorklistItem.accession_number))) == ["OLD1"]
    finally:
        other.dispose()
