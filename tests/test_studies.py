"""record_study_arrival: a stable study in the PACS completes, hides or only records the
orders it matches; the change feed cursor moves in the same transaction."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from broker import outbox
from broker.config import StatusMessagesConfig
from broker.domain import (
    ItemStatus,
    MppsCreate,
    MppsSet,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
    StatusKind,
    StudyAction,
    StudyArrival,
)
from broker.models import OutboxMessage, StudyRecord, WorklistItem
from broker.mpps import record_mpps_create, record_mpps_set
from broker.orders import apply_order
from broker.studies import (
    FeedMoved,
    advance_feed,
    feed_position,
    list_studies,
    record_study_arrival,
    start_feed,
    studies_for_accession,
)

SOURCE = "http://127.0.0.1:8042"


def _order(store, accession: str, patient: str = "P1", uid: str | None = None) -> None:
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData(patient, patient_name="DOE^JANE"),
                             ProcedureData(accession, study_instance_uid=uid, modality="CT",
                                           placer_order_number=f"PL-{accession}")),
                    uid_root="1.2.3")


def _study(source_id: str = "s1", *, uid: str | None = None, accession: str | None = None,
           patient: str | None = "P1", instances: int = 12) -> StudyArrival:
    return StudyArrival(source=SOURCE, source_id=source_id, study_instance_uid=uid,
                        accession_number=accession, patient_id=patient, modalities=("CT", "SR"),
                        number_of_series=2, number_of_instances=instances,
                        study_date=dt.date(2026, 11, 29), study_time=dt.time(9, 41))


def _arrive(store, study: StudyArrival, on_study: StudyAction = StudyAction.COMPLETE,
            messages: StatusMessagesConfig | None = None):
    with store.writing() as s:
        return record_study_arrival(s, study, on_study=on_study,
                                    policy=(messages or StatusMessagesConfig()).reporting())


def _status(store, accession: str) -> str:
    with store.reading() as s:
        return s.scalar(select(WorklistItem.status).where(
            WorklistItem.accession_number == accession))


def _events(store):
    with store.reading() as s:
        return [outbox.decode_event(p) for p in s.scalars(
            select(OutboxMessage.payload_json).order_by(OutboxMessage.id))]


def test_a_study_completes_its_order_once_with_the_mpps_completion_message(store):
    _order(store, "ACC1", uid="1.2.3.100")
    result = _arrive(store, _study(uid="1.2.3.100"))
    assert result.matched_by == "study_uid" and result.changed_accessions == ("ACC1",)
    assert _status(store, "ACC1") == ItemStatus.COMPLETED
    [event] = _events(store)
    # The message an MPPS COMPLETED writes: same kind, ORC-5, order fields.
    assert event.status_kind is StatusKind.COMPLETED and event.order_status == "CM"
    assert (event.accession_number, event.placer_order_number) == ("ACC1", "PL-ACC1")
    assert event.study_instance_uid == "1.2.3.100" and event.modality == "CT"
    assert event.number_of_images == 12
    assert event.performed_start == dt.datetime(2026, 11, 29, 9, 41)

    # Orthanc reports the study stable again when instances are added: counts follow,
    # nothing is sent twice.
    again = _arrive(store, _study(uid="1.2.3.100", instances=14))
    assert again.repeated and again.changed_accessions == ()
    assert len(_events(store)) == 1
    with store.reading() as s:
        [record] = studies_for_accession(s, "ACC1")
        assert (record.number_of_instances, record.modalities, record.action) == (
            14, "CT\\SR", "completed")
        assert record.performed_at == dt.datetime(2026, 11, 29, 9, 41)


def test_accession_matches_only_with_the_same_patient_and_unmatched_studies_are_kept(store):
    _order(store, "ACC2", patient="P2")
    stranger = _arrive(store, _study("s2", uid="9.9.1", accession="ACC2", patient="OTHER"))
    assert stranger.matched_accessions == ()
    assert _status(store, "ACC2") == ItemStatus.SCHEDULED
    result = _arrive(store, _study("s3", uid="9.9.2", accession="ACC2", patient="P2"))
    assert result.matched_by == "accession" and _status(store, "ACC2") == ItemStatus.COMPLETED
    with store.reading() as s:
        assert [r.source_id for r in list_studies(s, unmatched=True)] == ["s2"]
        assert {r.source_id for r in studies_for_accession(s, "ACC2")} == {"s2", "s3"}

    # The order came after the images: the next stable report of the study matches it.
    _order(store, "ACC3", uid="9.9.4")
    _arrive(store, _study("s4", uid="9.9.4-not-yet"))
    late = _arrive(store, _study("s4", uid="9.9.4"))
    assert late.repeated and late.changed_accessions == ("ACC3",)
    with store.reading() as s:
        assert [r.source_id for r in list_studies(s, unmatched=True)] == ["s2"]


def _mpps(store, uid: str, accession: str, status: str | None = None) -> None:
    with store.writing() as s:
        if status is None:
            record_mpps_create(s, MppsCreate(uid, "IN PROGRESS",
                                             (ScheduledStepRef(accession_number=accession),)))
        else:
            record_mpps_set(s, MppsSet(uid, status, end=dt.datetime(2026, 11, 29, 10)))


def test_the_completion_is_never_sent_twice_whoever_comes_first(store):
    _order(store, "ACC5", uid="5.5")
    _mpps(store, "1.5.5", "ACC5")
    _mpps(store, "1.5.5", "ACC5", "COMPLETED")
    assert [e.order_status for e in _events(store)] == ["IP", "CM"]
    assert _arrive(store, _study("s5", uid="5.5")).changed_accessions == ()
    assert [e.order_status for e in _events(store)] == ["IP", "CM"]

    _order(store, "ACC6", uid="6.6")
    _mpps(store, "1.6.6", "ACC6")
    _arrive(store, _study("s6", uid="6.6"))
    _mpps(store, "1.6.6", "ACC6", "COMPLETED")  # the modality's MPPS after the images
    assert [(e.accession_number, e.order_status) for e in _events(store)] == [
        ("ACC5", "IP"), ("ACC5", "CM"), ("ACC6", "IP"), ("ACC6", "CM")]
    assert _status(store, "ACC6") == ItemStatus.COMPLETED


def test_hide_none_and_study_received(sqlite_store):
    store = sqlite_store
    for accession in ("H1", "N1", "R1"):
        _order(store, accession, uid=f"7.{accession}")
    _mpps(store, "1.7.1", "H1")
    _arrive(store, _study("h", uid="7.H1"), StudyAction.HIDE)
    assert _status(store, "H1") == ItemStatus.COMPLETED  # off the worklist
    assert [e.order_status for e in _events(store)] == ["IP"]  # ...without a message
    _mpps(store, "1.7.1", "H1", "COMPLETED")  # the MPPS still tells the RIS
    assert [e.order_status for e in _events(store)] == ["IP", "CM"]

    _arrive(store, _study("n", uid="7.N1"), StudyAction.NONE)
    assert _status(store, "N1") == ItemStatus.SCHEDULED

    messages = StatusMessagesConfig(study_received={"send": True, "message_type": "ORU^R01"})
    _arrive(store, _study("r", uid="7.R1"), messages=messages)
    kinds = [(e.status_kind, e.order_status) for e in _events(store)[2:]]
    assert kinds == [(StatusKind.COMPLETED, "CM"), (StatusKind.STUDY_RECEIVED, "CM")]
    with store.reading() as s:
        actions = dict(s.execute(select(StudyRecord.source_id, StudyRecord.action)).all())
    assert actions == {"h": "hidden", "n": "none", "r": "completed"}


def test_the_feed_cursor_moves_compare_and_set(store):
    with store.writing() as s:
        assert feed_position(s, SOURCE) is None
        start_feed(s, SOURCE, 40)
    _order(store, "ACC8", uid="8.8")
    with pytest.raises(FeedMoved), store.writing() as s:
        record_study_arrival(s, _study("s8", uid="8.8"))
        advance_feed(s, SOURCE, 39, 50)  # another broker moved it: all of this rolls back
    assert _status(store, "ACC8") == ItemStatus.SCHEDULED
    with store.writing() as s:
        record_study_arrival(s, _study("s8", uid="8.8"))
        advance_feed(s, SOURCE, 40, 50)
    with store.reading() as s:
        assert feed_position(s, SOURCE) == 50
    assert _status(store, "ACC8") == ItemStatus.COMPLETED


def test_the_purge_takes_study_records_whose_order_is_gone_and_old_unmatched_ones(
        sqlite_store):
    from broker.purge import Retention, purge

    store = sqlite_store
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData(
            "OLD", study_instance_uid="3.1", scheduled_start=dt.datetime(2026, 1, 1))),
            uid_root="1.2.3")
    _order(store, "KEEP", uid="3.2")
    for study in (_study("a", uid="3.1"), _study("b", uid="3.2"), _study("c", uid="3.3")):
        _arrive(store, study)
    later = dt.datetime.now() + dt.timedelta(days=40)
    # Now: the January item goes, its study record (recent) stays, still matched.
    now = purge(store, retention=Retention())
    assert (now.worklist_items, now.studies) == (1, 0)
    with store.reading() as s:
        assert [r.source_id for r in list_studies(s, unmatched=True)] == ["c"]
    # 40 days on, KEEP (by its creation time) and all three study records have aged.
    assert purge(store, retention=Retention(), now=later, dry_run=True).studies == 3
    result = purge(store, retention=Retention(), now=later)
    assert (result.worklist_items, result.studies) == (1, 3)
    with store.reading() as s:
        assert s.scalars(select(StudyRecord.source_id)).all() == []


def test_a_study_shows_in_the_order_timeline_with_its_performed_data(store):
    from broker.timeline import order_timeline

    _order(store, "TL1", uid="1.2.3.77")
    _arrive(store, _study(uid="1.2.3.77", instances=42))
    _arrive(store, _study("s2", accession="TL1", patient="OTHER"))  # no match: same accession
    with store.reading() as s:
        events = [e for e in order_timeline(s, "TL1") if e.kind == "study"]
    assert [e.title for e in events] == [
        "Study stable in the PACS (matched by study uid, completed)",
        "Study stable in the PACS (matched no item)"]
    assert events[0].detail.startswith("42 instances, 2 series, CT/SR, performed 2026-11-29")
    assert "1.2.3.77" in events[0].detail
