"""Modality Worklist C-FIND: the request identifier into a :class:`WorklistQuery`, and each
matching :class:`WorklistRow` back into a response identifier holding only the keys asked for.

The broker supports the keys of the Modality Worklist Information Model (PS3.4 K.6.1.2.2) it
stores; every other key, private ones included, is matched universally, so a query naming an
attribute the broker does not know still gets its answers.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from pydicom import Dataset, config
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

from broker.dicom.charsets import Unencodable, codec_for, recode
from broker.dicom.wl_files import text_bytes
from broker.dicom_tags import (
    ACCESSION_NUMBER,
    CODE_MEANING,
    CODE_SEQUENCE,
    CODE_VALUE,
    CODING_SCHEME,
    CONTRAST_AGENT,
    FILLER_ORDER,
    ISSUER_OF_PATIENT_ID,
    MODALITY,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    PATIENT_SEX,
    PERFORMING_PHYSICIAN,
    PLACER_ORDER,
    PRE_MEDICATION,
    PRIORITY,
    REFERRING_PHYSICIAN,
    REQUESTED_PROCEDURE_DESCRIPTION,
    REQUESTED_PROCEDURE_ID,
    REQUESTING_PHYSICIAN,
    SPECIFIC_CHARACTER_SET,
    SPS_DESCRIPTION,
    SPS_ID,
    SPS_LOCATION,
    SPS_SEQUENCE,
    SPS_START_DATE,
    SPS_START_TIME,
    SPS_STATUS,
    STATION_AE_TITLE,
    STATION_NAME,
    STUDY_INSTANCE_UID,
)
from broker.domain import ItemStatus, PatientData, ProcedureData, WorklistRow
from broker.item_dataset import SPS_STATUS_TERMS, ItemView, item_view
from broker.matching import WorklistQuery, wildcard_regex

__all__ = ["MATCHED_TAGS", "SPS_STATUS_TERMS", "answer_encoder", "key_text",
           "query_from_identifier", "render_response", "response_renderer"]

# Text value representations, encoded once per answer (_LONG_TEXT_VRS may exceed 64 KiB).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
_LONG_TEXT_VRS = frozenset({"UC", "UR", "UT"})

# Values are stored as Unicode, so every response declares UTF-8 (PS3.3 C.12.1.1.2).
RESPONSE_CHARACTER_SET = "ISO_IR 192"



# The keys that become filters, at the top level and in the single item of a sequence key:
# every attribute the broker stores (docs/worklist-matching.md).
_TOP_KEYS: dict[int, str] = {
    ACCESSION_NUMBER: "accession_number",
    PATIENT_ID: "patient_id",
    ISSUER_OF_PATIENT_ID: "issuer_of_patient_id",
    PATIENT_NAME: "patient_name",
    PATIENT_BIRTH_DATE: "patient_birth_date",
    PATIENT_SEX: "patient_sex",
    REFERRING_PHYSICIAN: "referring_physician_name",
    REQUESTING_PHYSICIAN: "requesting_physician",
    PLACER_ORDER: "placer_order_number",
    FILLER_ORDER: "filler_order_number",
    REQUESTED_PROCEDURE_ID: "requested_procedure_id",
    REQUESTED_PROCEDURE_DESCRIPTION: "requested_procedure_description",
    STUDY_INSTANCE_UID: "study_instance_uid",
    PRIORITY: "requested_procedure_priority",
}
_SPS_KEYS: dict[int, str] = {
    MODALITY: "modality",
    STATION_AE_TITLE: "scheduled_station_ae_title",
    SPS_START_DATE: "scheduled_start_date",
    SPS_START_TIME: "scheduled_start_time",
    SPS_ID: "sps_id",
    SPS_DESCRIPTION: "sps_description",
    PERFORMING_PHYSICIAN: "scheduled_performing_physician_name",
    STATION_NAME: "scheduled_station_name",
}
_CODE_KEYS: dict[int, str] = {
    CODE_VALUE: "requested_procedure_code_value",
    CODING_SCHEME: "requested_procedure_code_scheme",
    CODE_MEANING: "requested_procedure_code_meaning",
}
# Every key whose value becomes a filter: a value the broker cannot read there is refused,
# elsewhere it is read as universal (broker.dicom.identifier).
MATCHED_TAGS = frozenset({*_TOP_KEYS, *_SPS_KEYS, *_CODE_KEYS, SPS_STATUS})
_NAME_KEYS = ("patient_name", "referring_physician_name", "requesting_physician",
              "scheduled_performing_physician_name")


# --- request -> query -------------------------------------------------------------------

def key_text(value: Any) -> str | None:
    """A key's value as the matching code reads it: ``None`` for universal matching."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(part).strip() for part in value)
    elif isinstance(value, bytes):
        text = value.decode("ascii", errors="replace")
    elif isinstance(value, PersonName):
        text = str(value)
    else:
        text = str(value)
    text = text.strip()
    return text or None


