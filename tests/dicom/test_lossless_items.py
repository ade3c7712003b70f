"""Lossless items over the network, on SQLite and PostgreSQL: what a worklist file carried
(allergies, alerts, contrast agent, several stations) reaches the modality; a step scheduled
on two stations is found by each, also by a modality limited to its own items."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from pydicom import Dataset

from broker.config import DicomConfig, ModalityConfig
from broker.dicom.scp import DicomServer
from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.item_dataset import order_from_dataset
from broker.orders import apply_order
from broker.store import Store
from tests.dicom.scu import find, findscu
from tests.support import free_port

START = dt.datetime(2026, 11, 29, 9)


def _file_dataset() -> Dataset:
    ds = Dataset()
    ds.AccessionNumber, ds.PatientID, ds.PatientName = "TWO", "P1", "DOE^JANE"
    ds.Allergies, ds.MedicalAlerts = ["IODINE", "LATEX"], "PACEMAKER"
    ds.PregnancyStatus, ds.PatientWeight = 4, "72.5"
    ds.OtherPatientIDs = ["X1", "X2"]
    step = Dataset()
    step.Modality, step.ScheduledStationAETitle = "CT", ["CT_ROOM1", "CT_ROOM2"]
    step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime = (
        "20261129", "0900")
    step.RequestedContrastAgent, step.ScheduledProcedureStepLocation = "IOPAMIDOL", "RAD-2"
    step.CommentsOnTheScheduledProcedureStep = "check creatinine"
    ds.ScheduledProcedureStepSequence = [step]
    return ds


@pytest.fixture
def server(store: Store) -> Iterator[DicomServer]:
    with store.writing() as s:
        apply_order(s, order_from_dataset(_file_dataset()), uid_root="1.2.3")
        apply_order(s, Order(OrderControl.NEW, PatientData("P2"), ProcedureData(
            "OTHER", modality="CT", scheduled_station_ae_title="CT_ROOM3",
            scheduled_start=START)), uid_root="1.2.3")
    config = DicomConfig(host="127.0.0.1", port=free_port(), network_timeout_seconds=10,
                         modalities={"CT_ROOM2": ModalityConfig(only_own_items=True,
                                                                modality="CT")})
    running = DicomServer(config, store)
    running.start()
    yield running
    running.stop()


def _accessions(port: int, station: str | None, calling_aet: str = "TEST_SCU") -> list[str]:
    query = Dataset()
    query.AccessionNumber = ""
    step = Dataset()
    step.ScheduledStationAETitle = station or ""
    query.ScheduledProcedureStepSequence = [step]
    result = find(port, query, calling_aet=calling_aet)
    assert result.final_status == 0x0000
    return sorted(ds.AccessionNumber for ds in result.identifiers)


def test_a_step_on_two_stations_is_found_by_each(server):
    assert _accessions(server.port, "CT_ROOM1") == ["TWO"]
    assert _accessions(server.port, "CT_ROOM2") == ["TWO"]
    assert _accessions(server.port, "CT_ROOM?") == ["OTHER", "TWO"]
    assert _accessions(server.port, "CT_ROOM3\\CT_ROOM2") == ["OTHER", "TWO"]
    assert _accessions(server.port, "CT_ROOM") == []
    # only_own_items: the second station's modality sees the step it shares.
    assert _accessions(server.port, None, calling_aet="CT_ROOM2") == ["TWO"]


def test_stored_attributes_reach_the_modality_and_never_fail_a_query(server, tmp_path):
    rows = findscu(server.port, "AccessionNumber=TWO", "Allergies=XYZ", "MedicalAlerts",
                   "PregnancyStatus", "PatientWeight", "(0010,1000)",  # Other Patient IDs
                   "(0040,0100)[0].ScheduledStationAETitle",
                   "(0040,0100)[0].RequestedContrastAgent", out_dir=tmp_path)
    assert len(rows) == 1
    answer = rows[0]
    assert list(answer.Allergies) == ["IODINE", "LATEX"]
    assert (answer.MedicalAlerts, answer.PregnancyStatus, str(answer.PatientWeight)) == (
        "PACEMAKER", 4, "72.5")
    assert list(answer.OtherPatientIDs) == ["X1", "X2"]
    step = answer.ScheduledProcedureStepSequence[0]
    assert list(step.ScheduledStationAETitle) == ["CT_ROOM1", "CT_ROOM2"]
    assert step.RequestedContrastAgent == "IOPAMIDOL"
    assert "ScheduledProcedureStepLocation" not in step  # not asked for


def test_a_zero_length_step_item_returns_the_whole_step(server):
    query = Dataset()
    query.AccessionNumber = "TWO"
    query.ScheduledProcedureStepSequence = []
    result = find(server.port, query)
    assert result.final_status == 0x0000
    step = result.identifiers[0].ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepLocation, step.CommentsOnTheScheduledProcedureStep,
            step.ScheduledProcedureStepStartTime) == ("RAD-2", "check creatinine", "0900")
    # Type 2 attributes of table K.6-1 the step has no value for: present and empty.
    assert step.ScheduledPerformingPhysicianName == "" and step.PreMedication == ""
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
