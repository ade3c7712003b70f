"""An MPPS SCU: for administrators and tests, act as a modality that starts and ends a procedure
step (DCMTK ships no MPPS SCU); for the forwarder, associate and send one request at a time.

``in-progress`` is an N-CREATE, ``completed`` and ``discontinued`` an N-SET of the same
instance. Without an explicit SOP Instance UID the UID is derived from the accession number,
so the two commands agree without remembering anything in between.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import uuid
from dataclasses import dataclass
from typing import Literal

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from broker.tls import handshake_failure

MppsAction = Literal["in-progress", "completed", "discontinued"]

_NEW_STATUS: dict[str, str] = {
    "in-progress": "IN PROGRESS",
    "completed": "COMPLETED",
    "discontinued": "DISCONTINUED",
}

# PS3.4 F.7.2.1 table F.7.2-1: Type 2 attributes an N-CREATE must carry, empty if unknown.
_TYPE2_CREATE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
    "PerformedStationName", "PerformedLocation", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepDescription",
    "PerformedProcedureTypeDescription",
)
_TYPE2_CREATE_SEQUENCES = (
    "ReferencedPatientSequence", "ProcedureCodeSequence", "PerformedSeriesSequence",
)
_TYPE2_STEP = (
    "RequestedProcedureID", "RequestedProcedureDescription", "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)
_TYPE2_STEP_SEQUENCES = ("ReferencedStudySequence", "ScheduledProtocolCodeSequence")


# A-ASSOCIATE-AC/RJ Result (PS3.8 9.3.3, 9.3.4).
_ACCEPTED = 0x00
_REJECTED_PERMANENT = 0x01


class MppsScuError(Exception):
    """The peer could not be reached, refused the association, or never answered.

    ``permanent`` when asking again cannot help: the peer rejected the association as
    permanent (PS3.8 9.3.4, A-ASSOCIATE-RJ result 1) or accepted no MPPS presentation context.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class MppsOutcome:
    """The peer's answer: DIMSE status (0 = success) and the instance it concerned."""

    status: int
    sop_instance_uid: str
    error_comment: str | None = None
    error_id: int | None = None


def mpps_uid_for(accession: str) -> str:
    """The MPPS SOP Instance UID ``send_mpps`` uses for an accession (a PS3.5 B.2 UUID UID)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID,
                                    "worklist-broker-mpps:" + accession).int)


def _now() -> tuple[str, str]:
    # Modalities report local wall-clock time in DA / TM.
    now = dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def create_dataset(*, accession: str, calling_aet: str, modality: str,
                   study_instance_uid: str | None) -> Dataset:
    """The N-CREATE attribute list of a step that has just started."""
    step = Dataset()
    step.AccessionNumber = accession
    if study_instance_uid:
        step.StudyInstanceUID = study_instance_uid
    for keyword in _TYPE2_STEP:
        setattr(step, keyword, None)
    for keyword in _TYPE2_STEP_SEQUENCES:
        setattr(step, keyword, [])

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = accession[:16]
    ds.PerformedStationAETitle = calling_aet
    ds.Modality = modality
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = _now()
    for keyword in _TYPE2_CREATE:
        setattr(ds, keyword, None)
    for keyword in _TYPE2_CREATE_SEQUENCES:
        setattr(ds, keyword, [])
    return ds


def set_dataset(status: str) -> Dataset:
    """The N-SET modification list that ends a step as COMPLETED or DISCONTINUED."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = _now()
    ds.PerformedSeriesSequence = []
    return ds


