"""C-CANCEL over the network (PS3.4 C.4.1.2.3 / K.4.1.2, PS3.7 9.1.2.1.5): the broker stops
answering a worklist query the modality cancelled, and the association goes on."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from broker.dicom.scp import DicomServer
from broker.models import Patient, WorklistItem
from broker.store import Store
from tests.dicom.conftest import start_server
from tests.support import dcmtk

MATCHES = 400
CANCEL = 0xFE00
PENDING = (0xFF00, 0xFF01)


@pytest.fixture
def crowded(sqlite_store: Store) -> Iterator[DicomServer]:
    """A worklist of MATCHES steps of one patient, all matching an empty query."""
    start = dt.datetime(2026, 3, 2, 7, 0)
    with sqlite_store.writing() as session:
        patient = Patient(patient_id="P-MANY", patient_name="MANY^STEPS")
        session.add(patient)
        session.flush()
        session.add_all(
            WorklistItem(patient_fk=patient.id, accession_number=f"ACC-{n:04d}",
                         study_instance_uid=f"1.2.826.0.1.3680043.10.1491.9.{n}",
                         modality="CT", scheduled_start=start + dt.timedelta(minutes=n),
                         status="SCHEDULED")
            for n in range(MATCHES))
    server = start_server(sqlite_store)
    yield server
    server.stop()


def _every_step() -> Dataset:
    identifier = Dataset()
    identifier.PatientName = ""
    identifier.AccessionNumber = ""
    identifier.ScheduledProcedureStepSequence = []
    return identifier


def test_c_cancel_after_the_first_match_stops_the_answer(crowded: DicomServer):
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", crowded.port, ae_title="WORKLISTS")
    assert assoc.is_established
    try:
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == ModalityWorklistInformationFind)
        statuses: list[int] = []
        answered: list[str] = []
        for status, identifier in assoc.send_c_find(_every_step(),
                                                    ModalityWorklistInformationFind, msg_id=11):
            assert "Status" in status, "no response from the broker"
            statuses.append(int(status.Status))
            if status.Status in PENDING:
                answered.append(str(identifier.AccessionNumber))
                if len(answered) == 1:
                    assoc.send_c_cancel(11, context_id)
            assert len(statuses) <= MATCHES + 1  # the loop ends with the final status
        assert statuses[-1] == CANCEL
        assert all(s in PENDING for s in statuses[:-1])
        assert 1 <= len(answered) < MATCHES
        # The steps answered before the cancel took effect are the earliest ones, in order.
        assert answered == [f"ACC-{n:04d}" for n in range(len(answered))]

        # The association is still usable: another query, then an echo.
        again = _every_step()
        again.AccessionNumber = "ACC-0399"
        responses = list(assoc.send_c_find(again, ModalityWorklistInformationFind, msg_id=12))
        assert [int(s.Status) for s, _ in responses] == [0xFF00, 0x0000]
        assert responses[0][1].AccessionNumber == "ACC-0399"
        assert int(assoc.send_c_echo(msg_id=13).Status) == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released


def test_findscu_cancel_option(crowded: DicomServer):
    # DCMTK's findscu as a modality that gives up after the first answer.
    done = subprocess.run(
        [dcmtk("findscu"), "-v", "-W", "-to", "20", "--cancel", "1", "-k", "PatientName",
         "-k", "AccessionNumber", "127.0.0.1", str(crowded.port)],
        capture_output=True, text=True, timeout=60)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "Received Final Find Response (Cancel" in log
    assert 1 <= log.count("(Pending)") < MATCHES
