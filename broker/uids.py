"""DICOM UID generation under the site's root, without pulling pydicom into the core."""

from __future__ import annotations

import uuid

MAX_UID_LENGTH = 64


def generate_uid(root: str) -> str:
    """A new UID under ``root``: the root, a dot, then decimal digits of a random UUID.

    The UUID's digits are cut to fit 64 characters (PS3.5 9.1); with a root of 40 characters
    that still leaves 23 random digits, about 76 bits.
    """
    digits = str(uuid.uuid4().int)
    room = MAX_UID_LENGTH - len(root) - 1
    if room < 16:
        raise ValueError(f"UID root {root!r} is too long to leave room for unique digits")
    digits = digits[:room].lstrip("0") or "1"
    return f"{root}.{digits}"
