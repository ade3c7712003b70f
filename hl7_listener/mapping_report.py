"""What an HL7 message would become, without touching the database: the report behind both
``worklist-broker mapping-test`` and the console's mapping tester (one code path)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from hl7_listener.mapping import TARGETS, Mapping
from hl7_listener.message import parse
from hl7_listener.samples import render_sample


@dataclass(frozen=True, slots=True)
class MappedAttribute:
    keyword: str
    value: str
    source: str  # the HL7 field(s) it was read from, or "constant"


@dataclass(frozen=True, slots=True)
class MappedItem:
    order_control: str
    order_status: str | None
    attributes: list[MappedAttribute]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MappingReport:
    message_type: str
    patient: str | None = None  # ADT: the patient it would update
    items: list[MappedItem] = field(default_factory=list)


def prepare(text: bytes, today: dt.date | None = None) -> bytes:
    """Sample files carry {TODAY}-style placeholders; real RIS exports pass unchanged."""
    return render_sample(text.decode("utf-8", errors="surrogateescape"),
                         today or dt.date.today()).encode("utf-8", errors="surrogateescape")


def mapping_report(mapping: Mapping, raw: bytes) -> MappingReport:
    """Parse and map one message; raises the parser's or mapping's error for a bad one."""
    message = parse(raw)
    kind = f"{message.message_type}^{message.trigger_event}"
    if message.message_type == "ADT":
        return MappingReport(kind, patient=str(mapping.to_patient(message)))
    items = []
    for order, rows in mapping.describe(message):
        # The warnings the ACK would carry first, then every other empty attribute.
        warnings = mapping.warnings(message, [order])
        warnings += [f"{keyword} is empty ({source})" for keyword, value, source in rows
                     # The item's other attributes (allergies, weight...) come only when the
                     # RIS has them: their absence is no news.
                     if not value and keyword != "StudyInstanceUID" and keyword in TARGETS
                     and not (warnings and "ScheduledProcedureStepStart" in keyword)]
        if not order.procedure.study_instance_uid:
            warnings.append("StudyInstanceUID: none sent; one is generated under uid_root")
        items.append(MappedItem(str(order.control), order.order_status,
                                [MappedAttribute(k, v, s) for k, v, s in rows], warnings))
    return MappingReport(kind, items=items)