def _key(dataset: Dataset, tag: int) -> str | None:
    if tag not in dataset:
        return None
    return key_text(dataset[tag].value)


def _wildcard_regex(value: str) -> re.Pattern[str]:
    # Atomic: a run of "*" against a status term took exponential time (wildcard_regex).
    return re.compile(wildcard_regex(value, one=".", atomic=True), re.DOTALL)


def _statuses(value: str) -> tuple[ItemStatus, ...]:
    """The item statuses a Scheduled Procedure Step Status key selects (single, wild card,
    or a ``\\`` list); a term the broker never uses (ARRIVED, READY...) selects nothing."""
    patterns = [_wildcard_regex(part.strip().upper()) for part in value.split("\\")
                if part.strip()]
    return tuple(status for status, term in SPS_STATUS_TERMS.items()
                 if any(p.fullmatch(term) for p in patterns))


def _item_keys(identifier: Dataset, sequence: int, keys: Mapping[int, str]) -> dict[str, Any]:
    """The keys of a sequence key's item (PS3.4 C.2.2.2.6: a single item); none when the
    sequence is zero-length or its item empty (universal matching)."""
    if sequence not in identifier:
        return {}
    items = identifier[sequence].value
    if not items:
        return {}
    return {name: _key(items[0], tag) for tag, name in keys.items()}


def query_from_identifier(identifier: Dataset, *, max_matches: int,
                          names_case_sensitive: bool = False) -> WorklistQuery:
    """The worklist query a C-FIND identifier asks.

    Reads the top-level keys and those of the single item of the Scheduled Procedure Step
    Sequence and of the Requested Procedure Code Sequence (PS3.4 C.2.2.2.6). pydicom decodes
    the values with the identifier's Specific Character Set. Keys the broker does not store,
    in these items or anywhere else, are universal; a malformed date or time is reported when
    the query runs (:class:`broker.matching.InvalidQuery`).
    """
    fields: dict[str, Any] = {name: _key(identifier, tag) for tag, name in _TOP_KEYS.items()}
    fields.update(_item_keys(identifier, SPS_SEQUENCE, {**_SPS_KEYS, SPS_STATUS: "status"}))
    fields.update(_item_keys(identifier, CODE_SEQUENCE, _CODE_KEYS))
    status = fields.pop("status", None)
    if status is not None and status != "*":
        fields["statuses"] = _statuses(status)
    for name in _NAME_KEYS:
        # Empty trailing PN components and groups ("DOE^JOHN^^^", "DOE^JOHN==") name the same
        # person as "DOE^JOHN" (PS3.5 6.2.1), the form names are stored in.
        if fields.get(name) is not None:
            fields[name] = fields[name].rstrip("^=") or None
    return WorklistQuery(limit=max_matches, names_case_sensitive=names_case_sensitive,
                         **fields)


# --- row -> response --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Key:
    """One key of the response: a plain attribute, or a sequence rendered from ``item`` (the
    request item's keys) or, when ``whole``, returned whole with ``item`` as the attributes
    to return empty where the stored item lacks them."""

    tag: int
    vr: str
    item: tuple[_Key, ...] | None = None
    whole: bool = False


def _plain(tag: int, vr: str) -> _Key:
    return _Key(tag, vr)


# What a zero-length sequence key (or one with an empty item) returns: the whole item
# (PS3.4 C.2.2.2.6, K.2.2.1.2 note 4), that is every attribute the item holds, and every
# Type 1, 1C, 2 and 2C attribute of PS3.4 table K.6-1 for it, empty when the item has none.
_FULL_ITEMS: dict[int, tuple[_Key, ...]] = {
    SPS_SEQUENCE: (
        _plain(MODALITY, "CS"), _plain(STATION_AE_TITLE, "AE"), _plain(SPS_START_DATE, "DA"),
        _plain(SPS_START_TIME, "TM"), _plain(PERFORMING_PHYSICIAN, "PN"),
        _plain(SPS_DESCRIPTION, "LO"), _plain(SPS_ID, "SH"), _plain(STATION_NAME, "SH"),
        _plain(SPS_LOCATION, "SH"), _plain(PRE_MEDICATION, "LO"),
        _plain(CONTRAST_AGENT, "LO"), _plain(SPS_STATUS, "CS"),
    ),
    CODE_SEQUENCE: (
        _plain(CODE_VALUE, "SH"), _plain(CODING_SCHEME, "SH"), _plain(CODE_MEANING, "LO"),
    ),
}


