"""Status messages for the RIS (ORM^O01, ORU^R01 or OMI^O23) and reading the RIS's ACK.

A message is a skeleton per message type (the defaults below) with the site's field
templates applied over it. A template is text with ``{placeholders}`` (the vocabulary is
``broker.status_templates.PLACEHOLDERS``); values are escaped, the template's own ``^`` and ``&``
are separators. A field whose placeholders are all empty is left empty, and a segment whose
placeholder fields are all empty is left out (no ZDS without an MPPS, no image count OBX at
IN PROGRESS). MSH is written by the broker.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.domain import StatusEvent
from broker.status_templates import FIELD_PATH, PLACEHOLDER
from hl7_listener.message import Delimiters, FieldPath, MessageError, tokenize

_D = Delimiters()

_IDENTIFIERS = {
    "PID-3": "{patient_id_list}",
    "PID-5": "{patient_name}",
}
_ORDER = {
    "ORC-2": "{placer_order_number}",
    "ORC-3": "{filler_order_number}",
    "ORC-5": "{order_status}",
    # ORC-9 date/time of the transaction: when the step started or ended.
    "ORC-9": "{event_time}",
    "OBR-1": "1",
    "OBR-2": "{placer_order_number}",
    "OBR-3": "{filler_order_number}",
    "OBR-4": "{procedure_code}",
    # IHE Scheduled Workflow: OBR-18 accession, OBR-19 requested procedure ID, OBR-20 SPS ID.
    "OBR-18": "{accession_number}",
    "OBR-19": "{requested_procedure_id}",
    "OBR-20": "{sps_id}",
}
# A Z-segment with the MPPS instance, the mirror of the IHE ZDS the RIS sends.
_ZDS = {"ZDS-1": "{mpps_uid}^WORKLIST_BROKER^Application^DICOM"}

DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    "ORM^O01": {**_IDENTIFIERS, "ORC-1": "SC", **_ORDER, **_ZDS},
    "ORU^R01": {
        **_IDENTIFIERS, "ORC-1": "RE", **_ORDER,
        "OBR-7": "{performed_start}", "OBR-8": "{performed_end}",
        "OBR-25": "{result_status}",
        "OBX-1": "1", "OBX-2": "NM", "OBX-3": "IMAGES^Number of images^99WLB",
        "OBX-5": "{number_of_images}", "OBX-11": "F",
        **_ZDS,
    },
    "OMI^O23": {
        **_IDENTIFIERS, "ORC-1": "SC", **_ORDER,
        "IPC-1": "{accession_number}", "IPC-2": "{requested_procedure_id}",
        "IPC-3": "{study_instance_uid}", "IPC-4": "{sps_id}", "IPC-5": "{modality}",
        "IPC-9": "{station_ae_title}",
        **_ZDS,
    },
}
_STRUCTURE = {"ORM^O01": "ORM_O01", "ORU^R01": "ORU_R01", "OMI^O23": "OMI_O23"}
# HL7 table 0123 result status (ORU OBR-25) for each ORC-5 order status.
_RESULT_STATUS = {"IP": "I", "CM": "R", "DC": "X", "CA": "X", "SC": "S", "HD": "S"}


@dataclass(frozen=True, slots=True)
class StatusFormat:
    """How one kind of status event is written: message type, version, field templates."""

    message_type: str = "ORM^O01"
    version: str = "2.3.1"
    # The site's templates for this message type, applied over DEFAULT_TEMPLATES.
    templates: Mapping[str, str] = field(default_factory=dict)


def _e(value: str | None) -> str:
    return _D.escape_text(value) if value else ""


def _name(dicom_pn: str | None) -> str:
    """DICOM family^given^middle^prefix^suffix -> HL7 XPN family^given^middle^suffix^prefix."""
    if not dicom_pn:
        return ""
    parts = (dicom_pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_e(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _coded(value: str | None, meaning: str | None, scheme: str | None) -> str:
    return "^".join([_e(value), _e(meaning), _e(scheme)]).rstrip("^")


def _ts(value: dt.datetime | None) -> str:
    return value.strftime("%Y%m%d%H%M%S") if value else ""


def _values(event: StatusEvent) -> dict[str, str]:
    """Every placeholder's value for one event, escaped and ready to stand in a field."""
    return {
        "order_status": _e(event.order_status),
        "result_status": _RESULT_STATUS.get(event.order_status, ""),
        "accession_number": _e(event.accession_number),
        "placer_order_number": _e(event.placer_order_number),
        "filler_order_number": _e(event.filler_order_number),
        "requested_procedure_id": _e(event.requested_procedure_id),
        "sps_id": _e(event.sps_id),
        "study_instance_uid": _e(event.study_instance_uid),
        "modality": _e(event.modality),
        "station_ae_title": _e(event.station_ae_title),
        "mpps_uid": _e(event.mpps_sop_instance_uid),
        "number_of_images": ("" if event.number_of_images is None
                             else str(event.number_of_images)),
        "patient_id": _e(event.patient_id),
        "issuer_of_patient_id": _e(event.issuer_of_patient_id),
        "patient_id_list": "^".join([_e(event.patient_id), "", "",
                                     _e(event.issuer_of_patient_id)]).rstrip("^"),
        "patient_name": _name(event.patient_name),
        "procedure_code": _coded(event.requested_procedure_code_value,
                                 event.requested_procedure_code_meaning,
                                 event.requested_procedure_code_scheme),
        "procedure_code_value": _e(event.requested_procedure_code_value),
        "procedure_code_meaning": _e(event.requested_procedure_code_meaning),
        "procedure_code_scheme": _e(event.requested_procedure_code_scheme),
        "discontinuation_reason": _coded(event.discontinuation_reason_code,
                                         event.discontinuation_reason_meaning,
                                         event.discontinuation_reason_scheme),
        "event_time": _ts(event.event_time),
        "performed_start": _ts(event.performed_start),
        "performed_end": _ts(event.performed_end),
    }


