"""Worklist files (``*.wl``, as DCMTK's wlmscpfs and Orthanc's ModalityWorklists plugin keep
them): import into the store, so that a site can migrate, and export of the current worklist.

A file is one worklist item: a dataset of Modality Worklist return keys, the first item of
its Scheduled Procedure Step Sequence being the scheduled step. Attributes the broker does not
store (Medical Alerts, Contrast Allergies, ...) are not imported; ``import`` says how many
files carried such attributes.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from broker.domain import Order, OrderControl, PatientData, ProcedureData, WorklistRow
from broker.errors import BrokerError
from broker.matching import WorklistQuery, find_worklist
from broker.orders import apply_order
from broker.store import Store

log = logging.getLogger(__name__)

# DCMTK writes .wl files with this SOP class in their meta header.
_MWL_FIND = "1.2.840.10008.5.1.4.31"
_KNOWN = {
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "AccessionNumber", "ReferringPhysicianName", "RequestingPhysician",
    "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "ScheduledProcedureStepSequence",
    "RequestedProcedurePriority",
}


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    refused: list[tuple[str, str]]  # (file name, reason)
    with_unstored_attributes: int


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        # Several values (e.g. two station AE titles): the broker keeps one per attribute,
        # as an HL7 order carries (docs/worklist-matching.md D2).
        value = value[0] if len(value) else ""
    return str(value).strip() or None


def _date(text: str | None) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text.replace(".", "")[:8], "%Y%m%d").date()
    except ValueError:
        raise BrokerError(f"date {text!r} is not YYYYMMDD") from None


def order_from_dataset(ds: Dataset) -> Order:
    step = ds.ScheduledProcedureStepSequence[0] if ds.get(
        "ScheduledProcedureStepSequence") else Dataset()
    code = ds.RequestedProcedureCodeSequence[0] if ds.get(
        "RequestedProcedureCodeSequence") else Dataset()
    stations = step.get("ScheduledStationAETitle")
    if isinstance(stations, MultiValue) and len(stations) > 1:
        # A step schedulable on several stations becomes a step of the first one (D2).
        log.warning("worklist file for accession %s: keeping station %s of %s",
                    _text(ds, "AccessionNumber"), stations[0], "\\".join(stations))
    start_date = _date(_text(step, "ScheduledProcedureStepStartDate"))
    start = None
    if start_date is not None:
        time_text = (_text(step, "ScheduledProcedureStepStartTime") or "").replace(":", "")
        digits = time_text.split(".")[0].ljust(6, "0")[:6]
        start = dt.datetime.combine(start_date, dt.time(int(digits[:2]), int(digits[2:4]),
                                                        int(digits[4:6])))
    patient = PatientData(
        patient_id=_text(ds, "PatientID") or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_date(_text(ds, "PatientBirthDate")),
        sex=_text(ds, "PatientSex"),
    )
    procedure = ProcedureData(
        accession_number=_text(ds, "AccessionNumber") or "",
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        requested_procedure_id=_text(ds, "RequestedProcedureID"),
        requested_procedure_description=_text(ds, "RequestedProcedureDescription"),
        requested_procedure_code_value=_text(code, "CodeValue"),
        requested_procedure_code_scheme=_text(code, "CodingSchemeDesignator"),
        requested_procedure_code_meaning=_text(code, "CodeMeaning"),
        sps_id=_text(step, "ScheduledProcedureStepID"),
        sps_description=_text(step, "ScheduledProcedureStepDescription"),
        modality=_text(step, "Modality"),
        scheduled_station_ae_title=_text(step, "ScheduledStationAETitle"),
        scheduled_start=start,
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        requesting_physician=_text(ds, "RequestingPhysician"),
        placer_order_number=_text(ds, "PlacerOrderNumberImagingServiceRequest"),
        filler_order_number=_text(ds, "FillerOrderNumberImagingServiceRequest"),
        scheduled_performing_physician_name=_text(step, "ScheduledPerformingPhysicianName"),
        scheduled_station_name=_text(step, "ScheduledStationName"),
        requested_procedure_priority=_text(ds, "RequestedProcedurePriority"),
    )
    return Order(OrderControl.NEW, patient, procedure, message_control_id="import-wl")


def import_worklist(store: Store, directory: Path, *, uid_root: str) -> ImportResult:
    """Import every ``*.wl`` file, each in its own transaction (one bad file spoils none)."""
    imported = unstored = 0
    refused: list[tuple[str, str]] = []
    for path in sorted(Path(directory).glob("*.wl")):
        try:
            ds = dcmread(path, force=True)
            order = order_from_dataset(ds)
            with store.writing() as session:
                apply_order(session, order, uid_root=uid_root)
        except (BrokerError, InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            refused.append((path.name, str(exc)))
            log.warning("worklist file %s not imported: %s", path.name, exc)
            continue
        imported += 1
        if any(element.keyword not in _KNOWN for element in ds if element.tag.group != 0x0002):
            unstored += 1
    return ImportResult(imported, refused, unstored)


def _full_identifier() -> Dataset:
    """A query asking for every attribute the broker stores."""
    identifier = Dataset()
    for keyword in sorted(_KNOWN - {"SpecificCharacterSet", "ScheduledProcedureStepSequence",
                                    "RequestedProcedureCodeSequence"}):
        setattr(identifier, keyword, "")
    code = Dataset()
    code.CodeValue = code.CodingSchemeDesignator = code.CodeMeaning = ""
    identifier.RequestedProcedureCodeSequence = [code]
    step = Dataset()
    for keyword in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID",
                    "ScheduledProcedureStepDescription", "ScheduledProcedureStepStatus",
                    "ScheduledPerformingPhysicianName", "ScheduledStationName"):
        setattr(step, keyword, "")
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def item_dataset(row: WorklistRow) -> Dataset:
    """Every attribute of one item, as a modality asking for all of them receives it (the
    C-FIND renderer), for export and the console."""
    from broker.dicom.worklist import render_response

    return render_response(_full_identifier(), row)


def export_worklist(store: Store, directory: Path) -> int:
    """Write every visible worklist item as ``<accession>.wl``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    with store.reading() as session:
        rows = find_worklist(session, WorklistQuery(limit=10_000_000))
    for row in rows:
        ds = item_dataset(row)
        if not ds.get("RequestedProcedureCodeSequence"):
            # An empty Type 1C sequence makes wlmscpfs ignore the whole file as incomplete.
            del ds.RequestedProcedureCodeSequence
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = _MWL_FIND
        ds.file_meta.MediaStorageSOPInstanceUID = row.procedure.study_instance_uid or "1.2.3"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        safe = "".join(c if c.isalnum() or c in "-_." else "_"
                       for c in row.procedure.accession_number)
        ds.save_as(directory / f"{safe}.wl", enforce_file_format=True)
    return len(rows)
