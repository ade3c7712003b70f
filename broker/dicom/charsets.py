"""Responses in the character set a modality can read (PS3.3 C.12.1.1.2, PS3.5 6.1).

The broker stores Unicode and answers in ISO_IR 192 (UTF-8) by default. An older modality
configured for a single-byte set (e.g. ISO_IR 100, Latin-1) gets its responses in that set;
a character the set cannot hold is transliterated (accents dropped, "Łukasz" -> "Lukasz") or
replaced by "?", as configured, and never makes the response fail.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

Unencodable = Literal["transliterate", "replace"]
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Letters that have no decomposition but a common ASCII spelling.
_SPELLED = str.maketrans({"Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "Đ": "D", "đ": "d",
                          "ß": "ss", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Þ": "TH",
                          "þ": "th"})


def codec_for(character_set: str) -> str:
    """The Python codec of a single-valued Specific Character Set, or ValueError."""
    if character_set in ("", "ISO_IR 6"):
        return "ascii"  # the default repertoire (pydicom reads it leniently as Latin-1)
    codec = python_encoding.get(character_set)
    if codec is None:
        raise ValueError(f"unsupported Specific Character Set {character_set!r}")
    return codec


def _fit(text: str, codec: str, rule: Unencodable) -> str:
    try:
        text.encode(codec)
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for char in text:
        try:
            char.encode(codec)
            out.append(char)
            continue
        except UnicodeEncodeError:
            pass
        if rule == "transliterate":
            plain = unicodedata.normalize("NFKD", char.translate(_SPELLED))
            plain = "".join(c for c in plain if not unicodedata.combining(c))
            try:
                plain.encode(codec)
                out.append(plain)
                continue
            except UnicodeEncodeError:
                pass
        out.append("?")
    return "".join(out)


def recode(dataset: Dataset, character_set: str, rule: Unencodable = "transliterate") -> None:
    """Make every text value of ``dataset`` (and its sequences) fit ``character_set``."""
    codec = codec_for(character_set)
    _recode(dataset, codec, rule)
    dataset.SpecificCharacterSet = character_set


def _recode(dataset: Dataset, codec: str, rule: Unencodable) -> None:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or ():
                _recode(item, codec, rule)
        elif element.VR in _TEXT_VRS and element.value not in (None, ""):
            if element.VR == "PN":
                element.value = _fit(str(element.value), codec, rule)
            elif isinstance(element.value, str):
                element.value = _fit(element.value, codec, rule)
            elif isinstance(element.value, MultiValue | list):
                # Several values (Allergies): each made to fit; a new list, as for the others.
                element.value = [_fit(str(value), codec, rule) for value in element.value]