def _fill(template: str, values: Mapping[str, str]) -> tuple[str, bool]:
    """The rendered template and whether it names placeholders; all of them empty gives ""."""
    names = PLACEHOLDER.findall(template)
    if names and not any(values[name] for name in names):
        return "", True
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template), bool(names)


def _put(fields: list[str], index: int, component: int | None, sub: int | None,
         value: str) -> None:
    """Set field ``index`` (1-based), or one component or subcomponent of it."""
    while len(fields) <= index:
        fields.append("")
    if component is None:
        fields[index] = value
        return
    components = fields[index].split("^")
    components += [""] * (component - len(components))
    if sub is None:
        components[component - 1] = value
    else:
        subs = components[component - 1].split("&")
        subs += [""] * (sub - len(subs))
        subs[sub - 1] = value
        components[component - 1] = "&".join(subs).rstrip("&")
    fields[index] = "^".join(components).rstrip("^")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def render_status_message(event: StatusEvent, *, message_control_id: str,
                          sending_application: str, sending_facility: str,
                          receiving_application: str, receiving_facility: str,
                          fmt: StatusFormat | None = None,
                          now: dt.datetime | None = None) -> bytes:
    """The status message for ``event`` as ``fmt`` says (default: ORM^O01 v2.3.1)."""
    fmt = fmt or StatusFormat()
    message_type = fmt.message_type
    if _version_tuple(fmt.version) >= (2, 4):
        message_type += "^" + _STRUCTURE[fmt.message_type]
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d%H%M%S")
    values = _values(event)
    segments: dict[str, list[str]] = {}
    # Per segment: does it name any placeholder, and did any of them have a value?
    templated: dict[str, bool] = {}
    filled: dict[str, bool] = {}
    for path, template in {**DEFAULT_TEMPLATES[fmt.message_type], **fmt.templates}.items():
        match = FIELD_PATH.match(path)
        if match is None:  # refused when the config was loaded
            continue
        name, index, component, sub = match.groups()
        text, names_placeholder = _fill(template, values)
        fields = segments.setdefault(name, [name])
        _put(fields, int(index), int(component) if component else None,
             int(sub) if sub else None, text)
        if names_placeholder:
            templated[name] = True
            filled[name] = filled.get(name, False) or bool(text)
    msh = "|".join(["MSH", "^~\\&", _e(sending_application), _e(sending_facility),
                    _e(receiving_application), _e(receiving_facility), stamp, "",
                    message_type, message_control_id, "P", fmt.version, "", "", "", "", "",
                    "UNICODE UTF-8"])
    lines = [msh] + ["|".join(fields).rstrip("|") for name, fields in segments.items()
                     if not templated.get(name) or filled.get(name)]
    return ("\r".join(lines) + "\r").encode("utf-8")


@dataclass(frozen=True, slots=True)
class AckResult:
    code: str  # MSA-1: AA, AE, AR (or CA, CE, CR)
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    text: str  # MSA-3


def parse_ack(payload: bytes) -> AckResult:
    """Read MSA-1..3 from an ACK; MessageError if it is not one."""
    text = payload.decode("utf-8", errors="replace")
    message = tokenize(text)
    if message.segment_fields("MSA") is None:
        raise MessageError("no MSA segment: not an acknowledgement")
    code = message.raw(FieldPath("MSA", 1)).strip()
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise MessageError(f"MSA-1 {code!r} is not an acknowledgement code")
    return AckResult(code, message.raw(FieldPath("MSA", 2)).strip(),
                     message.get("MSA-3") or "")
