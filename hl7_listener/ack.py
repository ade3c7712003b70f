"""HL7 acknowledgements (original mode AA/AE/AR; enhanced-mode codes CA/CE/CR are accepted too).

The ACK speaks the sender's dialect: its version, its delimiters and its MSH-18 character set,
with MSH-5/6 set to the sender's MSH-3/4. Errors carry an ERR segment in the layout of that
version: ERR-1 (ELD) up to v2.4, ERR-2/3/4/8 from v2.5 on (v2.5 section 2.15.5).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from hl7_listener.message import (
    DEFAULT_DELIMITERS,
    Delimiters,
    ParsedMessage,
    codec_for,
    escape,
)

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
DEFAULT_VERSION = "2.5"

# HL7 table 0357, message error condition codes (v2.5).
ERROR_CODES: dict[str, str] = {
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

_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:-([0-9]+)(?:\.([0-9]+)(?:\.([0-9]+))?)?)?")


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """What went wrong and where: ``location`` like ``OBR-18`` or ``OBR-27.4`` (or None)."""

    code: str = "207"
    location: str | None = None
    diagnostic: str = ""  # the administrator-readable sentence (ERR-8 / MSA-3)
    severity: str = "E"
    sequence: int = 1  # which occurrence of the segment (1 = first)

    @property
    def meaning(self) -> str:
        return ERROR_CODES.get(self.code, "Application error")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.3.1"`` -> (2, 3, 1); anything unreadable counts as the default version."""
    parts = version.strip().split(".")
    if not all(p.isdigit() for p in parts):
        parts = DEFAULT_VERSION.split(".")
    return tuple(int(p) for p in parts)


def _timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now()).strftime("%Y%m%d%H%M%S")


def _message_type(version: str, trigger: str) -> str:
    v = version_tuple(version)
    if v < (2, 3) or not trigger:
        return "ACK"  # v2.1/2.2 MSH-9 is a single ID
    if v < (2, 3, 1):
        return f"ACK^{trigger}"  # v2.3 MSH-9 is type^event; the structure came with 2.3.1
    return f"ACK^{trigger}^ACK"


def _err(error: ErrorDetail, version: str, d: Delimiters) -> str:
    c, s, f = d.component, d.subcomponent, d.field
    match = _LOCATION.fullmatch(error.location or "")
    seg, field_no, comp, sub = match.groups() if match else (None, None, None, None)
    code_text = escape(error.meaning, d)
    if version_tuple(version) < (2, 5):
        # ERR-1 ELD: segment ID ^ sequence ^ field position ^ code (a CE in subcomponents).
        where = c.join([seg or "", str(error.sequence) if seg else "", field_no or ""])
        return f"ERR{f}{where}{c}{error.code}{s}{code_text}{s}HL70357"
    # ERR-2 ERL: segment ^ sequence ^ field ^ field repetition ^ component ^ subcomponent.
    erl: list[str] = []
    if seg:
        erl = [seg, str(error.sequence)]
        if field_no:
            erl.append(field_no)
            if comp:
                erl += ["1", comp]
                if sub:
                    erl.append(sub)
    fields = ["ERR", "", c.join(erl), f"{error.code}{c}{code_text}{c}HL70357",
              error.severity, "", "", "", escape(error.diagnostic, d)]
    return f.join(fields)


def build_ack(msg: ParsedMessage | None, code: str, *, text: str = "",
              error: ErrorDetail | None = None, sending_application: str,
              sending_facility: str, control_id: str, now: dt.datetime | None = None) -> bytes:
    """The ACK payload (unframed) for ``msg``; ``msg=None`` when not even its MSH was readable.

    MSA-2 echoes the message's MSH-10 (empty when unknown); MSA-3 carries ``text`` (or the
    error's diagnostic) so that a human reading the RIS interface log sees why.
    """
    if code not in ACK_CODES:
        raise ValueError(f"not an acknowledgement code: {code!r}")
    d = msg.delimiters if msg is not None else DEFAULT_DELIMITERS
    f = d.field
    if msg is not None:
        msh = msg.segment("MSH")
        version = msh.field(12) if msh is not None and msh.field(12) else DEFAULT_VERSION
        version_id = msg.version or DEFAULT_VERSION
        encoding = msg.encoding_characters or d.encoding_characters
        receiver = (msg.sending_application, msg.sending_facility)
        processing = msh.field(11) if msh is not None and msh.field(11) else "P"
        trigger = msg.trigger_event
        charset = msg.charset
        codec = codec_for(charset) or msg.codec
        echoed_id = escape(msg.control_id, d)
    else:
        version = version_id = DEFAULT_VERSION
        encoding = d.encoding_characters
        receiver = ("", "")
        processing, trigger, charset, codec, echoed_id = "P", "", "", "utf-8", ""
    msh_fields = ["MSH", encoding, escape(sending_application, d), escape(sending_facility, d),
                  receiver[0], receiver[1], _timestamp(now), "",
                  _message_type(version_id, trigger).replace("^", d.component),
                  escape(control_id, d), processing, version]
    if charset:
        msh_fields += ["", "", "", "", "", charset]
    reason = text or (error.diagnostic if error is not None else "")
    segments = [f.join(msh_fields), f.join(["MSA", code, echoed_id, escape(reason, d)])
                .rstrip(f)]
    if error is not None:
        segments.append(_err(error, version_id, d))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")
