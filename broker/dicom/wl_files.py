"""A worklist item as a DICOM dataset and back: the one conversion every path uses (worklist
files, the C-FIND renderer, the HL7 mapping's extra attributes, REST calls), and the worklist
files (``*.wl``, as DCMTK's wlmscpfs and Orthanc's ModalityWorklists plugin keep them):
import into the store, so that a site can migrate, and export of the current worklist.

- :func:`order_from_dataset`: a dataset (a file's, a REST call's) -> an :class:`Order`. The
  attributes the store keeps in columns (those modalities filter on) are read into the
  order's fields, and the whole dataset is kept as DICOM JSON (``item_dataset``), so that
  nothing the item was given is lost: Allergies, Medical Alerts, several station AE titles,
  private attributes...
- :func:`item_dataset`: a stored item -> its dataset: the kept dataset, with the values of
  the columns that changed since (an XO order, an ADT update, the step status) written over
  it. A value that did not change keeps the form it was given in (``0856`` stays ``0856``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.exc import SQLAlchemyError

from broker.domain import (
    ItemStatus,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    WorklistRow,
)
from broker.errors import BrokerError
from broker.matching import WorklistQuery, find_worklist
from broker.orders import apply_order
from broker.store import Store

log = logging.getLogger(__name__)

# DCMTK writes .wl files with this SOP class in their meta header.
_MWL_FIND = "1.2.840.10008.5.1.4.31"
# Files per transaction: one commit (one fsync on SQLite) per batch, not per file.
BATCH_SIZE = 500


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - a typo in this module
        raise KeyError(keyword)
    return tag


SPECIFIC_CHARACTER_SET = _tag("SpecificCharacterSet")
SPS_SEQUENCE = _tag("ScheduledProcedureStepSequence")
CODE_SEQUENCE = _tag("RequestedProcedureCodeSequence")
PATIENT_NAME = _tag("PatientName")
PATIENT_ID = _tag("PatientID")
ISSUER_OF_PATIENT_ID = _tag("IssuerOfPatientID")
PATIENT_BIRTH_DATE = _tag("PatientBirthDate")
PATIENT_SEX = _tag("PatientSex")
ACCESSION_NUMBER = _tag("AccessionNumber")
REFERRING_PHYSICIAN = _tag("ReferringPhysicianName")
REQUESTING_PHYSICIAN = _tag("RequestingPhysician")
STUDY_INSTANCE_UID = _tag("StudyInstanceUID")
REQUESTED_PROCEDURE_ID = _tag("RequestedProcedureID")
REQUESTED_PROCEDURE_DESCRIPTION = _tag("RequestedProcedureDescription")
PLACER_ORDER = _tag("PlacerOrderNumberImagingServiceRequest")
FILLER_ORDER = _tag("FillerOrderNumberImagingServiceRequest")
CODE_VALUE = _tag("CodeValue")
CODING_SCHEME = _tag("CodingSchemeDesignator")
CODE_MEANING = _tag("CodeMeaning")
MODALITY = _tag("Modality")
STATION_AE_TITLE = _tag("ScheduledStationAETitle")
SPS_START_DATE = _tag("ScheduledProcedureStepStartDate")
SPS_START_TIME = _tag("ScheduledProcedureStepStartTime")
SPS_ID = _tag("ScheduledProcedureStepID")
SPS_DESCRIPTION = _tag("ScheduledProcedureStepDescription")
SPS_STATUS = _tag("ScheduledProcedureStepStatus")
PERFORMING_PHYSICIAN = _tag("ScheduledPerformingPhysicianName")
STATION_NAME = _tag("ScheduledStationName")
PRIORITY = _tag("RequestedProcedurePriority")

# Scheduled Procedure Step Status (0040,0020) defined terms (PS3.3 C.4.10). The broker's
# IN PROGRESS is the modality's STARTED; DICOM spells CANCELED with one L.
SPS_STATUS_TERMS: dict[ItemStatus, str] = {
    ItemStatus.SCHEDULED: "SCHEDULED",
    ItemStatus.IN_PROGRESS: "STARTED",
    ItemStatus.COMPLETED: "COMPLETED",
    ItemStatus.DISCONTINUED: "DISCONTINUED",
    ItemStatus.CANCELLED: "CANCELED",
}

# The value representations of the attributes the store keeps in columns.
_VR: dict[int, str] = {
    PATIENT_NAME: "PN", PATIENT_ID: "LO", ISSUER_OF_PATIENT_ID: "LO", PATIENT_BIRTH_DATE: "DA",
    PATIENT_SEX: "CS", ACCESSION_NUMBER: "SH", REFERRING_PHYSICIAN: "PN",
    REQUESTING_PHYSICIAN: "PN", STUDY_INSTANCE_UID: "UI", REQUESTED_PROCEDURE_ID: "SH",
    REQUESTED_PROCEDURE_DESCRIPTION: "LO", PLACER_ORDER: "LO", FILLER_ORDER: "LO",
    CODE_VALUE: "SH", CODING_SCHEME: "SH", CODE_MEANING: "LO", MODALITY: "CS",
    STATION_AE_TITLE: "AE", SPS_START_DATE: "DA", SPS_START_TIME: "TM", SPS_ID: "SH",
    SPS_DESCRIPTION: "LO", SPS_STATUS: "CS", PERFORMING_PHYSICIAN: "PN", STATION_NAME: "SH",
    PRIORITY: "CS",
}


# --- DICOM JSON ---------------------------------------------------------------------------

def _keep_number_text(element_json: dict[str, Any], element: DataElement) -> None:
    """DS and IS as the strings they were (PS3.18 F.2.3.1 allows it): a JSON number would
    turn a weight of ``70`` into ``70.0``."""
    if element.VR in ("DS", "IS") and element.value not in (None, ""):
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        element_json["Value"] = [getattr(v, "original_string", None) or str(v)
                                 for v in values]


def _restore_number_text(ds: Dataset, data: dict[str, Any]) -> None:
    """pydicom reads DS and IS from JSON as numbers (``70`` -> ``70.0``): put back the
    strings :func:`dataset_json` kept."""
    for tag, element in data.items():
        values = element.get("Value")
        if not values:
            continue
        if element.get("vr") == "SQ":
            for item, item_data in zip(ds[int(tag, 16)].value, values, strict=False):
                _restore_number_text(item, item_data)
        elif element.get("vr") in ("DS", "IS") and all(isinstance(v, str) for v in values):
            ds[int(tag, 16)].value = "\\".join(values)


def _json_dict(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for element in ds:
        if element.tag.element == 0:
            continue  # group lengths describe an encoding, not the item
        if element.VR == "SQ":
            items = [_json_dict(item) for item in element.value]
            out[f"{element.tag:08X}"] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        encoded = element.to_json_dict(None, None)
        _keep_number_text(encoded, element)
        out[f"{element.tag:08X}"] = encoded
    return out


def dataset_json(ds: Dataset) -> str:
    """A dataset (without its file meta and Specific Character Set: the values are Unicode
    once read) as DICOM JSON."""
    data = {tag: element for tag, element in _json_dict(ds).items()
            if not tag.startswith("0002") and tag != f"{SPECIFIC_CHARACTER_SET:08X}"}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=8192)
def _stored(text: str) -> tuple[Dataset, dict[int, Any]]:
    """A kept dataset, and what the columns would hold for it; parsed once per text (items
    are rendered on every poll). Never modified: :func:`item_dataset` copies what it
    changes."""
    data = json.loads(text)
    ds = Dataset.from_json(data)
    _restore_number_text(ds, data)
    try:
        order = order_from_dataset(ds)
    except (BrokerError, ValueError):
        # A value the columns could not take: it was never in the columns either.
        order = Order(OrderControl.NEW, PatientData(""), ProcedureData(""))
    return ds, _column_attributes(order.patient, order.procedure, None)


def dataset_from_json(text: str) -> Dataset:
    return _copy(_stored(text)[0])


# --- dataset -> order -----------------------------------------------------------------------

def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        # Several values (two station AE titles): all kept, as DICOM encodes them.
        value = "\\".join(str(part).strip() for part in value)
    return str(value).strip() or None


def _date(text: str | None) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text.replace(".", "")[:8], "%Y%m%d").date()
    except ValueError:
        raise BrokerError(f"date {text!r} is not YYYYMMDD") from None


def _first_item(ds: Dataset, keyword: str) -> Dataset:
    items = ds.get(keyword)
    return items[0] if items else Dataset()


def order_from_dataset(ds: Dataset, *, control: OrderControl = OrderControl.NEW,
                       message_control_id: str = "import-wl") -> Order:
    """The order that creates (or updates) the worklist item a dataset describes.

    The first item of its Scheduled Procedure Step Sequence is the scheduled step and the
    first item of its Requested Procedure Code Sequence the procedure code; every attribute,
    those included, is kept whole in ``item_dataset``.
    """
    step = _first_item(ds, "ScheduledProcedureStepSequence")
    code = _first_item(ds, "RequestedProcedureCodeSequence")
    start_date = _date(_text(step, "ScheduledProcedureStepStartDate"))
    start = None
    if start_date is not None:
        time_text = (_text(step, "ScheduledProcedureStepStartTime") or "").replace(":", "")
        digits = time_text.split(".")[0].ljust(6, "0")[:6]
        try:
            start = dt.datetime.combine(start_date, dt.time(
                int(digits[:2]), int(digits[2:4]), int(digits[4:6])))
        except ValueError:
            raise BrokerError(f"time {time_text!r} is not HHMMSS") from None
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
    return Order(control, patient, procedure, message_control_id=message_control_id)


def order_with_dataset(ds: Dataset, **kwargs: Any) -> Order:
    """:func:`order_from_dataset`, keeping the whole dataset with the order."""
    order = order_from_dataset(ds, **kwargs)
    return replace(order, procedure=replace(order.procedure, item_dataset=dataset_json(ds)))


# --- item -> dataset ------------------------------------------------------------------------

def _da(value: dt.date | None) -> str | None:
    return value.strftime("%Y%m%d") if value is not None else None


def _column_attributes(patient: PatientData, procedure: ProcedureData,
                       status: ItemStatus | None) -> dict[int, Any]:
    """What the columns hold, keyed by tag; the two sequences' single items as dicts."""
    start = procedure.scheduled_start
    step = {
        MODALITY: procedure.modality,
        STATION_AE_TITLE: procedure.scheduled_station_ae_title,
        SPS_START_DATE: _da(start),
        SPS_START_TIME: start.strftime("%H%M%S") if start is not None else None,
        SPS_ID: procedure.sps_id,
        SPS_DESCRIPTION: procedure.sps_description,
        PERFORMING_PHYSICIAN: procedure.scheduled_performing_physician_name,
        STATION_NAME: procedure.scheduled_station_name,
    }
    if status is not None:
        step[SPS_STATUS] = SPS_STATUS_TERMS.get(status, "")  # HELD has no DICOM term
    code = {
        CODE_VALUE: procedure.requested_procedure_code_value,
        CODING_SCHEME: procedure.requested_procedure_code_scheme,
        CODE_MEANING: procedure.requested_procedure_code_meaning,
    }
    return {
        PATIENT_NAME: patient.patient_name,
        PATIENT_ID: patient.patient_id or None,
        ISSUER_OF_PATIENT_ID: patient.issuer_of_patient_id,
        PATIENT_BIRTH_DATE: _da(patient.birth_date),
        PATIENT_SEX: patient.sex,
        ACCESSION_NUMBER: procedure.accession_number or None,
        REFERRING_PHYSICIAN: procedure.referring_physician_name,
        REQUESTING_PHYSICIAN: procedure.requesting_physician,
        STUDY_INSTANCE_UID: procedure.study_instance_uid,
        REQUESTED_PROCEDURE_ID: procedure.requested_procedure_id,
        REQUESTED_PROCEDURE_DESCRIPTION: procedure.requested_procedure_description,
        PRIORITY: procedure.requested_procedure_priority,
        PLACER_ORDER: procedure.placer_order_number,
        FILLER_ORDER: procedure.filler_order_number,
        CODE_SEQUENCE: code,
        SPS_SEQUENCE: step,
    }


