"""Tolerant HL7 v2 (ER7) parsing: bytes in, a ParsedMessage with path-addressed values out.

hl7apy reads the MSH header: the delimiters from MSH-1/MSH-2 (with its checks for missing or
duplicated encoding characters), the message structure and the version. The rest of the message
is split lazily over those delimiters instead of going through hl7apy's element tree, because
that tree costs about 6 ms for a six-segment ORM (``parse_message``, grouped or not), 3.7 ms for
``parse_segment`` on just the five segments the mapping reads and 2.5 ms for ``parse_field`` on
the sixteen mapped fields, against 0.01 ms for the split; the ingest target of 500 ACKed orders a
second on one connection leaves 2 ms per message for parsing *and* the commit. The grouped
``parse_message`` would also drop Z-segments such as ZDS, and its strict validation refuses valid
ORM^O01 messages. The ER7 grammar itself is four nested splits; what needs care (and is here) is
delimiters, segment terminators, the character set and escape sequences.
"""

from __future__ import annotations

import codecs
import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from hl7apy.exceptions import HL7apyException
from hl7apy.parser import get_message_info

from broker.errors import BrokerError

log = logging.getLogger(__name__)

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_PATH = re.compile(r"([A-Z][A-Z0-9]{2})-([1-9][0-9]*)(?:\.([1-9][0-9]*)(?:\.([1-9][0-9]*))?)?")
_UTF8_BOM = b"\xef\xbb\xbf"
# HL7 v2 "null": the field is present and its value must be deleted (v2.5 section 2.5.3).
HL7_NULL = '""'

# HL7 table 0211 (MSH-18) -> Python codec. MSH-18 may repeat; the first value is the default
# character set of the message. UTF-16/UTF-32 cannot travel inside MLLP framing (their bytes
# collide with the block characters) and are therefore not listed.
_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in range(1, 10)},
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    # Not in table 0211 but sent by real interface engines.
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    # Pre-2.5 "UNICODE" meant ISO 10646 without an encoding form; on MLLP it is UTF-8 in practice.
    "UNICODE": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
    "ISO IR87": "iso2022_jp",
}


class MessageError(BrokerError):
    """The bytes are not an HL7 message this parser can read.

    ``code`` is from HL7 table 0357 (100 segment sequence error, 102 data type error, 200
    unsupported message type, 207 application internal error). ``partial`` holds the message as
    far as its MSH could be read, so that a rejection can still echo MSH-10 and the sender's
    delimiters.
    """

    def __init__(self, reason: str, code: str = "100", *,
                 partial: ParsedMessage | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.partial = partial


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return f"{self.component}{self.repetition}{self.escape}{self.subcomponent}"


DEFAULT_DELIMITERS = Delimiters()


@dataclass(frozen=True, slots=True)
class FieldPath:
    """``SEG-field[.component[.subcomponent]]``, e.g. ``PID-3.1`` or ``OBR-27.4``."""

    segment: str
    field: int
    component: int | None = None
    subcomponent: int | None = None

    def __str__(self) -> str:
        text = f"{self.segment}-{self.field}"
        if self.component is not None:
            text += f".{self.component}"
        if self.subcomponent is not None:
            text += f".{self.subcomponent}"
        return text


@functools.lru_cache(maxsize=1024)
def parse_path(text: str) -> FieldPath:
    """Read a field path; ValueError says what is wrong with it."""
    match = _PATH.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a field path like PID-3, PID-3.1 or OBR-27.4.1 "
                         "(segment ID, '-', field number, optional .component.subcomponent)")
    segment, field, component, subcomponent = match.groups()
    return FieldPath(segment, int(field), int(component) if component else None,
                     int(subcomponent) if subcomponent else None)


def codec_for(charset: str | None) -> str | None:
    """The Python codec for an MSH-18 value, or None when unknown or absent."""
    if not charset:
        return None
    return _CHARSETS.get(charset.strip().upper())


def _decode_default(raw: bytes) -> tuple[str, str]:
    # Without MSH-18 the standard says ASCII; real senders put UTF-8 or Latin-1 in anyway.
    # Valid UTF-8 is almost never accidental, so try it first.
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _charset_field(raw: bytes) -> str | None:
    """MSH-18's first repetition, read before the message is decoded.

    Latin-1 maps bytes one to one, and the delimiters and table 0211 names are ASCII, so this
    finds MSH-18 whatever the real character set is.
    """
    head = raw[:4096].decode("latin-1").lstrip()
    if not head.startswith("MSH") or len(head) < 8:
        return None
    first = re.split(r"\r\n|\r|\n", head, maxsplit=1)[0]
    fields = first.split(head[3])
    if len(fields) < 18:
        return None
    return fields[17].split(head[5])[0].split(head[4])[0] or None