def _plan(template: Dataset) -> tuple[_Key, ...]:
    keys: list[_Key] = []
    for element in template:
        tag = element.tag
        if tag == SPECIFIC_CHARACTER_SET or tag.element == 0:
            continue  # set by the broker / group lengths are not keys
        if tag.is_private:
            # Private keys are outside the Worklist Information Model; answering them empty
            # without their private creator would make an ill-formed dataset.
            continue
        vr = element.VR.split(" or ")[0]
        # Plain ints: pydicom's tag type compares slowly, and these are looked up per match.
        if vr != "SQ":
            keys.append(_Key(int(tag), vr))
            continue
        items = element.value
        if items and len(items[0]) > 0:
            keys.append(_Key(int(tag), vr, _plan(items[0])))
        else:
            keys.append(_Key(int(tag), vr, _FULL_ITEMS.get(int(tag), ()), whole=True))
    return tuple(keys)


def _whole(item: ItemView, required: Sequence[_Key]) -> Dataset:
    """A stored sequence item as it is, with the attributes a zero-length key must return
    added empty where it has none."""
    out = Dataset()
    for tag in item.tags():
        if item.is_sequence(tag):
            out.add(DataElement(tag, "SQ", [_whole(inner, ()) for inner in item.items(tag)]))
            continue
        found = item.value(tag)
        if found is not None:
            # Values are replaced, never changed in place (charsets.recode too): the new
            # element may share the kept one's value.
            vr, value, converted = found
            out.add(DataElement(tag, vr, value, already_converted=converted,
                                validation_mode=config.IGNORE))
    for key in required:
        if key.tag not in out:
            out.add(DataElement(key.tag, key.vr, None))
    return out


def _emit(keys: Sequence[_Key], source: ItemView) -> Dataset:
    out = Dataset()
    for key in keys:
        if key.item is None:
            found = None if source.is_sequence(key.tag) else source.value(key.tag)
            if found is None:
                out.add(DataElement(key.tag, key.vr, None))
            else:
                vr, value, converted = found
                # The store's values were checked when they came in.
                out.add(DataElement(key.tag, vr, value, already_converted=converted,
                                    validation_mode=config.IGNORE))
            continue
        items = source.items(key.tag) if source.is_sequence(key.tag) else []
        if key.whole:
            rendered = [_whole(item, key.item) for item in items]
        else:
            rendered = [_emit(key.item, item) for item in items]
        out.add(DataElement(key.tag, "SQ", rendered))
    return out


def response_renderer(identifier: Dataset) -> Callable[[WorklistRow], Dataset]:
    """Read the identifier's keys once; the returned function renders one row per call.

    The hot path of a modality poll: the identifier is walked once per query rather than
    once per match.
    """
    keys = _plan(identifier)

    def render(row: WorklistRow) -> Dataset:
        response = _emit(keys, item_view(row))
        response.SpecificCharacterSet = RESPONSE_CHARACTER_SET
        return response

    return render


# --- answers encoded once per query shape -----------------------------------------------

# Encoded answers kept, by query shape, item and character set. An item that changes is a
# different row, so a different key: the old answer is never served, it ages out.
_ANSWER_CACHE_SIZE = 20_000
# An answer as kept: each top-level element's tag, VR and value bytes, already in the
# association's transfer syntax and character set. Only atomic values, in keys too: the
# garbage collector stops walking such tuples after one pass. Kept as Datasets, 20,000
# answers were about a million objects for every full collection to walk, and each walk
# stops every thread (C-FINDs in flight too) for over 100 ms.
_Stored = tuple[tuple[int, str, bytes], ...]
_answers: OrderedDict[tuple[Any, ...], _Stored] = OrderedDict()
_answers_lock = threading.Lock()
# Each query shape's number, so that the keys above hold only atomic values too.
_shapes: dict[tuple[_Key, ...], int] = {}
_SHAPES_MAX = 10_000
_PATIENT_FIELDS = tuple(f.name for f in fields(PatientData))
_PROCEDURE_FIELDS = tuple(f.name for f in fields(ProcedureData))


def _row_key(row: WorklistRow) -> tuple[Any, ...]:
    """The row's values, flat (str, dates, None): equal for equal rows."""
    patient, procedure = row.patient, row.procedure
    return (tuple([getattr(patient, name) for name in _PATIENT_FIELDS]),
            tuple([getattr(procedure, name) for name in _PROCEDURE_FIELDS]), row.status.value)


