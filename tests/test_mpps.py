"""MPPS state in the core: linking, item status, and the outbox rows for the RIS."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from broker.domain import (
    ItemStatus,
    MppsCreate,
    MppsSet,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
)
from broker.errors import MppsError
from broker.models import MPPSTracking, OutboxMessage, WorklistItem
from broker.mpps import record_mpps_create, record_mpps_set

END = dt.datetime(2026, 11, 29, 10, 30)


def _orders(store, *accessions: str) -> None:
    from broker.orders import apply_order

    for accession in accessions:
        with store.writing() as s:
            apply_order(s, Order(OrderControl.NEW, PatientData("P1"),
                                 ProcedureData(accession, study_instance_uid=f"1.9.{accession[1:]}",
                                               placer_order_number=f"PL-{accession}")),
                        uid_root="1.2.3")


def _create(store, uid: str, *accessions: str) -> None:
    steps = tuple(ScheduledStepRef(accession_number=a) for a in accessions)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate(uid, "IN PROGRESS", steps))


def _set(store, uid: str, status: str) -> None:
    with store.writing() as s:
        record_mpps_set(s, MppsSet(uid, status, end=END))


def _statuses(store) -> dict[str, str]:
    with store.reading() as s:
        return dict(s.execute(select(WorklistItem.accession_number, WorklistItem.status)).all())


def _outbox(store) -> list[tuple[str, str]]:
    with store.reading() as s:
        return [tuple(r) for r in s.execute(select(OutboxMessage.accession_number,
                                                   OutboxMessage.event)
                                            .order_by(OutboxMessage.id))]


def test_group_case_reports_every_linked_order(store):
    _orders(store, "A1", "A2")
    _create(store, "1.5.1", "A1", "A2")
    _set(store, "1.5.1", "COMPLETED")
    assert _statuses(store) == {"A1": ItemStatus.COMPLETED, "A2": ItemStatus.COMPLETED}
    assert _outbox(store) == [("A1", "IP"), ("A2", "IP"), ("A1", "CM"), ("A2", "CM")]


def test_append_case_completes_the_step_only_with_its_last_mpps(store):
    _orders(store, "A1")
    _create(store, "1.5.1", "A1")
    _create(store, "1.5.2", "A1")
    _set(store, "1.5.1", "COMPLETED")
    assert _statuses(store) == {"A1": ItemStatus.IN_PROGRESS}
    _set(store, "1.5.2", "COMPLETED")
    assert _statuses(store) == {"A1": ItemStatus.COMPLETED}
    assert _outbox(store) == [("A1", "IP"), ("A1", "CM")]


def test_unscheduled_mpps_is_kept_and_reports_nothing(store):
    _create(store, "1.5.9", "NO-SUCH-ORDER")
    with store.reading() as s:
        record = s.scalars(select(MPPSTracking)).one()
        assert record.items == [] and record.status == "IN PROGRESS"
    assert _outbox(store) == []


@pytest.mark.parametrize(("steps", "status"), [
    (lambda store: _create(store, "1.5.1", "A1"), 0x0111),  # duplicate SOP instance
    (lambda store: _set(store, "1.5.404", "COMPLETED"), 0x0112),  # no such SOP instance
    (lambda store: (_set(store, "1.5.1", "COMPLETED"), _set(store, "1.5.1", "DISCONTINUED")),
     0x0110),  # no update after a final state (PS3.4 F.7.2.2)
])
def test_refusals_carry_the_dicom_status_and_change_nothing(store, steps, status):
    _orders(store, "A1")
    _create(store, "1.5.1", "A1")
    before = _outbox(store)
    with pytest.raises(MppsError) as info:
        steps(store)
    assert info.value.status == status
    if status != 0x0110:
        assert _outbox(store) == before


@pytest.mark.parametrize(("request_", "named"), [
    (MppsCreate("1.5.2", "IN PROGRESS", (ScheduledStepRef(accession_number="A1"),),
                performed_station_ae_title="C\x00T"), "PerformedStationAETitle"),
    (MppsCreate("1.5.2", "IN PROGRESS", (ScheduledStepRef(accession_number="A\x001"),)),
     "AccessionNumber"),
    (MppsCreate("1.5.\x002", "IN PROGRESS", (ScheduledStepRef(accession_number="A1"),)),
     "AffectedSOPInstanceUID"),
])
def test_a_nul_in_what_the_broker_stores_or_looks_up_is_0106_naming_it(store, request_,
                                                                      named):
    # SQLite stored it; PostgreSQL failed the N-CREATE as a database error (0x0110).
    _orders(store, "A1")
    with pytest.raises(MppsError) as info, store.writing() as s:
        record_mpps_create(s, request_)
    assert info.value.status == 0x0106
    assert info.value.comment.startswith(f"{named} holds a NUL character")
    assert _statuses(store) == {"A1": ItemStatus.SCHEDULED}
    with store.reading() as s:
        assert s.scalars(select(MPPSTracking.id)).all() == []


def test_create_must_be_in_progress(store):
    _orders(store, "A1")
    with pytest.raises(MppsError) as info, store.writing() as s:
        record_mpps_create(s, MppsCreate("1.5.1", "COMPLETED",
                                         (ScheduledStepRef(accession_number="A1"),)))
    assert info.value.status == 0x0106
    assert _statuses(store) == {"A1": ItemStatus.SCHEDULED}


def test_final_state_needs_the_end_date_and_time(store):
    _orders(store, "A1")
    _create(store, "1.5.1", "A1")
    with pytest.raises(MppsError) as info, store.writing() as s:
        record_mpps_set(s, MppsSet("1.5.1", "COMPLETED"))
    assert info.value.status == 0x0110 and "EndDate" in info.value.comment
    assert _statuses(store) == {"A1": ItemStatus.IN_PROGRESS}
    _set(store, "1.5.1", "DISCONTINUED")  # with the end: accepted
    assert _statuses(store) == {"A1": ItemStatus.DISCONTINUED}


def test_study_uid_link_is_narrowed_by_the_sps_id(store):
    from broker.orders import apply_order

    for accession, sps in (("S1", "SPS-A"), ("S2", "SPS-B")):
        with store.writing() as s:
            apply_order(s, Order(OrderControl.NEW, PatientData("P1"),
                                 ProcedureData(accession, study_instance_uid="1.9.77",
                                               sps_id=sps)), uid_root="1.2.3")
    with store.writing() as s:
        result = record_mpps_create(s, MppsCreate("1.5.3", "IN PROGRESS", (
            ScheduledStepRef(study_instance_uid="1.9.77", sps_id="SPS-B"),)))
    assert result.linked_accessions == ("S2",)
    with store.writing() as s:
        result = record_mpps_create(s, MppsCreate("1.5.4", "IN PROGRESS", (
            ScheduledStepRef(study_instance_uid="1.9.77"),)))
    assert sorted(result.linked_accessions) == ["S1", "S2"]
