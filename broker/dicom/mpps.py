"""Modality Performed Procedure Step N-CREATE / N-SET (PS3.4 Annex F): the received datasets
into :class:`MppsCreate` / :class:`MppsSet`, the core's verdict into a DICOM status.

Status codes (PS3.7 C.4 and the MPPS N-CREATE / N-SET tables of PS3.4 F.7.2 and PS3.2
N.7.3.2.2): 0x0120 Missing Attribute when Performed Procedure Step Status is absent from an
N-CREATE, 0x0121 Missing Attribute Value when it is empty, 0x0106 Invalid Attribute Value when
the dataset cannot be decoded or a date/time cannot be read, 0x0110 Processing Failure when the
database fails. The core's own refusals (duplicate 0x0111, unknown instance 0x0112, an update
after COMPLETED 0x0110) arrive as :class:`MppsError`.

N-GET (MPPS Retrieve SOP Class, PS3.4 F.8) answers from the kept dataset: the requested
attributes the broker holds (an SCU must cope with unmaintained ones being left out, F.8.2.1),
every attribute for an empty Attribute Identifier List, 0x0112 for an unknown instance.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from pydicom import Dataset
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from broker.config import MppsDestination
from broker.domain import (
    DEFAULT_REPORTING,
    MppsCreate,
    MppsResult,
    MppsSet,
    ScheduledStepRef,
    StatusReporting,
)
from broker.errors import MppsError
from broker.matching import InvalidQuery, parse_date, parse_time
from broker.mpps import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    PROCESSING_FAILURE,
    record_mpps_create,
    record_mpps_set,
    stored_attributes,
)
from broker.store import Store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121

# Error Comment (0000,0902) is LO: at most 64 characters (PS3.7 C.4).
_MAX_COMMENT = 64

StatusType = int | Dataset
Response = tuple[StatusType, Dataset | None]


def failure(status: int, comment: str, error_id: int | None = None) -> Dataset:
    """A status dataset the pynetdicom handlers return: the code, an Error Comment and, where
    the standard names one, an Error ID."""
    result = Dataset()
    result.Status = status
    result.ErrorComment = comment[:_MAX_COMMENT]
    if error_id is not None:
        result.ErrorID = error_id
    return result


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _datetime(dataset: Dataset, date_keyword: str, time_keyword: str) -> dt.datetime | None:
    """A DA + TM pair as one naive datetime; a missing time means the start of the day."""
    date_text = _text(dataset, date_keyword)
    if date_text is None:
        return None
    time_text = _text(dataset, time_keyword)
    try:
        day = parse_date(date_text)
        time = parse_time(time_text)[0] if time_text else dt.time()
    except InvalidQuery as exc:
        raise MppsError(INVALID_ATTRIBUTE_VALUE, f"{date_keyword}/{time_keyword}: "
                                                 f"{exc.reason}") from None
    return dt.datetime.combine(day, time)


def _steps(dataset: Dataset) -> tuple[ScheduledStepRef, ...]:
    items = dataset.get("ScheduledStepAttributesSequence") or []
    return tuple(
        ScheduledStepRef(
            accession_number=_text(item, "AccessionNumber"),
            study_instance_uid=_text(item, "StudyInstanceUID"),
            requested_procedure_id=_text(item, "RequestedProcedureID"),
            sps_id=_text(item, "ScheduledProcedureStepID"),
        )
        for item in items
    )


# Text VRs (PS3.5 6.2): a value pydicom cannot convert is still text, in the dataset's
# character set, whatever the transfer syntax.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})


def _name(tag: BaseTag) -> str:
    return f"{tag} {keyword_for_tag(tag) if not tag.is_private else ''}".strip()


def _as_received(raw: RawDataElement | DataElement | None, tag: BaseTag,
                 encodings: list[str], exc: Exception) -> dict[str, Any]:
    """A text value pydicom cannot put into DICOM JSON (IS ``abc``, DS ``x,y``, an IS of
    5,000 digits): kept as the text received, as UT, which holds any text unchanged (no
    length limit, backslashes are not delimiters). N-GET writes it back as those characters
    in the dataset's character set; every reader of the kept JSON can read it."""
    vr = raw.VR if raw is not None else None
    if vr is None:
        vr = _expected_vr(tag)
    if isinstance(raw, RawDataElement) and vr in _TEXT_VRS and isinstance(raw.value,
                                                                           bytes | None):
        text = decode_bytes((raw.value or b"").rstrip(b"\x00 "), encodings, set())
        return {"vr": "UT", "Value": [text]} if text else {"vr": "UT"}
    raise MppsError(INVALID_ATTRIBUTE_VALUE,
                    f"{_name(tag)}: cannot be kept ({type(exc).__name__}: {exc})")


def _expected_vr(tag: BaseTag) -> str | None:
    try:
        return None if tag.is_private else str(dictionary_VR(tag))
    except KeyError:
        return None


