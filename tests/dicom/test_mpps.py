"""MPPS over real associations: send_mpps against the SCP, item status, outbox, refusals, and
N-GET of the MPPS Retrieve SOP Class."""

from __future__ import annotations

import json

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select

from broker.dicom.mpps_scu import MppsScuError, create_dataset, mpps_uid_for, send_mpps
from broker.domain import ItemStatus
from broker.models import MPPSTracking, OutboxMessage, WorklistItem
from broker.store import Store
from tests.dicom.conftest import Running, start_server
from tests.dicom.scu import find, n_get
from tests.support import free_port


def mpps(running: Running, action: str, accession: str, **options: object):
    return send_mpps(action, accession=accession, host="127.0.0.1",  # type: ignore[arg-type]
                     port=running.port, timeout=10, **options)  # type: ignore[arg-type]


def item_status(store: Store, accession: str) -> str:
    with store.reading() as session:
        return session.scalars(select(WorklistItem.status).where(
            WorklistItem.accession_number == accession)).one()


def outbox(store: Store) -> list[tuple[str, str]]:
    with store.reading() as session:
        return [(row.accession_number, row.event) for row in session.execute(
            select(OutboxMessage.accession_number, OutboxMessage.event)
            .order_by(OutboxMessage.id))]


def step_status(running: Running, accession: str) -> list[str]:
    identifier = Dataset()
    identifier.AccessionNumber = accession
    step = Dataset()
    step.ScheduledProcedureStepStatus = ""
    identifier.ScheduledProcedureStepSequence = [step]
    result = find(running.port, identifier)
    return [r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus
            for r in result.identifiers]


def test_in_progress_then_completed(running: Running):
    started = mpps(running, "in-progress", "ACC-MR-1", modality="MR",
                   study_instance_uid="1.2.3.12")
    assert (started.status, started.error_comment) == (0, None)
    assert started.sop_instance_uid == mpps_uid_for("ACC-MR-1")
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.IN_PROGRESS
    assert step_status(running, "ACC-MR-1") == ["STARTED"]  # still on the worklist

    completed = mpps(running, "completed", "ACC-MR-1")
    assert completed.status == 0
    assert completed.sop_instance_uid == started.sop_instance_uid
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.COMPLETED
    assert outbox(running.store) == [("ACC-MR-1", "IP"), ("ACC-MR-1", "CM")]
    assert step_status(running, "ACC-MR-1") == []  # a completed step leaves the worklist

    with running.store.reading() as session:
        record = session.scalars(select(MPPSTracking)).one()
    assert record.calling_ae_title == "MPPS_SCU"
    assert record.performed_station_ae_title == "MPPS_SCU"
    assert record.start_datetime is not None and record.end_datetime is not None
    kept = json.loads(record.attributes_json or "{}")
    assert kept["00400252"]["Value"] == ["COMPLETED"]  # the N-SET's dataset, for audits


def test_discontinued(running: Running):
    assert mpps(running, "in-progress", "ACC-CT-1").status == 0
    assert mpps(running, "discontinued", "ACC-CT-1").status == 0
    assert item_status(running.store, "ACC-CT-1") == ItemStatus.DISCONTINUED
    assert outbox(running.store) == [("ACC-CT-1", "IP"), ("ACC-CT-1", "DC")]


def test_refusals_carry_the_standard_status(running: Running):
    assert mpps(running, "in-progress", "ACC-MR-2").status == 0
    duplicate = mpps(running, "in-progress", "ACC-MR-2")
    assert duplicate.status == 0x0111
    assert duplicate.error_comment and "already exists" in duplicate.error_comment

    unknown = mpps(running, "completed", "NO-SUCH-ACC")
    assert unknown.status == 0x0112

    assert mpps(running, "completed", "ACC-MR-2").status == 0
    again = mpps(running, "discontinued", "ACC-MR-2")
    assert (again.status, again.error_id) == (0x0110, 0xA710)
    assert again.error_comment == "Performed Procedure Step Object may no longer be updated"
    assert item_status(running.store, "ACC-MR-2") == ItemStatus.COMPLETED
    assert outbox(running.store) == [("ACC-MR-2", "IP"), ("ACC-MR-2", "CM")]


