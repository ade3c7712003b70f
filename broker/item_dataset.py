"""A worklist item as a DICOM dataset and back: the one conversion every path uses (worklist
files, the C-FIND renderer, the HL7 mapping's extra attributes, REST calls). It belongs to the
core: the edges that turn DICOM or HL7 into items, or items into answers, all call it.

- :func:`order_from_dataset`: a dataset (a file's, a REST call's) -> an :class:`Order`. The
  attributes the store keeps in columns (those modalities filter on) are read into the
  order's fields, and the whole dataset is kept as DICOM JSON (``item_dataset``), so that
  nothing the item was given is lost: Allergies, Medical Alerts, several station AE titles,
  private attributes...
- :func:`item_dataset`: a stored item -> its dataset: the kept dataset, with the values of
  the columns that changed since (an XO order, an ADT update, the step status) written over
  it. A value that did not change keeps the form it was given in (``0856`` stays ``0856``).
  :func:`item_view` reads the same attribute by attribute (the C-FIND renderer).

Other edges making items from DICOM (REST calls carrying tags) build a pydicom Dataset and
call :func:`order_from_dataset`; nothing else turns a dataset into an item.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from broker.dicom_tags import (
    ACCESSION_NUMBER,
    CODE_MEANING,
    CODE_SEQUENCE,
    CODE_VALUE,
    CODING_SCHEME,
    FILLER_ORDER,
    ISSUER_OF_PATIENT_ID,
    MODALITY,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    PATIENT_SEX,
    PERFORMING_PHYSICIAN,
    PLACER_ORDER,
    PRIORITY,
    REFERRING_PHYSICIAN,
    REQUESTED_PROCEDURE_DESCRIPTION,
    REQUESTED_PROCEDURE_ID,
    REQUESTING_PHYSICIAN,
    SPECIFIC_CHARACTER_SET,
    SPS_DESCRIPTION,
    SPS_ID,
    SPS_SEQUENCE,
    SPS_START_DATE,
    SPS_START_TIME,
    SPS_STATUS,
    STATION_AE_TITLE,
    STATION_NAME,
    STUDY_INSTANCE_UID,
)
from broker.domain import (
    ItemStatus,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    WorklistRow,
)
from broker.errors import BrokerError

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

Json = dict[str, Any]

# Value representations read straight from a file's bytes (pydicom's conversion of each raw
# element is most of an import's time); the others go through pydicom.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
_ONE_VALUE_VRS = frozenset({"LT", "ST", "UT", "UR"})  # a backslash is text there
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def _key(tag: int) -> str:
    return f"{tag:08X}"


def _pn_json(text: str) -> dict[str, str]:
    groups = text.split("=")
    out = {"Alphabetic": groups[0]}
    for name, group in zip(("Ideographic", "Phonetic"), groups[1:], strict=False):
        out[name] = group
    return out


def _raw_text_json(vr: str, raw: bytes, codec: str) -> Json:
    text = raw.decode(codec if vr in _CHARSET_VRS else "ascii", errors="replace")
    text = text.rstrip("\x00 ") if vr in _ONE_VALUE_VRS or vr == "UI" else text.rstrip(" \x00")
    if not text:
        return {"vr": vr}
    parts = [text] if vr in _ONE_VALUE_VRS else text.split("\\")
    if vr not in _ONE_VALUE_VRS:
        parts = [part.strip(" ") if vr not in _CHARSET_VRS or vr == "PN" else part.rstrip(" ")
                 for part in parts]
    if vr == "PN":
        return {"vr": vr, "Value": [_pn_json(part) for part in parts]}
    return {"vr": vr, "Value": parts}


def _element_json(ds: Dataset, tag: Any, codec: str | None) -> Json:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if (codec is not None and isinstance(raw, RawDataElement) and vr in TEXT_VRS
            and raw.value is not None):
        return _raw_text_json(vr, raw.value, codec)
    element = ds[tag]
    if element.VR == "SQ":
        items = [_json_dict(item, codec) for item in element.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    encoded = element.to_json_dict(None, None)
    if element.VR in ("DS", "IS") and element.value not in (None, ""):
        # DS and IS as the strings they were (PS3.18 F.2.3.1 allows it): a JSON number
        # would turn a weight of 70 into 70.0.
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        encoded["Value"] = [getattr(v, "original_string", None) or str(v) for v in values]
    return encoded


def _single_codec(ds: Dataset) -> str | None:
    """The one Python codec of the dataset's character set; None when it switches sets
    (ISO 2022 escapes): pydicom decodes those."""
    value = ds.get_item(SPECIFIC_CHARACTER_SET)
    if value is None:
        return "iso8859"  # the default repertoire; pydicom reads it as Latin-1 too
    names = ds.SpecificCharacterSet
    names = [names] if isinstance(names, str) else list(names)
    if len(names) > 1 or (names and "2022" in str(names[0])):
        return None
    return convert_encodings(names)[0]


def _json_dict(ds: Dataset, codec: str | None) -> Json:
    """``codec`` None: every element through pydicom's own conversion."""
    out: Json = {}
    for tag in ds.keys():
        if tag.element == 0 or tag.group == 0x0002 or tag == SPECIFIC_CHARACTER_SET:
            continue  # group lengths and file meta describe an encoding, not the item
        out[_key(tag)] = _element_json(ds, tag, codec)
    return out