def _json_dict(dataset: Dataset) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for tag in dataset.keys():
        raw = dataset.get_item(tag, keep_deferred=True)
        try:
            element = dataset[tag]
            if element.VR == "SQ":
                items = [_json_dict(item) for item in element.value]
                kept[f"{tag:08X}"] = {"vr": "SQ", **({"Value": items} if items else {})}
                continue
            one = element.to_json_dict(None, 0)
            # Read back as N-GET will read it; NaN and infinities are not JSON.
            Dataset.from_json({f"{tag:08X}": one})
            json.dumps(one, allow_nan=False)
        except MppsError:
            raise
        except Exception as exc:
            one = _as_received(raw, tag, list(dataset._character_set), exc)
        kept[f"{tag:08X}"] = one
    return kept


def _json(dataset: Dataset) -> str:
    """The dataset as DICOM JSON, each value as received where JSON cannot hold it; raises
    :class:`MppsError` (0x0106 naming the attribute) when it cannot be kept at all: the step
    is never answered Success with data that was not kept."""
    return json.dumps(_json_dict(dataset), allow_nan=False)


def _status(dataset: Dataset, *, required: bool) -> str | None:
    if "PerformedProcedureStepStatus" not in dataset:
        if required:
            raise MppsError(MISSING_ATTRIBUTE, "PerformedProcedureStepStatus (0040,0252) "
                                               "is missing")
        return None
    status = _text(dataset, "PerformedProcedureStepStatus")
    if status is None:
        raise MppsError(MISSING_ATTRIBUTE_VALUE, "PerformedProcedureStepStatus (0040,0252) "
                                                 "is empty")
    return status.upper()


# PS3.4 F.7.2.1 table F.7.2-1: Type 1 for the SCU in N-CREATE (the status is checked first).
_CREATE_TYPE_1 = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID",
                  "PerformedStationAETitle", "PerformedProcedureStepStartDate",
                  "PerformedProcedureStepStartTime", "Modality")


