"""Identifiers and attribute lists as raw bytes, sent as they are: what a broken modality (or a
fuzzer) sends, which pydicom would not write from a Dataset."""

from __future__ import annotations

import io
import struct

from pydicom import Dataset
from pydicom.filereader import read_dataset

# VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                       "UV"})


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element, padded to an even length."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def raw_dataset(*elements: bytes) -> Dataset:
    """The elements as pynetdicom hands them to a handler: read lazily, nothing converted.
    Sent over an explicit VR little endian context, pydicom writes them back byte for byte."""
    return read_dataset(io.BytesIO(b"".join(elements)), is_implicit_VR=False,
                        is_little_endian=True)