def decode(raw: bytes) -> tuple[str, str]:
    """Text and codec of a message, honouring MSH-18 and never failing on a bad one."""
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    charset = _charset_field(raw)
    codec = codec_for(charset)
    if charset and codec is None:
        log.warning("unknown MSH-18 character set %r; decoding as UTF-8, else Latin-1", charset)
    if codec is not None:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            log.warning("message is not valid %s as its MSH-18 %r says; decoding as UTF-8, "
                        "else Latin-1", codec, charset)
    return _decode_default(raw)


_FORMATTING = {".br": "\n", ".sp": "\n", ".fi": "", ".nf": "", ".ce": "", "H": "", "N": ""}


def unescape(text: str, delimiters: Delimiters, codec: str = "utf-8") -> str:
    """Decode HL7 escape sequences (v2.5 section 2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\Xhh..\\,
    \\.br\\ and friends. Unknown or unterminated sequences are kept as sent."""
    esc = delimiters.escape
    if esc not in text:
        return text
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(esc, pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        end = text.find(esc, start + 1)
        if end < 0:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:start])
        out.append(_escape_sequence(text[start + 1:end], delimiters, codec))
        pos = end + 1


def _escape_sequence(seq: str, d: Delimiters, codec: str) -> str:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition,
              "E": d.escape}
    if seq in simple:
        return simple[seq]
    if seq in _FORMATTING:
        return _FORMATTING[seq]
    if seq.startswith(".in") or seq.startswith(".ti") or seq.startswith(".sk"):
        return ""  # indentation/skip: no meaning in a DICOM value
    if seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1:
        try:
            return bytes.fromhex(seq[1:]).decode(codec, errors="replace")
        except (ValueError, LookupError):
            pass
    elif seq[:1] in ("C", "M"):
        # Character set switches (ISO 2022); the text after them is already decoded by MSH-18.
        return ""
    return f"{d.escape}{seq}{d.escape}"


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Make a value safe inside a field: the opposite of :func:`unescape` for the delimiters,
    plus line breaks as \\.br\\ (a bare CR would end the segment)."""
    d = delimiters
    e = d.escape
    if not any(c in text for c in (d.field, d.component, d.repetition, e, d.subcomponent,
                                   "\r", "\n")):
        return text
    out = text.replace(e, f"{e}E{e}")
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"),
                       (d.repetition, "R")):
        out = out.replace(char, f"{e}{code}{e}")
    out = out.replace("\r\n", "\n").replace("\r", "\n")
    return out.replace("\n", f"{e}.br{e}")


class Segment:
    """One segment; ``field(n)`` is the raw (still escaped) text of SEG-n."""

    __slots__ = ("_fields", "_message", "name")

    def __init__(self, name: str, fields: list[str], message: ParsedMessage) -> None:
        self.name = name
        self._fields = fields
        self._message = message

    def __repr__(self) -> str:
        return f"<Segment {self.name} ({len(self._fields) - 1} fields)>"

    def field(self, number: int) -> str:
        return self._fields[number] if 0 < number < len(self._fields) else ""

    def value(self, field: int, component: int | None = None,
              subcomponent: int | None = None) -> str | None:
        """The decoded value at ``field[.component[.subcomponent]]`` of the first repetition.

        None when absent or empty; ``""`` when the sender sent the HL7 null ``""`` (delete the
        value). Without a component the whole field comes back with its components joined by
        ``^`` (DICOM's PN separator) and trailing empty components dropped; without a
        subcomponent the component's subcomponents are joined by ``&``.
        """
        raw = self.field(field)
        if not raw:
            return None
        if self.name == "MSH" and field in (1, 2):
            return raw  # the delimiters themselves, never split or unescaped
        msg = self._message
        d = msg.delimiters
        first = raw.split(d.repetition, 1)[0]
        if first == HL7_NULL:
            return ""
        components = first.split(d.component)
        if component is None:
            parts = [self._subcomponents(c, None) for c in components]
            while parts and not parts[-1]:
                parts.pop()
            return "^".join(parts) or None
        if component > len(components):
            return None
        text = components[component - 1]
        if text == HL7_NULL:
            return ""
        return self._subcomponents(text, subcomponent) or None

    def _subcomponents(self, text: str, subcomponent: int | None) -> str:
        msg = self._message
        d = msg.delimiters
        if subcomponent is None:
            if d.subcomponent not in text:
                return unescape(text, d, msg.codec)
            return "&".join(unescape(s, d, msg.codec) for s in text.split(d.subcomponent))
        subs = text.split(d.subcomponent)
        if subcomponent > len(subs):
            return ""
        return unescape(subs[subcomponent - 1], d, msg.codec)


class ParsedMessage:
    """An HL7 v2 message, read tolerantly: values are addressed by path (``get("PID-3.1")``)."""

    def __init__(self, text: str, delimiters: Delimiters, segments: list[tuple[str, list[str]]],
                 codec: str) -> None:
        self.text = text
        self.delimiters = delimiters
        self.codec = codec
        self._segments = [Segment(name, fields, self) for name, fields in segments]
        self._by_name: dict[str, list[Segment]] = {}
        for segment in self._segments:
            self._by_name.setdefault(segment.name, []).append(segment)
        msh = self._segments[0]
        self.field_separator = delimiters.field
        self.encoding_characters = msh.field(2)
        # MSH-3..6 raw: an ACK written with the same delimiters copies them verbatim.
        self.sending_application = msh.field(3)
        self.sending_facility = msh.field(4)
        self.receiving_application = msh.field(5)
        self.receiving_facility = msh.field(6)
        self.message_type = msh.value(9, 1) or ""
        self.trigger_event = msh.value(9, 2) or ""
        self.message_structure = msh.value(9, 3) or ""
        self.control_id = msh.value(10) or ""
        self.processing_id = msh.value(11, 1) or ""
        self.version = msh.value(12, 1) or ""
        self.accept_ack_type = msh.value(15) or ""
        self.application_ack_type = msh.value(16) or ""
        charset = msh.field(18).split(delimiters.repetition, 1)[0]
        self.charset = charset

    def __repr__(self) -> str:
        return (f"<ParsedMessage {self.message_type}^{self.trigger_event} "
                f"MSH-10={self.control_id!r} v{self.version}>")

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._segments)

    @property
    def type_name(self) -> str:
        """``ORM^O01`` as an administrator would name it."""
        return f"{self.message_type}^{self.trigger_event}" if self.trigger_event \
            else self.message_type

    def segments(self, name: str | None = None) -> list[Segment]:
        if name is None:
            return list(self._segments)
        return list(self._by_name.get(name, ()))

    def segment(self, name: str) -> Segment | None:
        found = self._by_name.get(name)
        return found[0] if found else None

    def get(self, path: str | FieldPath) -> str | None:
        """Value at ``SEG-field[.component[.subcomponent]]`` in the first occurrence of the
        segment (first repetition of the field); see :meth:`Segment.value`."""
        p = path if isinstance(path, FieldPath) else parse_path(path)
        found = self._by_name.get(p.segment)
        if not found:
            return None
        return found[0].value(p.field, p.component, p.subcomponent)


def _read_header(text: str) -> Delimiters:
    if not text.startswith("MSH"):
        raise MessageError("not an HL7 message: it does not start with an MSH segment", "100")
    try:
        enc, _structure, _version = get_message_info(text)
    except HL7apyException as exc:
        raise MessageError(f"MSH-1/MSH-2 delimiters are invalid: {exc}", "102") from None
    except (IndexError, ValueError) as exc:
        raise MessageError(f"MSH segment is unreadable: {exc}", "100") from None
    delimiters = Delimiters(field=enc["FIELD"], component=enc["COMPONENT"],
                            repetition=enc["REPETITION"], escape=enc["ESCAPE"],
                            subcomponent=enc["SUBCOMPONENT"])
    chars = (delimiters.field, *delimiters.encoding_characters)
    if len(set(chars)) != len(chars) or any(c.isalnum() for c in chars):
        raise MessageError("MSH-1/MSH-2 delimiters are invalid: they must be distinct "
                           "punctuation characters", "102")
    return delimiters


def parse(raw: bytes) -> ParsedMessage:
    """Parse one message; MessageError (with ``partial`` when the MSH was readable) if not HL7."""
    text, codec = decode(raw)
    # Segment terminator is CR (v2.5 section 2.5.2); files and some engines use LF or CRLF.
    text = text.lstrip().replace("\r\n", "\r").replace("\n", "\r")
    delimiters = _read_header(text)
    fs = delimiters.field
    segments: list[tuple[str, list[str]]] = []
    bad: str | None = None
    for line in text.split("\r"):
        if not line.strip():
            continue
        name = line[:3]
        if not _SEGMENT_ID.fullmatch(name) or (len(line) > 3 and line[3] != fs):
            bad = bad or line[:20]
            continue
        if name == "MSH" and not segments:
            # MSH-1 is the field separator itself: put it back so that index n is MSH-n.
            fields = ["MSH", fs, *line[4:].split(fs)]
        else:
            fields = line.split(fs)
        segments.append((name, fields))
    message = ParsedMessage(text, delimiters, segments, codec)
    if bad is not None:
        raise MessageError(f"segment {bad!r} does not start with a segment ID", "100",
                           partial=message)
    if sum(1 for name, _ in segments if name == "MSH") > 1:
        raise MessageError("more than one MSH segment: one message per MLLP frame", "100",
                           partial=message)
    return message


def header_of(raw: bytes) -> ParsedMessage | None:
    """The message as far as it can be read (at least its MSH), or None; never raises."""
    try:
        return parse(raw)
    except MessageError as exc:
        return exc.partial
    except Exception:  # a rejection path must not fail on its way out
        log.debug("cannot read the header of a rejected message", exc_info=True)
        return None


def normalise_codec(codec: str) -> str:
    """Canonical codec name (so ``iso8859-1`` and ``latin-1`` compare equal)."""
    try:
        return codecs.lookup(codec).name
    except LookupError:
        return "utf-8"
