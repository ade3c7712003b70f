"""What the SCP records of each C-FIND, and "why is it not on the worklist?" replaying it:
a real DicomServer on both backends, queried by pynetdicom as modalities would."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from sqlalchemy import update

from broker import cfind_log
from broker.config import DicomConfig, ModalityConfig
from broker.dicom.scp import DicomServer
from broker.dicom.why_not import (
    UnknownAccession,
    explain_recent,
    recorded_calling_aes,
)
from broker.domain import ItemStatus, Order
from broker.models import WorklistItem
from broker.store import Store
from tests.dicom.conftest import load, order, start_server
from tests.dicom.scu import find

DAY = dt.datetime(2026, 11, 29, 9, 0)
NEXT_DAY = dt.datetime(2026, 11, 30, 9, 0)
MODALITIES = {"CT_ROOM1": ModalityConfig(only_own_items=True, modality="CT")}


def _order(accession: str, patient_id: str, modality: str, start: dt.datetime,
           station: str) -> Order:
    made = order(accession, patient_id, f"DOE^{patient_id}", modality, start)
    return dataclasses.replace(made, procedure=dataclasses.replace(
        made.procedure, scheduled_station_ae_title=station))


@pytest.fixture
def server(store: Store) -> Iterator[DicomServer]:
    load(store, [
        _order("CT-1", "1", "CT", DAY, "CT_ROOM1"),
        _order("MR-1", "2", "MR", DAY, "CT_ROOM1"),
        _order("CT-NEXT", "3", "CT", NEXT_DAY, "CT_ROOM1"),
        _order("CT-DONE", "4", "CT", DAY, "CT_ROOM1"),
        _order("CT-OTHER", "5", "CT", DAY, "CT_ROOM2"),
    ])
    with store.writing() as session:
        session.execute(update(WorklistItem).where(WorklistItem.accession_number == "CT-DONE")
                        .values(status=ItemStatus.COMPLETED))
    running = start_server(store, modalities=MODALITIES, record_flush_seconds=3600)
    yield running
    running.stop()


def _query(modality: str | None = "CT", date: str | None = "20261129") -> Dataset:
    identifier = Dataset()
    identifier.AccessionNumber = ""
    identifier.PatientName = ""
    step = Dataset()
    step.Modality = modality
    step.ScheduledProcedureStepStartDate = date
    step.ScheduledStationAETitle = ""
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def _config(server: DicomServer) -> DicomConfig:
    return server._config  # the running server's own settings


def test_why_not_names_the_key_that_excluded_the_item(server: DicomServer, store: Store):
    answer = find(server.port, _query(), calling_aet="CT_ROOM1")
    assert [r.AccessionNumber for r in answer.identifiers] == ["CT-1"]
    assert server.recorder is not None
    server.recorder.flush()
    config = _config(server)

    def reasons(accession: str) -> list[tuple[bool, str]]:
        explanations = explain_recent(store, config, accession, "CT_ROOM1")
        assert len(explanations) == 1
        assert explanations[0].calling_ae == "CT_ROOM1"
        return [(v.matched, v.reason) for v in explanations[0].verdicts if not v.matched]

    assert reasons("MR-1") == [(False, "Modality: asked CT, item MR")]
    assert reasons("CT-NEXT") == [
        (False, "Scheduled Procedure Step Start Date: asked 20261129, item 20261130")]
    assert reasons("CT-DONE") == [(False, "status COMPLETED is not visible")]
    assert reasons("CT-OTHER") == [
        (False, "only_own_items: station CT_ROOM1 (or no station and modality CT), "
                "item CT_ROOM2")]

    matched = explain_recent(store, config, "CT-1", "CT_ROOM1")[0]
    assert matched.matched and matched.matches == 1
    by_key = {v.key: v for v in matched.verdicts}
    assert by_key["Modality"].asked == "CT" and by_key["Modality"].item == "CT"
    assert by_key["Scheduled Procedure Step Status"].reason == "status SCHEDULED is visible"
    with pytest.raises(UnknownAccession):
        explain_recent(store, config, "NOPE", "CT_ROOM1")
    assert explain_recent(store, config, "CT-1", "NEVER_ASKED") == []


def test_each_calling_ae_keeps_its_last_distinct_queries_and_exposure_adds_up(
        server: DicomServer, store: Store):
    recorder = server.recorder
    assert recorder is not None
    for _ in range(2):  # a modality polling with the same keys
        assert len(find(server.port, _query(), calling_aet="CT_ROOM1").identifiers) == 1
    recorder.flush()
    find(server.port, _query(), calling_aet="CT_ROOM1")
    find(server.port, _query(modality="MR"), calling_aet="MR_ROOM1")
    recorder.flush()
    find(server.port, _query(modality="MR", date="20261130"), calling_aet="MR_ROOM1")
    server.stop()  # the last batch is written on stop

    with store.reading() as session:
        assert recorded_calling_aes(session) == ["CT_ROOM1", "MR_ROOM1"]
        ct = cfind_log.recent_queries(session, "CT_ROOM1")
        assert [(q.count, q.matches) for q in ct] == [(3, 1)]
        mr = cfind_log.recent_queries(session, "MR_ROOM1")
        assert [q.matches for q in mr] == [0, 1]  # newest first: the next-day query
        exposure = {(e.calling_ae, e.count) for e in cfind_log.exposures_of(session, "CT-1")}
        assert exposure == {("CT_ROOM1", 3)}
        assert [e.calling_ae for e in cfind_log.exposures_of(session, "MR-1")] == ["MR_ROOM1"]
        first = cfind_log.exposures_of(session, "CT-1")[0]
        assert first.first_at < first.last_at

    newest, older = explain_recent(store, _config(server), "MR-1", "MR_ROOM1")
    assert not newest.matched and older.matched
    assert newest.at >= older.at
    assert [v.reason for v in newest.verdicts if not v.matched] == [
        "Scheduled Procedure Step Start Date: asked 20261130, item 20261129"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_a_refused_query_is_explained_and_the_limit_is_a_key(server: DicomServer, store: Store):
    bad = _query(date="2026-11-29x")
    assert find(server.port, bad, calling_aet="CT_ROOM1").final_status == 0xA900
    assert server.recorder is not None
    server.recorder.flush()
    (refused,) = explain_recent(store, _config(server), "CT-1", "CT_ROOM1")
    assert not refused.matched
    assert refused.verdicts[0].reason.startswith("the query was refused")

    # A modality limited to one match gets CT-1 (earliest, lowest id), not CT-DONE's peers.
    limited = DicomConfig(**{**_config(server).model_dump(), "max_matches": 1,
                             "modalities": {}})
    find(server.port, _query(modality="CT", date=None), calling_aet="ANY_CT")
    server.recorder.flush()
    (explained,) = explain_recent(store, limited, "CT-OTHER", "ANY_CT")
    assert not explained.matched
    assert explained.verdicts[-1].key == "max_matches"
    assert "matched 3 items; only the first 1" in explained.verdicts[-1].reason


def test_recording_can_be_switched_off(store: Store):
    load(store, [order("CT-1", "1", "DOE^JOHN", "CT", DAY)])
    running = start_server(store, record_cfind=False)
    try:
        assert running.recorder is None
        assert len(find(running.port, _query(), calling_aet="CT_ROOM1").identifiers) == 1
    finally:
        running.stop()
    with store.reading() as session:
        assert recorded_calling_aes(session) == []