def _require(dataset: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword not in dataset:
            raise MppsError(MISSING_ATTRIBUTE, f"{keyword} is required in N-CREATE")
        value = dataset[keyword].value
        if value is None or value == "" or (keyword.endswith("Sequence") and not value):
            raise MppsError(MISSING_ATTRIBUTE_VALUE, f"{keyword} is empty")


def create_request(dataset: Dataset, *, sop_instance_uid: str,
                   calling_ae_title: str | None = None) -> MppsCreate:
    """The core's N-CREATE request; raises :class:`MppsError` with the status to answer."""
    status = _status(dataset, required=True) or ""
    _require(dataset, _CREATE_TYPE_1)
    # First, so that an attribute that cannot be read or kept is the one named.
    attributes_json = _json(dataset)
    return MppsCreate(
        sop_instance_uid=sop_instance_uid,
        status=status,
        steps=_steps(dataset),
        start=_datetime(dataset, "PerformedProcedureStepStartDate",
                        "PerformedProcedureStepStartTime"),
        performed_station_ae_title=_text(dataset, "PerformedStationAETitle"),
        calling_ae_title=calling_ae_title,
        attributes_json=attributes_json,
    )


def set_request(dataset: Dataset, *, sop_instance_uid: str) -> MppsSet:
    """The core's N-SET request; raises :class:`MppsError` with the status to answer."""
    attributes_json = _json(dataset)
    return MppsSet(
        sop_instance_uid=sop_instance_uid,
        status=_status(dataset, required=False),
        end=_datetime(dataset, "PerformedProcedureStepEndDate",
                      "PerformedProcedureStepEndTime"),
        attributes_json=attributes_json,
    )


def _refusal(operation: str, uid: str | None, calling_ae: str | None, status: int,
             comment: str, error_id: int | None = None) -> Response:
    log.warning("MPPS %s refused uid=%s calling_ae=%s status=0x%04X: %s", operation, uid,
                calling_ae, status, comment)
    return failure(status, comment, error_id), None


def _record(unit: Callable[[], AbstractContextManager[Session]], operation: str, uid: str,
            calling_ae: str | None, action: Callable[[Session], object]) -> Response | None:
    """Run the core operation in its own unit of work (``store.writing`` or
    ``store.reading``): None when it succeeded, else the failure response (a transaction
    rolled back)."""
    try:
        with unit() as session:
            action(session)
    except MppsError as exc:
        return _refusal(operation, uid, calling_ae, exc.status, exc.comment, exc.error_id)
    except IntegrityError as exc:
        if operation == "N-CREATE":
            # Two N-CREATEs of one instance raced past the duplicate check; the unique index
            # decided.
            return _refusal(operation, uid, calling_ae, DUPLICATE_SOP_INSTANCE,
                            f"MPPS {uid} already exists")
        log.error("MPPS %s database error uid=%s: %s", operation, uid, exc)
        return _refusal(operation, uid, calling_ae, PROCESSING_FAILURE, "database error")
    except SQLAlchemyError as exc:
        log.error("MPPS %s database error uid=%s: %s", operation, uid, exc)
        return _refusal(operation, uid, calling_ae, PROCESSING_FAILURE, "database error")
    except Exception:
        log.exception("MPPS %s failed uid=%s", operation, uid)
        return _refusal(operation, uid, calling_ae, PROCESSING_FAILURE, "internal error")
    return None


def _keep(recorded: list[MppsResult] | None, result: MppsResult) -> MppsResult:
    if recorded is not None:
        recorded.append(result)
    return result


def handle_create(store: Store, attribute_list: Any, *, sop_instance_uid: str | None,
                  calling_ae_title: str | None = None,
                  reporting: StatusReporting = DEFAULT_REPORTING,
                  forward_to: Sequence[MppsDestination] = (),
                  recorded: list[MppsResult] | None = None) -> Response:
    """N-CREATE: record the step, answer Success with the attribute list, or a failure status.
    What the core recorded is appended to ``recorded`` (for the audit trail).

    ``attribute_list`` is the request's decoded dataset; pynetdicom decodes it lazily, so a
    broken one raises only here, when read.
    """
    # PS3.7 10.1.5.1.4: without an Affected SOP Instance UID the SCP assigns one and returns it.
    uid = sop_instance_uid or generate_uid()
    try:
        request = create_request(attribute_list, sop_instance_uid=uid,
                                 calling_ae_title=calling_ae_title)
    except MppsError as exc:
        return _refusal("N-CREATE", uid, calling_ae_title, exc.status, exc.comment)
    except Exception as exc:
        return _refusal("N-CREATE", uid, calling_ae_title, INVALID_ATTRIBUTE_VALUE,
                        f"cannot decode the attribute list: {exc}")
    refused = _record(store.writing, "N-CREATE", uid, calling_ae_title,
                      lambda session: _keep(recorded, record_mpps_create(
                          session, request, reporting, forward_to=forward_to)))
    if refused is not None:
        return refused
    response = _answered(request.attributes_json)
    if not sop_instance_uid:
        response.AffectedSOPInstanceUID = uid
    return SUCCESS, response


def handle_set(store: Store, modification_list: Any, *, sop_instance_uid: str | None,
               calling_ae_title: str | None = None,
               reporting: StatusReporting = DEFAULT_REPORTING,
               forward_to: Sequence[MppsDestination] = (),
               recorded: list[MppsResult] | None = None) -> Response:
    """N-SET: update the step (and its items' status), answer with the modified attributes;
    what the core recorded is appended to ``recorded``."""
    if not sop_instance_uid:
        return _refusal("N-SET", None, calling_ae_title, MISSING_ATTRIBUTE,
                        "Requested SOP Instance UID is missing")
    try:
        request = set_request(modification_list, sop_instance_uid=sop_instance_uid)
    except MppsError as exc:
        return _refusal("N-SET", sop_instance_uid, calling_ae_title, exc.status, exc.comment)
    except Exception as exc:
        return _refusal("N-SET", sop_instance_uid, calling_ae_title, INVALID_ATTRIBUTE_VALUE,
                        f"cannot decode the modification list: {exc}")
    refused = _record(store.writing, "N-SET", sop_instance_uid, calling_ae_title,
                      lambda session: _keep(recorded, record_mpps_set(
                          session, request, reporting, forward_to=forward_to)))
    if refused is not None:
        return refused
    return SUCCESS, _answered(request.attributes_json)


def _answered(kept: str | None) -> Dataset:
    """The attribute list of a Success response: what was kept, as N-GET will give it. The
    request's own dataset may hold values pydicom cannot encode again (an IS of 5,000
    digits): pynetdicom would then answer 0x0110 for a step already recorded."""
    return Dataset.from_json(kept) if kept else Dataset()


def _selection(stored: Dataset, tags: Sequence[BaseTag]) -> Dataset:
    if not tags:
        return stored
    selected = Dataset()
    # The character set travels with the values it decodes, asked for or not (PS3.4 F.8.2.1
    # recommends the SCU ask for it; many do not).
    for tag in (0x00080005, *tags):
        if tag in stored:
            selected.add(stored[tag])
    return selected


def handle_get(store: Store, tags: Sequence[BaseTag], *, sop_instance_uid: str | None,
               calling_ae_title: str | None = None) -> Response:
    """N-GET: the requested attributes of a kept MPPS (all of them for an empty list)."""
    uid = sop_instance_uid or ""
    kept: list[str] = []
    refused = _record(store.reading, "N-GET", uid, calling_ae_title,
                      lambda session: kept.append(stored_attributes(session, uid)))
    if refused is not None:
        return refused
    try:
        stored = Dataset.from_json(kept[0])
    except Exception as exc:
        log.error("MPPS N-GET uid=%s: the kept dataset cannot be read: %s", uid, exc)
        return _refusal("N-GET", uid, calling_ae_title, PROCESSING_FAILURE,
                        "the kept dataset cannot be read")
    log.info("MPPS N-GET uid=%s calling_ae=%s attributes=%d", uid, calling_ae_title,
             len(tags))
    return SUCCESS, _selection(stored, tags)
