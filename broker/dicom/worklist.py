"""Modality Worklist C-FIND: identifier -> WorklistQuery, and rows -> response identifiers.

A response holds exactly the keys the query asked for, nested as asked (PS3.4 K.2.2.1 and
C.2.2.1): a key the broker does not store is returned empty rather than failing the query,
so a modality that asks for Names of Intended Recipients or a private tag still gets its
worklist. Values are stored as Unicode and sent as ISO_IR 192 (UTF-8).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from broker.domain import ItemStatus, WorklistRow
from broker.matching import WorklistQuery

RESPONSE_CHARACTER_SET = "ISO_IR 192"

# PS3.3 C.4.10: defined terms of Scheduled Procedure Step Status.
_SPS_STATUS = {ItemStatus.SCHEDULED: "SCHEDULED", ItemStatus.IN_PROGRESS: "STARTED"}

# Matching keys the broker supports -> WorklistQuery field; all others are universal.
_TOP_KEYS = {
    "AccessionNumber": "accession_number",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientName": "patient_name",
    "StudyInstanceUID": "study_instance_uid",
    "RequestedProcedureID": "requested_procedure_id",
    "ReferringPhysicianName": "referring_physician_name",
}
_SPS_KEYS = {
    "Modality": "modality",
    "ScheduledStationAETitle": "scheduled_station_ae_title",
    "ScheduledProcedureStepStartDate": "scheduled_start_date",
    "ScheduledProcedureStepStartTime": "scheduled_start_time",
    "ScheduledProcedureStepID": "sps_id",
}


def _key_value(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, MultiValue):
        # Only UIDs have list matching (C.2.2.2.2); it is what a multi-valued key means.
        return "\\".join(str(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    return str(value).strip() or None


def query_from_identifier(identifier: Dataset, *, max_matches: int) -> WorklistQuery:
    """The matching keys of a worklist query (values as sent; empty means universal)."""
    keys: dict[str, Any] = {}
    for keyword, name in _TOP_KEYS.items():
        keys[name] = _key_value(identifier, keyword)
    sps = identifier.get("ScheduledProcedureStepSequence")
    if sps:
        item = sps[0]
        for keyword, name in _SPS_KEYS.items():
            keys[name] = _key_value(item, keyword)
    return WorklistQuery(**keys, limit=max_matches)


def row_values(row: WorklistRow) -> dict[str, Any]:
    """Every attribute a stored item can supply, by keyword; sequences as lists of dicts."""
    p, proc = row.patient, row.procedure
    start = proc.scheduled_start
    code = None
    if proc.requested_procedure_code_value:
        code = [{"CodeValue": proc.requested_procedure_code_value,
                 "CodingSchemeDesignator": proc.requested_procedure_code_scheme,
                 "CodeMeaning": proc.requested_procedure_code_meaning}]
    return {
        "PatientName": p.patient_name,
        "PatientID": p.patient_id,
        "IssuerOfPatientID": p.issuer_of_patient_id,
        "PatientBirthDate": p.birth_date.strftime("%Y%m%d") if p.birth_date else None,
        "PatientSex": p.sex,
        "AccessionNumber": proc.accession_number,
        "ReferringPhysicianName": proc.referring_physician_name,
        "RequestingPhysician": proc.requesting_physician,
        "StudyInstanceUID": proc.study_instance_uid,
        "RequestedProcedureID": proc.requested_procedure_id,
        "RequestedProcedureDescription": proc.requested_procedure_description,
        "RequestedProcedureCodeSequence": code or [],
        "PlacerOrderNumberImagingServiceRequest": proc.placer_order_number,
        "FillerOrderNumberImagingServiceRequest": proc.filler_order_number,
        "ScheduledProcedureStepSequence": [{
            "Modality": proc.modality,
            "ScheduledStationAETitle": proc.scheduled_station_ae_title,
            "ScheduledProcedureStepStartDate": start.strftime("%Y%m%d") if start else None,
            "ScheduledProcedureStepStartTime": start.strftime("%H%M%S") if start else None,
            "ScheduledProcedureStepID": proc.sps_id,
            "ScheduledProcedureStepDescription": proc.sps_description,
            "ScheduledProcedureStepStatus": _SPS_STATUS.get(row.status),
            # The description stands in for the protocol when the RIS sends no codes.
            "ScheduledProtocolCodeSequence": [],
        }],
    }


def _full(values: dict[str, Any]) -> Dataset:
    """A sequence item with everything the broker has, for a zero-length sequence key."""
    item = Dataset()
    for keyword, value in values.items():
        if isinstance(value, list):
            setattr(item, keyword, [_full(v) for v in value])
        elif value is not None:
            setattr(item, keyword, value)
    return item


def _project(request: Dataset, values: dict[str, Any]) -> Dataset:
    out = Dataset()
    for element in request:
        keyword = element.keyword
        if keyword == "SpecificCharacterSet":
            continue
        value = values.get(keyword) if keyword else None
        if element.VR == "SQ":
            items = value if isinstance(value, list) else []
            template = element.value[0] if element.value else None
            out.add_new(element.tag, "SQ", [
                _project(template, item) if template is not None else _full(item)
                for item in items])
        else:
            out.add_new(element.tag, element.VR, None if isinstance(value, list) else value)
    return out


def render_response(identifier: Dataset, row: WorklistRow) -> Dataset:
    """The response identifier for one match: the query's keys, filled from the row."""
    response = _project(identifier, row_values(row))
    response.SpecificCharacterSet = RESPONSE_CHARACTER_SET
    return response
