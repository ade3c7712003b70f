"""An MPPS SCU for administrators (DCMTK has none): act as the modality by hand.

``in-progress`` sends N-CREATE, ``completed`` / ``discontinued`` send N-SET. Without an
explicit SOP Instance UID, the UID is derived from the accession number, so that
``mpps in-progress --accession X`` followed by ``mpps completed --accession X`` refer to the
same procedure step without the tool keeping any state.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

Action = Literal["in-progress", "completed", "discontinued"]
_STATUS = {"in-progress": "IN PROGRESS", "completed": "COMPLETED",
           "discontinued": "DISCONTINUED"}


class MppsScuError(Exception):
    """The SCP could not be reached, or refused or aborted the association."""


@dataclass(frozen=True, slots=True)
class MppsOutcome:
    status: int
    sop_instance_uid: str
    error_comment: str | None = None


def mpps_uid_for(accession: str) -> str:
    """A stable UID for the accession's procedure step (2.25 form, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'worklist-broker-mpps:' + accession).int}"


def _create_dataset(accession: str, study_uid: str | None, modality: str, station: str,
                    now: dt.datetime) -> Dataset:
    step = Dataset()
    step.AccessionNumber = accession
    step.StudyInstanceUID = study_uid or ""
    step.RequestedProcedureID = ""
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepDescription = ""
    step.ReferencedStudySequence = []
    step.ScheduledProtocolCodeSequence = []
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = [step]
    # Type 2 attributes of PS3.4 F.7.2.1 are sent empty: the SCP knows them from the order.
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = accession[:16]
    ds.PerformedStationAETitle = station
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = now.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = now.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = ""
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = modality
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def _set_dataset(status: str, now: dt.datetime) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = now.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = now.strftime("%H%M%S")
    ds.PerformedSeriesSequence = []
    return ds


def send_mpps(action: Action, *, accession: str, host: str, port: int,
              called_aet: str = "WORKLISTS", calling_aet: str = "MPPS_SCU",
              sop_instance_uid: str | None = None, study_instance_uid: str | None = None,
              modality: str = "OT", timeout: float = 30) -> MppsOutcome:
    uid = sop_instance_uid or mpps_uid_for(accession)
    now = dt.datetime.now()
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise MppsScuError(f"no association with {called_aet} at {host}:{port} "
                           "(unreachable, or rejected)")
    try:
        if action == "in-progress":
            status, _ = assoc.send_n_create(
                _create_dataset(accession, study_instance_uid, modality, calling_aet, now),
                ModalityPerformedProcedureStep, uid)
        else:
            status, _ = assoc.send_n_set(_set_dataset(_STATUS[action], now),
                                         ModalityPerformedProcedureStep, uid)
    finally:
        assoc.release()
    if status is None or "Status" not in status:
        raise MppsScuError(f"{host}:{port} aborted or did not answer the MPPS request")
    return MppsOutcome(int(status.Status), uid, str(status.get("ErrorComment", "")) or None)
