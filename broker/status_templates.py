"""The language of status message field templates (config ``ris.status_messages``), checked
when the config is loaded; the HL7 edge renders them."""

from __future__ import annotations

import re

MESSAGE_TYPES = ("ORM^O01", "ORU^R01", "OMI^O23")

# What a template may name as {placeholder}. Composite ones are rendered as HL7 data types:
# patient_id_list CX, patient_name XPN, procedure_code and discontinuation_reason CE, the
# times TS (YYYYMMDDHHMMSS).
PLACEHOLDERS = frozenset({
    "order_status", "result_status", "accession_number", "placer_order_number",
    "filler_order_number", "requested_procedure_id", "sps_id", "study_instance_uid",
    "modality", "station_ae_title", "mpps_uid", "number_of_images", "patient_id",
    "issuer_of_patient_id", "patient_id_list", "patient_name", "procedure_code",
    "procedure_code_value", "procedure_code_meaning", "procedure_code_scheme",
    "discontinuation_reason", "event_time", "performed_start", "performed_end",
})

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# SEG-field[.component[.subcomponent]], 1-based.
FIELD_PATH = re.compile(
    r"^([A-Z][A-Z0-9]{2})-([1-9][0-9]*)(?:\.([1-9][0-9]*))?(?:\.([1-9][0-9]*))?$")


def check_template(path: str, template: str) -> str | None:
    """Why a field template is unusable, or None."""
    if not FIELD_PATH.match(path):
        return f"{path!r} is not a field path like OBR-4 or PID-3.4"
    if path.startswith("MSH-"):
        return "MSH is written by the broker (see hl7.sending_application and ris.*)"
    unknown = sorted(set(PLACEHOLDER.findall(template)) - PLACEHOLDERS)
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}}; known: {', '.join(sorted(PLACEHOLDERS))}"
    if any(char in template for char in "|\r\n"):
        return "a template cannot contain | or line breaks"
    literal = PLACEHOLDER.sub("", template)
    if "{" in literal or "}" in literal:
        return "braces only enclose placeholders, e.g. {accession_number}"
    return None