class _NoTlsTraceback(logging.Filter):
    """pynetdicom logs a failed TLS connect with a traceback; the caller reports it in one
    line with the reason (:func:`_tls_failure`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ssl.SSLError))


_TLS_FILTER = _NoTlsTraceback()

TlsArgs = tuple[ssl.SSLContext, str | None]  # context, name the peer's certificate must carry


def _tls_failure(host: str, port: int, tls: TlsArgs, timeout: float) -> str:
    """Why a TLS connection fails: pynetdicom only logs it, so ask the peer once more."""
    context, server_name = tls
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=server_name):
            return "no TCP connection"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {handshake_failure(exc)}"
    except OSError as exc:
        return f"no TCP connection ({exc.strerror or exc})"


def associate(host: str, port: int, *, called_aet: str, calling_aet: str,
              timeout: float, tls: TlsArgs | None = None) -> Association:
    """An association proposing the MPPS SOP Class, or :class:`MppsScuError` saying why not.

    With ``tls`` (context, expected server name) the association runs over TLS.
    """
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    connected: list[bool] = []
    if tls is not None:
        logging.getLogger("pynetdicom.transport").addFilter(_TLS_FILTER)  # once: same object
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))])
    if assoc.is_established:
        return assoc
    where = f"{called_aet} at {host}:{port}"
    if not connected:
        reason = _tls_failure(host, port, tls, timeout) if tls else "no TCP connection"
        raise MppsScuError(f"cannot reach {where}: {reason}")
    answer = assoc.acceptor.primitive
    if assoc.is_rejected:
        permanent = answer is not None and answer.result == _REJECTED_PERMANENT
        reason = f": {answer.reason_str}" if answer is not None else ""
        raise MppsScuError(f"{where} rejected the association "
                           f"({'permanent' if permanent else 'transient'}{reason}, "
                           f"calling AE {calling_aet})", permanent=permanent)
    if assoc.is_aborted and answer is not None and answer.result == _ACCEPTED:
        raise MppsScuError(f"{where} accepted no MPPS presentation context", permanent=True)
    if assoc.is_aborted:
        raise MppsScuError(f"{where} aborted the association")
    raise MppsScuError(f"{where} did not answer the association request")


def send_request(assoc: Association, dataset: Dataset, sop_instance_uid: str, *,
                 create: bool) -> MppsOutcome:
    """One N-CREATE (``create``) or N-SET on an open association: the peer's status, failures
    included; :class:`MppsScuError` when no valid response came (timeout, abort)."""
    if create:
        status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep,
                                        sop_instance_uid)
    else:
        status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, sop_instance_uid)
    if "Status" not in status:
        acceptor = assoc.acceptor
        raise MppsScuError(f"no valid response from {acceptor.ae_title} at "
                           f"{acceptor.address}:{acceptor.port} "
                           "(timeout or aborted association)")
    comment = status.get("ErrorComment")
    error_id = status.get("ErrorID")
    return MppsOutcome(status=int(status.Status), sop_instance_uid=sop_instance_uid,
                       error_comment=str(comment) if comment else None,
                       error_id=int(error_id) if error_id is not None else None)


def send_mpps(action: MppsAction, *, accession: str, host: str, port: int,
              called_aet: str = "WORKLISTS", calling_aet: str = "MPPS_SCU",
              sop_instance_uid: str | None = None, study_instance_uid: str | None = None,
              modality: str = "OT", timeout: float = 30) -> MppsOutcome:
    """Start (N-CREATE) or end (N-SET) a performed procedure step for an accession.

    Returns the peer's status, failures included; raises :class:`MppsScuError` when there is
    no answer at all (unreachable, rejected, aborted, timed out).
    """
    if action not in _NEW_STATUS:
        raise ValueError(f"action must be one of {', '.join(_NEW_STATUS)}, not {action!r}")
    uid = sop_instance_uid or mpps_uid_for(accession)
    if action == "in-progress":
        dataset = create_dataset(accession=accession, calling_aet=calling_aet,
                                 modality=modality, study_instance_uid=study_instance_uid)
    else:
        dataset = set_dataset(_NEW_STATUS[action])
    assoc = associate(host, port, called_aet=called_aet, calling_aet=calling_aet,
                      timeout=timeout)
    try:
        return send_request(assoc, dataset, uid, create=action == "in-progress")
    finally:
        if assoc.is_established:
            assoc.release()