def _copy(ds: Dataset) -> Dataset:
    """A new dataset holding the same elements (they are replaced, never changed)."""
    out = Dataset()
    for element in ds:
        out.add(element)
    return out


def _element(tag: int, value: Any) -> DataElement:
    vr = _VR[tag]
    if isinstance(value, str) and "\\" in value and vr in ("AE", "CS"):
        value = value.split("\\")
    return DataElement(tag, vr, value)


def _overlay(target: Dataset, now: dict[int, Any], before: dict[int, Any]) -> bool:
    """Write the values that changed since the dataset was kept; whether any did."""
    changed = False
    for tag, value in now.items():
        if isinstance(value, dict):
            continue
        if value is None or (value == before.get(tag) and tag in target):
            continue
        target.add(_element(tag, value))
        changed = True
    return changed


def _overlay_item(ds: Dataset, tag: int, now: dict[int, Any], before: dict[int, Any],
                  *, always: bool) -> None:
    """The same, inside the first item of a sequence (created when needed and ``always`` or
    something is to be written)."""
    if not any(value is not None and (value != before.get(key))
               for key, value in now.items()) and not always:
        return
    items = ds.get(tag)
    item = _copy(items[0]) if items else Dataset()
    if _overlay(item, now, before) or not items:
        rest = list(items[1:]) if items else []
        ds.add(DataElement(tag, "SQ", [item, *rest]))