def _store_form(response: Dataset, codec: str, encodings: list[str],
                syntax: tuple[bool, bool]) -> _Stored:
    implicit, little = syntax
    stored = []
    frozen = _frozen(response, codec, encodings, syntax)
    for tag in sorted(frozen.keys()):
        element = frozen.get_item(tag)
        if element.is_raw:
            value = element.value
        else:  # numbers, binary values, sequences: pydicom encodes them, once
            out = DicomBytesIO()
            out.is_implicit_VR, out.is_little_endian = implicit, little
            write_data_element(out, element, encodings)
            long_header = not implicit and element.VR in EXPLICIT_VR_LENGTH_32
            value = out.getvalue()[12 if long_header else 8:]
        stored.append((int(tag), str(element.VR), bytes(value)))
    return tuple(stored)


def _served_form(stored: _Stored, encodings: list[str], syntax: tuple[bool, bool]) -> Dataset:
    """A Dataset of raw elements, which pydicom writes as they are (a sequence included)."""
    implicit, little = syntax
    elements = {}
    for number, vr, value in stored:
        tag = BaseTag(number)
        elements[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, little)
    answer = Dataset(elements, parent_encoding=encodings)
    answer.set_original_encoding(implicit, little, encodings)
    return answer


def _frozen(response: Dataset, codec: str, encodings: list[str],
            syntax: tuple[bool, bool]) -> Dataset:
    """The response with its text values encoded once: raw elements, which pydicom writes as
    they are when the dataset says it is already in the association's transfer syntax and
    character set (else it decodes them all again). Numbers and binary values stay for
    pydicom to encode."""
    out = Dataset(parent_encoding=encodings)
    out.set_original_encoding(*syntax, encodings)
    for element in response:
        if element.VR == "SQ":
            out.add(DataElement(element.tag, "SQ", [_frozen(item, codec, encodings, syntax)
                                                     for item in element.value]))
            continue
        data = text_bytes(element, codec) if element.VR in _TEXT_VRS else None
        if data is None or (len(data) > 0xFFFF and element.VR not in _LONG_TEXT_VRS):
            out.add(element)
            continue
        out[element.tag] = RawDataElement(element.tag, element.VR, len(data), data, 0,
                                          syntax[0], syntax[1])
    return out


def answer_encoder(identifier: Dataset, *, character_set: str | None = None,
                   unencodable: Unencodable = "transliterate", implicit_vr: bool = True,
                   little_endian: bool = True) -> Callable[[WorklistRow], Dataset]:
    """:func:`response_renderer` for the wire: each item's answer to this query shape is
    rendered and encoded once, then served to every query of the same shape (a modality's
    poll repeats its query) until the item changes, as a Dataset of raw elements that
    pydicom writes as they are.

    ``character_set``: the calling modality's (``dicom.modalities.<AE>.character_set``), else
    ISO_IR 192. ``implicit_vr``, ``little_endian``: the association's transfer syntax.
    """
    keys = _plan(identifier)
    render = response_renderer(identifier)
    codec = codec_for(character_set) if character_set is not None else "utf-8"
    # pydicom's form of the character set (Python codecs), as it compares it before writing.
    encodings = convert_encodings(character_set or RESPONSE_CHARACTER_SET)
    syntax = (implicit_vr, little_endian)

    with _answers_lock:
        shape = _shapes.get(keys)
        if shape is None:
            if len(_shapes) >= _SHAPES_MAX:  # a numbering is only good with its answers
                _shapes.clear()
                _answers.clear()
            shape = _shapes[keys] = len(_shapes)

    def answer(row: WorklistRow) -> Dataset:
        key = (shape, _row_key(row), character_set, unencodable, syntax)
        with _answers_lock:
            found = _answers.get(key)
            if found is not None:
                _answers.move_to_end(key)
        if found is None:
            response = render(row)
            if character_set is not None:
                recode(response, character_set, unencodable)
            found = _store_form(response, codec, encodings, syntax)
            with _answers_lock:
                _answers[key] = found
                if len(_answers) > _ANSWER_CACHE_SIZE:
                    _answers.popitem(last=False)
        return _served_form(found, encodings, syntax)

    return answer


def render_response(identifier: Dataset, row: WorklistRow) -> Dataset:
    """The C-FIND response identifier for one match: only the keys asked for, nested as asked,
    with the values of the item's whole dataset (:func:`broker.item_dataset.item_view`).

    A sequence key with an item renders that item's keys for each of the row's items; a
    zero-length sequence key (or one with an empty item) returns the items whole. Keys the
    item has no value for come back empty. Specific Character Set is always ISO_IR 192.
    """
    return response_renderer(identifier)(row)