def _raw_create(port: int, dataset: Dataset, uid: str) -> Dataset:
    ae = AE(ae_title="RAW_SCU")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, uid)
    finally:
        assoc.release()
    return status


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_missing_or_invalid_attributes(running: Running):
    dataset = create_dataset(accession="ACC-MR-1", calling_aet="RAW_SCU", modality="MR",
                             study_instance_uid=None)
    del dataset.PerformedProcedureStepStatus
    missing = _raw_create(running.port, dataset, "1.2.826.0.1.3680043.10.1491.7.1")
    assert missing.Status == 0x0120
    assert "PerformedProcedureStepStatus" in missing.ErrorComment

    dataset.PerformedProcedureStepStatus = "COMPLETED"
    wrong = _raw_create(running.port, dataset, "1.2.826.0.1.3680043.10.1491.7.2")
    assert wrong.Status == 0x0106

    dataset.PerformedProcedureStepStatus = "IN PROGRESS"
    modality = dataset.Modality
    del dataset.Modality  # Type 1 in N-CREATE (PS3.4 table F.7.2-1)
    no_modality = _raw_create(running.port, dataset, "1.2.826.0.1.3680043.10.1491.7.4")
    assert (no_modality.Status, no_modality.ErrorComment) == (
        0x0120, "Modality is required in N-CREATE")
    dataset.Modality = modality
    dataset.PerformedProcedureStepStartDate = "yesterday"
    bad_date = _raw_create(running.port, dataset, "1.2.826.0.1.3680043.10.1491.7.3")
    assert bad_date.Status == 0x0106
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.SCHEDULED
    assert outbox(running.store) == []


def test_unreachable_broker_is_a_clear_error():
    with pytest.raises(MppsScuError, match="cannot reach"):
        send_mpps("in-progress", accession="X", host="127.0.0.1", port=free_port(), timeout=5)


def test_rejected_association_is_a_clear_error(worklist_store):
    server = start_server(worklist_store, allowed_calling_ae_titles=["CT01"])
    try:
        with pytest.raises(MppsScuError, match="rejected"):
            send_mpps("in-progress", accession="ACC-CT-1", host="127.0.0.1", port=server.port,
                      calling_aet="STRANGER", timeout=5)
        assert send_mpps("in-progress", accession="ACC-CT-1", host="127.0.0.1",
                         port=server.port, calling_aet="CT01", timeout=5).status == 0
    finally:
        server.stop()


def test_uid_is_derived_from_the_accession():
    uid = mpps_uid_for("ACC-1")
    assert uid == mpps_uid_for("ACC-1") != mpps_uid_for("ACC-2")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()


def test_n_get_returns_the_requested_attributes_of_the_kept_step(running: Running):
    started = mpps(running, "in-progress", "ACC-MR-1", modality="MR",
                   study_instance_uid="1.2.3.12")
    uid = started.sop_instance_uid
    status, during = n_get(running.port, uid, [0x00400252, 0x00080060])
    assert status.Status == 0
    assert (during.PerformedProcedureStepStatus, during.Modality) == ("IN PROGRESS", "MR")
    assert mpps(running, "completed", "ACC-MR-1").status == 0

    status, after = n_get(running.port, uid, [
        0x00400252,  # Performed Procedure Step Status: the N-SET's value
        0x00400250,  # Performed Procedure Step End Date: set by the N-SET only
        0x00400270,  # Scheduled Step Attributes Sequence: the N-CREATE's, whole
        0x00101010,  # Patient's Age: never sent, so not returned
    ])
    assert status.Status == 0
    assert after.PerformedProcedureStepStatus == "COMPLETED"
    assert after.PerformedProcedureStepEndDate
    assert after.ScheduledStepAttributesSequence[0].AccessionNumber == "ACC-MR-1"
    assert "PatientAge" not in after and "Modality" not in after
    assert after.SpecificCharacterSet == "ISO_IR 192"  # the values' character set comes along

    status, everything = n_get(running.port, uid, [])
    assert status.Status == 0
    assert everything.PerformedStationAETitle == "MPPS_SCU"
    assert everything.PerformedProcedureStepStatus == "COMPLETED"


def test_n_get_of_an_unknown_instance_is_0112(running: Running):
    status, attributes = n_get(running.port, "1.2.826.0.1.3680043.10.1491.9.9", [0x00400252])
    assert status.Status == 0x0112
    assert attributes is None
    assert "no MPPS" in status.ErrorComment