def item_dataset(row: WorklistRow) -> Dataset:
    """The whole dataset of a stored item: everything it was given, with what the columns
    hold now written over it where it changed, and the step's status.

    Without Specific Character Set (the values are Unicode); never shared: the caller may
    change it.
    """
    if row.procedure.item_dataset:
        kept, before = _stored(row.procedure.item_dataset)
        ds = _copy(kept)
    else:
        ds, before = Dataset(), {}
    now = _column_attributes(row.patient, row.procedure, row.status)
    _overlay(ds, now, before)
    _overlay_item(ds, SPS_SEQUENCE, now[SPS_SEQUENCE], before.get(SPS_SEQUENCE, {}),
                  always=True)
    _overlay_item(ds, CODE_SEQUENCE, now[CODE_SEQUENCE], before.get(CODE_SEQUENCE, {}),
                  always=False)
    return ds


# --- worklist files -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    refused: list[tuple[str, str]]  # (file name, reason)
    seconds: float = 0.0


_BAD_FILE = (BrokerError, InvalidDicomError, OSError, ValueError, AttributeError, KeyError,
             TypeError, IndexError)


def _read(path: Path) -> Order:
    return order_with_dataset(dcmread(path, force=True))


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def import_worklist(store: Store, directory: Path, *, uid_root: str,
                    progress: Callable[[int], None] | None = None,
                    batch_size: int = BATCH_SIZE) -> ImportResult:
    """Import every ``*.wl`` file of a folder, a batch of files per transaction.

    A file that cannot be read or stored is reported by name and skipped; the others are
    imported. ``progress`` is told how many files each batch handled.
    """
    started = time.perf_counter()
    imported = 0
    refused: list[tuple[str, str]] = []
    for batch in _batches(sorted(Path(directory).glob("*.wl")), batch_size):
        orders: list[tuple[Path, Order]] = []
        for path in batch:
            try:
                orders.append((path, _read(path)))
            except _BAD_FILE as exc:
                refused.append((path.name, str(exc) or exc.__class__.__name__))
                log.warning("worklist file %s not imported: %s", path.name, exc)
        imported += _store_batch(store, orders, uid_root, refused)
        if progress is not None:
            progress(len(batch))
    return ImportResult(imported, refused, time.perf_counter() - started)