def dataset_dict(ds: Dataset) -> Json:
    """A dataset as a DICOM JSON object (PS3.18 F), without its file meta and Specific
    Character Set: the values are Unicode from then on."""
    return _json_dict(ds, _single_codec(ds))


def dataset_json(ds: Dataset) -> str:
    """:func:`dataset_dict` as text, as ``item_dataset`` keeps it."""
    return json.dumps(dataset_dict(ds), ensure_ascii=False, separators=(",", ":"))


def _dataset_from_dict(data: Json) -> Dataset:
    """A DICOM JSON object back into a dataset: text values and sequences directly (DS and
    IS as the strings they were kept as), anything else through pydicom."""
    ds = Dataset()
    for key, element in data.items():
        vr = element.get("vr")
        values = element.get("Value")
        tag = int(key, 16)
        if vr == "SQ":
            ds.add(DataElement(tag, vr, [_dataset_from_dict(item) for item in values or ()]))
        elif vr in TEXT_VRS and set(element) <= {"vr", "Value"} and all(
                isinstance(v, str | dict) for v in values or ()):
            if vr == "PN":
                values = [_text({"x": {"Value": [v]}}, "x") or "" for v in values or ()]
            value: Any = None
            if values:
                value = values[0] if len(values) == 1 else values
            # Values written by dataset_json, from values pydicom had read or checked.
            ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
        else:
            value_key = next(iter(set(element) - {"vr"}), "Value")
            ds.add(DataElement.from_json(Dataset, key, vr, element.get(value_key), value_key))
    return ds


@lru_cache(maxsize=512)
def _stored(text: str) -> tuple[Dataset, dict[int, Any]]:
    """A kept dataset, and what the columns would hold for it; parsed once per text (items
    are rendered on every poll). Never modified: :func:`item_dataset` copies what it
    changes.

    A day's items at a large site, no more: each parsed dataset is some thirty objects that
    every full garbage collection walks with all threads stopped (8,192 of them made ~100 ms
    pauses), and the C-FIND answers, kept encoded (broker.dicom.worklist), spare most
    renders anyway."""
    data = json.loads(text)
    ds = _dataset_from_dict(data)
    try:
        order = order_from_json(data)
    except (BrokerError, ValueError):
        # A value the columns could not take: it was never in the columns either.
        order = Order(OrderControl.NEW, PatientData(""), ProcedureData(""))
    return ds, _column_attributes(order.patient, order.procedure, None)


# --- dataset -> order -----------------------------------------------------------------------

