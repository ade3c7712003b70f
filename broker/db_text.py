"""Text from outside (an HL7 sender's header, a peer's name) made storable on both backends.

PostgreSQL refuses a NUL character in any text column, SQLite keeps it. A refused message is
still logged and audited: its NUL becomes U+FFFD, visibly damaged and kept, rather than the
whole write failing (an audit batch that fails is retried, and would fail for ever).
"""

from __future__ import annotations


def storable(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text
