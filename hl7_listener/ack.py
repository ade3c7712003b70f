"""Acknowledgements: what the broker answers to every message, good or bad.

Original mode (AA / AE / AR). The ACK is written in the sender's version, delimiters and
character set, with MSH-5/6 = the sender's MSH-3/4. Errors carry an ERR segment naming the
field: v2.5+ as ERR-2 (location), ERR-3 (table 0357 code), ERR-4 severity and ERR-8 (user
message); v2.3 / v2.4 as ERR-1 (segment^sequence^field^code&text&HL70357).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from hl7_listener.message import Delimiters, ParsedMessage

# HL7 table 0357 (message error condition codes).
ERROR_TEXT = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?")
_DEFAULT_VERSION = "2.5"


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    code: str  # table 0357
    location: str | None = None  # e.g. OBR-18 or OBR-27.4
    severity: str = "E"  # table 0516: E error, W warning, I information


def _new_control_id() -> str:
    return "ACK" + uuid.uuid4().hex[:17].upper()


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return (2, 5)


def _err_segment(d: Delimiters, version: str, error: ErrorDetail, text: str) -> str:
    code_text = ERROR_TEXT.get(error.code, "Application error")
    segment, field, component = "", "", ""
    if error.location:
        match = _LOCATION.match(error.location)
        if match:
            segment, field, component = match[1], match[2], match[3] or ""
    c, s, f = d.component, d.subcomponent, d.field
    if _version_tuple(version) >= (2, 5):
        location = c.join([segment, "1", field, "", component]).rstrip(c) if segment else ""
        return f.join(["ERR", "", location, c.join([error.code, code_text, "HL70357"]),
                       error.severity, "", "", "", d.escape_text(text)])
    eld = c.join([segment, "1" if segment else "", field,
                  s.join([error.code, code_text, "HL70357"])])
    return f.join(["ERR", eld])


def build_ack(msg: ParsedMessage | None, code: str, *, text: str = "",
              error: ErrorDetail | None = None, warnings: Sequence[str] = (),
              sending_application: str, sending_facility: str,
              now: dt.datetime | None = None) -> bytes:
    """An ACK for ``msg`` (None when it could not be parsed at all: then AR, v2.5 header).

    ``warnings`` are what the sender should know of a message that was applied all the same:
    in MSA-3 (every version has it), and from v2.5 on also one ERR each with severity W.
    """
    d = msg.delimiters if msg is not None else Delimiters()
    version = (msg.version if msg is not None else "") or _DEFAULT_VERSION
    codec = msg.codec if msg is not None else "utf-8"
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d%H%M%S")
    trigger = msg.trigger_event if msg is not None else ""
    message_type = d.component.join(["ACK", trigger, "ACK"]) if (
        trigger and _version_tuple(version) >= (2, 3, 1)) else "ACK"
    msh = [
        "MSH", d.encoding_characters,
        d.escape_text(sending_application), d.escape_text(sending_facility),
        msg.msh(3) if msg else "", msg.msh(4) if msg else "",
        stamp, "", message_type, _new_control_id(),
        (msg.msh(11) if msg else "") or "P", version,
    ]
    charset = msg.msh(18) if msg is not None else ""
    if charset:
        msh += ["", "", "", "", "", charset]
    msa_text = "; ".join(part for part in (text, *warnings) if part)
    segments = [d.field.join(msh),
                d.field.join(["MSA", code, msg.control_id if msg else "",
                              d.escape_text(msa_text)]).rstrip(d.field)]
    if error is not None:
        segments.append(_err_segment(d, version, error, text))
    if _version_tuple(version) >= (2, 5):
        segments += [_err_segment(d, version, ErrorDetail("0", severity="W"), warning)
                     for warning in warnings]
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")
