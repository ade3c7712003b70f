"""A C-FIND identifier read whole before it is used, every value converted once, here.

pynetdicom hands the handler a lazily decoded dataset: a value is converted the first time it
is read, and pydicom raises there for inputs a modality (or a fuzzer) can send: a sequence key
sent with another VR, a person name with an empty component under ``ISO 2022 IR 87`` (pydicom
re-encodes what it decoded and fails), an IS value of more than 4,300 digits (Python's limit on
int conversion). Reading every element up front turns each of those into either an answer or
a refusal naming the attribute (PS3.4 C.4.1.1.4: 0xA900, Identifier does not match SOP Class),
never a failure in the middle of matching or rendering.

What can be answered is answered: a value the broker does not match on (a return key, or a
key matched universally) that pydicom cannot convert is read as empty, as the broker would
read it anyway; a person name pydicom cannot re-encode is decoded without that step. A key
the broker matches on whose value cannot be read, and a sequence key that is not a sequence
(or an attribute that is not one sent as a sequence), are refused.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import TEXT_VR_DELIMS, VR, PersonName

from broker.dicom.worklist import MATCHED_TAGS, key_text
from broker.matching import InvalidQuery

__all__ = ["UnreadableKey", "read_identifier"]

_SPECIFIC_CHARACTER_SET = 0x00080005
_KNOWN_VRS = frozenset(str(vr) for vr in VR)


class UnreadableKey(InvalidQuery):
    """A key of the identifier that cannot be read as its attribute; ``tag`` names it for
    the Offending Element (0000,0901) of the failure status."""

    def __init__(self, tag: int, problem: str) -> None:
        # The tag first: the Error Comment is cut at 64 characters (LO).
        super().__init__(f"{_name(tag)}: {problem}")
        self.tag = tag


def _name(tag: int) -> str:
    keyword = keyword_for_tag(tag) if not Tag(tag).is_private else ""
    return f"{Tag(tag)} {keyword}".strip()


def _expected_vr(tag: int) -> str | None:
    if Tag(tag).is_private:
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _raw_vr(dataset: Dataset, tag: int) -> str | None:
    element = dataset.get_item(tag, keep_deferred=True)
    return element.VR if element is not None else None


def _decoded_name(raw: RawDataElement | DataElement | None,
                  encodings: list[str]) -> PersonName | MultiValue[PersonName] | None:
    """A PN value decoded without pydicom's re-encoding step (which fails for an empty
    component under a single-valued ISO 2022 IR 87, although the bytes decode)."""
    if raw is None or not isinstance(raw.value, bytes):
        return None
    text = decode_bytes(raw.value.rstrip(b"\x00 "), encodings, TEXT_VR_DELIMS)
    parts = text.split("\\")
    if len(parts) == 1:
        return PersonName(parts[0])
    return MultiValue(PersonName, parts)


def _read_element(dataset: Dataset, tag: int, encodings: list[str]) -> DataElement:
    raw = dataset.get_item(tag, keep_deferred=True)
    raw_vr = raw.VR if raw is not None else None
    try:
        element = dataset[tag]
        _ = element.value
        return element
    except Exception as exc:
        problem = exc
    vr = raw_vr if raw_vr in _KNOWN_VRS else _expected_vr(tag) or "UN"
    vr = vr.split(" or ")[0]  # a dictionary VR such as "US or SS"
    if vr == "PN":
        try:
            name = _decoded_name(raw, encodings)
        except Exception:
            name = None
        if name is not None:
            element = DataElement(tag, "PN", name)
            dataset[tag] = element
            return element
    if vr == "SQ" or tag in MATCHED_TAGS or tag == _SPECIFIC_CHARACTER_SET:
        raise UnreadableKey(tag, f"cannot be read ({type(problem).__name__}: {problem})")
    # Neither matched on nor a sequence: the broker reads it as universal anyway.
    element = DataElement(tag, vr, None)
    dataset[tag] = element
    return element


def _read(dataset: Dataset, encodings: list[str]) -> None:
    for tag in list(dataset.keys()):
        if tag.element == 0 or tag.group < 8 or tag.group == 0xFFFE:
            # Not attributes of an identifier: group lengths (retired in datasets, PS3.5
            # 7.2), command and file meta groups, item delimiters out of place. They would
            # come back in the answer as keys and fail its encoding; nothing to match on.
            del dataset[tag]
            continue
        sent_vr = _raw_vr(dataset, tag)
        element = _read_element(dataset, tag, encodings)
        expected = _expected_vr(tag)
        vr = element.VR or sent_vr
        if vr not in _KNOWN_VRS:
            del dataset[tag]  # no VR an answer could carry it with (the dictionary's "NONE")
            continue
        if expected == "SQ" and vr != "SQ":
            raise UnreadableKey(tag, f"sent as {vr}, not SQ")
        if tag in MATCHED_TAGS and vr != "SQ" and "\x00" in (key_text(element.value) or ""):
            # No stored value holds one, and PostgreSQL refuses a NUL in any string: the
            # query would fail as a database error (0xC001) instead of naming the key. The
            # text the matching reads, whatever the VR (bytes) or number of values.
            raise UnreadableKey(tag, "holds a NUL character")
        if vr == "SQ":
            if expected is not None and expected not in ("SQ", "UN"):
                raise UnreadableKey(tag, f"sent as SQ, not {expected}")
            for item in element.value:
                _read(item, encodings)


def read_identifier(identifier: Dataset) -> Dataset:
    """Read every element of ``identifier`` (in place) as described above, and return it;
    raises :class:`UnreadableKey` for what cannot be answered."""
    encodings = ["iso8859"]
    if _SPECIFIC_CHARACTER_SET in identifier:
        _read_element(identifier, _SPECIFIC_CHARACTER_SET, encodings)
        encodings = list(identifier._character_set)
    _read(identifier, encodings)
    return identifier