def _values(data: Json, tag: int | str) -> list[Any]:
    element = data.get(tag if isinstance(tag, str) else _key(tag))
    return (element or {}).get("Value") or []


def _text(data: Json, tag: int | str) -> str | None:
    """An attribute's text as the columns keep it: several values joined by a backslash (two
    station AE titles), a person name as ``alphabetic=ideographic=phonetic``."""
    parts = []
    for value in _values(data, tag):
        if isinstance(value, dict):
            value = "=".join((value.get("Alphabetic", ""), value.get("Ideographic", ""),
                              value.get("Phonetic", ""))).rstrip("=")
        parts.append(str(value).strip())
    return "\\".join(parts).strip() or None


def _date(text: str | None) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text.replace(".", "")[:8], "%Y%m%d").date()
    except ValueError:
        raise BrokerError(f"date {text!r} is not YYYYMMDD") from None


def _first_item(data: Json, tag: int) -> Json:
    items = _values(data, tag)
    return items[0] if items else {}


def order_from_json(data: Json, *, control: OrderControl = OrderControl.NEW,
                    message_control_id: str = "import-wl") -> Order:
    """The order that creates (or updates) the worklist item a DICOM JSON dataset describes.

    The first item of its Scheduled Procedure Step Sequence is the scheduled step and the
    first item of its Requested Procedure Code Sequence the procedure code. The dataset is
    not attached: :func:`order_from_dataset` does that.
    """
    step = _first_item(data, SPS_SEQUENCE)
    code = _first_item(data, CODE_SEQUENCE)
    start_date = _date(_text(step, SPS_START_DATE))
    start = None
    if start_date is not None:
        time_text = (_text(step, SPS_START_TIME) or "").replace(":", "")
        digits = time_text.split(".")[0].ljust(6, "0")[:6]
        try:
            start = dt.datetime.combine(start_date, dt.time(
                int(digits[:2]), int(digits[2:4]), int(digits[4:6])))
        except ValueError:
            raise BrokerError(f"time {time_text!r} is not HHMMSS") from None
    patient = PatientData(
        patient_id=_text(data, PATIENT_ID) or "",
        issuer_of_patient_id=_text(data, ISSUER_OF_PATIENT_ID),
        patient_name=_text(data, PATIENT_NAME),
        birth_date=_date(_text(data, PATIENT_BIRTH_DATE)),
        sex=_text(data, PATIENT_SEX),
    )
    procedure = ProcedureData(
        accession_number=_text(data, ACCESSION_NUMBER) or "",
        study_instance_uid=_text(data, STUDY_INSTANCE_UID),
        requested_procedure_id=_text(data, REQUESTED_PROCEDURE_ID),
        requested_procedure_description=_text(data, REQUESTED_PROCEDURE_DESCRIPTION),
        requested_procedure_code_value=_text(code, CODE_VALUE),
        requested_procedure_code_scheme=_text(code, CODING_SCHEME),
        requested_procedure_code_meaning=_text(code, CODE_MEANING),
        sps_id=_text(step, SPS_ID),
        sps_description=_text(step, SPS_DESCRIPTION),
        modality=_text(step, MODALITY),
        scheduled_station_ae_title=_text(step, STATION_AE_TITLE),
        scheduled_start=start,
        referring_physician_name=_text(data, REFERRING_PHYSICIAN),
        requesting_physician=_text(data, REQUESTING_PHYSICIAN),
        placer_order_number=_text(data, PLACER_ORDER),
        filler_order_number=_text(data, FILLER_ORDER),
        scheduled_performing_physician_name=_text(step, PERFORMING_PHYSICIAN),
        scheduled_station_name=_text(step, STATION_NAME),
        requested_procedure_priority=_text(data, PRIORITY),
    )
    return Order(control, patient, procedure, message_control_id=message_control_id)


