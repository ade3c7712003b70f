"""DCMTK's example worklist and queries (Debian's dcmtk package), converted with dump2dcm."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

from tests.support import dcmtk

EXAMPLES = Path("/usr/share/doc/dcmtk/examples")
WORKLIST = EXAMPLES / "wlistdb" / "OFFIS"
QUERIES = EXAMPLES / "wlistqry"


def _dumps(source: Path) -> list[Path]:
    # Debian compresses larger documentation files; the examples may come either way.
    found = sorted(source.glob("*.dump")) + sorted(source.glob("*.dump.gz"))
    assert found, f"no DCMTK example dumps in {source} (apt-get install dcmtk)"
    return found


def convert(source: Path, target: Path, suffix: str) -> list[Path]:
    """Every ``*.dump`` (or ``*.dump.gz``) of ``source`` as a DICOM file in ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    converted = []
    for dump in _dumps(source):
        stem = dump.name.removesuffix(".gz").removesuffix(".dump")
        text = dump
        if dump.suffix == ".gz":
            text = target / f"{stem}.dump"
            text.write_bytes(gzip.decompress(dump.read_bytes()))
        out = target / f"{stem}{suffix}"
        subprocess.run([dcmtk("dump2dcm"), str(text), str(out)], check=True, timeout=30,
                       capture_output=True)
        converted.append(out)
    return converted


def worklist_files(target: Path) -> list[Path]:
    """DCMTK's example worklist as ``*.wl`` files, as wlmscpfs reads them."""
    return convert(WORKLIST, target, ".wl")


def query_files(target: Path) -> list[Path]:
    """DCMTK's example worklist queries (wlistqry*.dump) as DICOM files."""
    return convert(QUERIES, target, ".dcm")
