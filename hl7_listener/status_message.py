"""Order status messages for the RIS (ORM^O01, ORC-1 SC) and reading the RIS's ACK."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from broker.domain import StatusEvent
from hl7_listener.message import Delimiters, FieldPath, MessageError, tokenize

_D = Delimiters()


def _e(value: str | None) -> str:
    return _D.escape_text(value) if value else ""


def _name(dicom_pn: str | None) -> str:
    """DICOM family^given^middle^prefix^suffix -> HL7 XPN family^given^middle^suffix^prefix."""
    if not dicom_pn:
        return ""
    parts = (dicom_pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_e(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def render_status_message(event: StatusEvent, *, message_control_id: str,
                          sending_application: str, sending_facility: str,
                          receiving_application: str, receiving_facility: str,
                          version: str = "2.3.1", now: dt.datetime | None = None) -> bytes:
    """ORM^O01 with ORC-1 SC and ORC-5 = the new order status (IP, CM or DC)."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d%H%M%S")
    when = event.event_time.strftime("%Y%m%d%H%M%S") if event.event_time else ""
    placer, filler = _e(event.placer_order_number), _e(event.filler_order_number)
    code = "^".join([_e(event.requested_procedure_code_value),
                     _e(event.requested_procedure_code_meaning),
                     _e(event.requested_procedure_code_scheme)]).rstrip("^")
    patient_id = "^".join([_e(event.patient_id), "", "", _e(event.issuer_of_patient_id)]
                          ).rstrip("^")
    segments = [
        "|".join(["MSH", "^~\\&", _e(sending_application), _e(sending_facility),
                  _e(receiving_application), _e(receiving_facility), stamp, "", "ORM^O01",
                  message_control_id, "P", version, "", "", "", "", "", "UNICODE UTF-8"]),
        "|".join(["PID", "1", "", patient_id, "", _name(event.patient_name)]),
        # ORC-9 date/time of the transaction: when the step started or ended.
        "|".join(["ORC", "SC", placer, filler, "", event.order_status, "", "", "", when]),
        "|".join(["OBR", "1", placer, filler, code] + [""] * 13 + [
            _e(event.accession_number)]),
    ]
    if event.mpps_sop_instance_uid:
        # Z-segment with the MPPS instance, the mirror of the IHE ZDS the RIS sends.
        segments.append(f"ZDS|{event.mpps_sop_instance_uid}^WORKLIST_BROKER^Application^DICOM")
    return ("\r".join(segments) + "\r").encode("utf-8")


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
