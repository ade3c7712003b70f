"""No NUL character in stored text: PostgreSQL refuses one in any text column (the write fails
as a database error), SQLite keeps it inside names and accession numbers, and no DICOM or HL7
text value may carry one. The one place that says so.

- :func:`field_with_nul`: what an order or an MPPS request is refused for, named.
- :func:`holds_nul`: the same test through a DICOM JSON object's values.
- :func:`storable`: text from outside that is logged even when refused (an HL7 sender's
  header): its NUL becomes U+FFFD, visibly damaged and kept, rather than the whole write
  failing (an audit batch that fails is retried).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def storable(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def holds_nul(value: Any) -> bool:
    """A text, or a JSON value (objects and arrays of them), holding a NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_nul(v) for v in value)
    return False


def field_with_nul(*records: Any) -> str | None:
    """The name of the first text field of these dataclass instances that holds a NUL."""
    for record in records:
        for spec in fields(record):
            value = getattr(record, spec.name)
            if isinstance(value, str) and "\x00" in value:
                return spec.name
    return None
