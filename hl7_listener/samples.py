"""Sample orders: files in sample_messages/ with date placeholders kept current.

Placeholders: ``{TODAY}`` and ``{TOMORROW}`` (YYYYMMDD), ``{NOW}`` (YYYYMMDDHHMMSS). Segment
terminators are normalised to \\r, so the files can be kept one segment per line.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path


def render_sample(text: str, today: dt.date, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.combine(today, dt.datetime.now().time())
    text = (text.replace("{TODAY}", today.strftime("%Y%m%d"))
            .replace("{TOMORROW}", (today + dt.timedelta(days=1)).strftime("%Y%m%d"))
            .replace("{NOW}", now.strftime("%Y%m%d%H%M%S")))
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]
    return "\r".join(segments) + "\r"


def load_samples(directory: Path, today: dt.date) -> list[tuple[str, bytes]]:
    """(file name, message) for every ``*.hl7`` file, in file-name order."""
    return [(path.name, render_sample(path.read_text(encoding="utf-8"), today).encode("utf-8"))
            for path in sorted(Path(directory).glob("*.hl7"))]