def order_from_dataset(ds: Dataset, *, control: OrderControl = OrderControl.NEW,
                       message_control_id: str = "import-wl") -> Order:
    """The order that creates (or updates) the worklist item a dataset describes (a worklist
    file, a REST call's tags), keeping the whole dataset with it (``item_dataset``)."""
    data = dataset_dict(ds)
    order = order_from_json(data, control=control, message_control_id=message_control_id)
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return replace(order, procedure=replace(order.procedure, item_dataset=text))


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


@dataclass(frozen=True, slots=True)
class ItemView:
    """A stored item's dataset, read attribute by attribute: what the columns hold now where
    it changed since the dataset was kept (an XO order, an ADT update, the step status), the
    kept dataset otherwise. :func:`item_dataset` materialises it; the C-FIND renderer reads
    only the keys a query asks for."""

    kept: Dataset | None
    now: dict[int, Any]  # column values; the two sequences' first items as dicts
    before: dict[int, Any]  # what the columns held for the kept dataset

    def _changed(self, tag: int) -> Any:
        value = self.now.get(tag)
        if value is None or isinstance(value, dict):
            return None
        if value == self.before.get(tag) and self.kept is not None and tag in self.kept:
            return None  # unchanged: the kept value, in the form it was given
        return value

    def element(self, tag: int) -> DataElement | None:
        found = self.value(tag)
        if found is None:
            return None
        vr, value, converted = found
        return DataElement(tag, vr, value, already_converted=converted,
                           validation_mode=config.IGNORE)  # the store's values

    def value(self, tag: int) -> tuple[str, Any, bool] | None:
        """(VR, value, whether pydicom converted the value already), or None."""
        value = self._changed(tag)
        if value is not None:
            vr = _VR[tag]
            if isinstance(value, str) and "\\" in value and vr in ("AE", "CS"):
                value = value.split("\\")
            return vr, value, False
        if self.kept is None or tag not in self.kept:
            return None
        element = self.kept[tag]
        return element.VR, element.value, True

    def items(self, tag: int) -> list[ItemView]:
        kept = self.kept.get_item(tag) if self.kept is not None else None
        kept_items = list(kept.value) if kept is not None and kept.VR == "SQ" else []
        column_item = self.now.get(tag)
        if not isinstance(column_item, dict):
            return [ItemView(item, {}, {}) for item in kept_items]
        first = ItemView(kept_items[0] if kept_items else None, column_item,
                         self.before.get(tag, {}))
        if (not kept_items and tag != SPS_SEQUENCE
                and all(first._changed(key) is None for key in column_item)):
            return []  # no procedure code at all: no empty item either
        return [first, *(ItemView(item, {}, {}) for item in kept_items[1:])]

    def tags(self) -> list[int]:
        tags = {int(tag) for tag in self.kept.keys()} if self.kept is not None else set()
        tags.update(tag for tag in self.now if self._changed(tag) is not None)
        for tag, value in self.now.items():
            if isinstance(value, dict) and self.items(tag):
                tags.add(tag)
        return sorted(tags)

    def is_sequence(self, tag: int) -> bool:
        if isinstance(self.now.get(tag), dict):
            return True
        return self.kept is not None and tag in self.kept and self.kept[tag].VR == "SQ"

    def to_dataset(self) -> Dataset:
        ds = Dataset()
        for tag in self.tags():
            if self.is_sequence(tag):
                ds.add(DataElement(tag, "SQ", [item.to_dataset() for item in self.items(tag)]))
            else:
                element = self.element(tag)
                if element is not None:
                    ds.add(element)
        return ds


def item_view(row: WorklistRow) -> ItemView:
    kept, before = _stored(row.procedure.item_dataset) if row.procedure.item_dataset else (
        None, {})
    return ItemView(kept, _column_attributes(row.patient, row.procedure, row.status), before)


def item_dataset(row: WorklistRow) -> Dataset:
    """The whole dataset of a stored item: everything it was given, with what the columns
    hold now written over it where it changed, and the step's status.

    Without Specific Character Set (the values are Unicode); a new dataset the caller may
    change (its elements may share values with the kept dataset: replace, never mutate).
    """
    return item_view(row).to_dataset()