def _store_batch(store: Store, orders: list[tuple[Path, Order]], uid_root: str,
                 refused: list[tuple[str, str]]) -> int:
    """One transaction for the batch; if it fails, each file alone to find the bad ones."""
    try:
        with store.writing() as session:
            for _, order in orders:
                apply_order(session, order, uid_root=uid_root)
        return len(orders)
    except (BrokerError, SQLAlchemyError):
        pass
    stored = 0
    for path, order in orders:
        try:
            with store.writing() as session:
                apply_order(session, order, uid_root=uid_root)
        except (BrokerError, SQLAlchemyError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            refused.append((path.name, reason))
            log.warning("worklist file %s not imported: %s", path.name, reason)
            continue
        stored += 1
    return stored


def worklist_file(row: WorklistRow) -> Dataset:
    """A stored item as the ``.wl`` file wlmscpfs reads: its dataset, declared UTF-8."""
    ds = item_dataset(row)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _MWL_FIND
    ds.file_meta.MediaStorageSOPInstanceUID = row.procedure.study_instance_uid or "1.2.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _file_name(accession: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in accession) + ".wl"


def export_worklist(store: Store, directory: Path,
                    progress: Callable[[int], None] | None = None) -> int:
    """Write every visible worklist item as ``<accession>.wl``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    with store.reading() as session:
        rows = find_worklist(session, WorklistQuery(limit=100_000_000))
    for count, row in enumerate(rows, start=1):
        worklist_file(row).save_as(directory / _file_name(row.procedure.accession_number),
                                   enforce_file_format=True)
        if progress is not None and count % 100 == 0:
            progress(100)
    if progress is not None and len(rows) % 100:
        progress(len(rows) % 100)
    return len(rows)


def count_files(directory: Path) -> int:
    return sum(1 for _ in Path(directory).glob("*.wl"))

