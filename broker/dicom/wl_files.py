"""The worklist files (``*.wl``, as DCMTK's wlmscpfs and Orthanc's ModalityWorklists plugin
keep them): import into the store, so that a site can migrate, and export of the current
worklist. Each file's dataset goes through :mod:`broker.item_dataset`, the conversion every
path uses.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom import __version__ as pydicom_version
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from sqlalchemy.exc import SQLAlchemyError

from broker.domain import Order, WorklistRow
from broker.errors import BrokerError
from broker.item_dataset import TEXT_VRS, item_dataset, order_from_dataset
from broker.matching import WorklistQuery, find_worklist
from broker.orders import apply_batch, apply_order
from broker.store import Store

log = logging.getLogger(__name__)

# DCMTK writes .wl files with this SOP class in their meta header.
_MWL_FIND = "1.2.840.10008.5.1.4.31"
_PREAMBLE = b"\0" * 128 + b"DICM"
_IMPLEMENTATION_VERSION = f"PYDICOM {pydicom_version}"[:16]
_IO_THREADS = 4
# Files per transaction: one commit (one fsync on SQLite) per batch, not per file.
BATCH_SIZE = 500


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    refused: list[tuple[str, str]]  # (file name, reason)
    seconds: float = 0.0


_BAD_FILE = (BrokerError, InvalidDicomError, OSError, ValueError, AttributeError, KeyError,
             TypeError, IndexError)


def read_file(path: Path) -> Order | str:
    """A worklist file as an order, or why it cannot be one."""
    try:
        return order_from_dataset(dcmread(DicomBytesIO(path.read_bytes()), force=True))
    except _BAD_FILE as exc:
        return str(exc) or exc.__class__.__name__


# Below this many files the worker processes' start (~0.5 s) costs more than they save.
_FILES_FOR_WORKERS = 2_000


def _read_all(paths: list[Path], workers: int) -> Iterator[Order | str]:
    """Every file read, in order: by ``workers`` processes (decoding is CPU work, and the
    GIL lets one thread do it at a time), else here, with threads waiting on the disk."""
    if workers > 1:
        # spawn, not fork: the caller may hold database connections and threads.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            yield from pool.imap(read_file, paths, chunksize=64)
        return
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        for batch in _batches(paths, BATCH_SIZE):  # a batch ahead at most
            yield from pool.map(read_file, batch)


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def import_worklist(store: Store, directory: Path, *, uid_root: str,
                    progress: Callable[[int], None] | None = None,
                    batch_size: int = BATCH_SIZE, workers: int | None = None) -> ImportResult:
    """Import every ``*.wl`` file of a folder, a batch of files per transaction.

    A file that cannot be read or stored is reported by name and skipped; the others are
    imported. ``progress`` is told how many files each batch handled. ``workers``: processes
    reading the files while this one writes the database (default: one per CPU for a large
    folder, none for a small one).
    """
    started = time.perf_counter()
    imported = 0
    refused: list[tuple[str, str]] = []
    paths = sorted(Path(directory).glob("*.wl"))
    if workers is None:
        workers = (os.cpu_count() or 1) if len(paths) >= _FILES_FOR_WORKERS else 0
    read = _read_all(paths, workers)
    try:
        for batch in _batches(paths, batch_size):
            orders: list[tuple[Path, Order]] = []
            for path, found in zip(batch, read, strict=False):
                if isinstance(found, str):
                    refused.append((path.name, found))
                    log.warning("worklist file %s not imported: %s", path.name, found)
                else:
                    orders.append((path, found))
            imported += _store_batch(store, orders, uid_root, refused)
            if progress is not None:
                progress(len(batch))
    finally:
        read.close()  # stops the readers when the database fails
    return ImportResult(imported, refused, time.perf_counter() - started)


def _store_batch(store: Store, orders: list[tuple[Path, Order]], uid_root: str,
                 refused: list[tuple[str, str]]) -> int:
    """One transaction for the batch; if it fails, each file alone to find the bad ones."""
    try:
        with store.writing() as session:
            apply_batch(session, [order for _, order in orders], uid_root=uid_root)
        return len(orders)
    except (BrokerError, SQLAlchemyError):
        pass
    stored = 0
    for path, order in orders:
        try:
            with store.writing() as session:
                apply_order(session, order, uid_root=uid_root)
        except (BrokerError, SQLAlchemyError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            refused.append((path.name, reason))
            log.warning("worklist file %s not imported: %s", path.name, reason)
            continue
        stored += 1
    return stored


# --- Explicit VR Little Endian, written directly -------------------------------------------

# VRs with a 4-byte length in Explicit VR (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT",
                              "SV", "UV"})
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def text_bytes(element: DataElement, codec: str = "utf-8") -> bytes | None:
    """A text value encoded (UTF-8 by default), padded to even length; None when pydicom
    should write it (numbers, binary values)."""
    value = element.value
    if value is None:
        text = ""
    elif isinstance(value, str | PersonName) or hasattr(value, "original_string"):
        text = str(value)
    elif isinstance(value, MultiValue | list) and all(
            isinstance(v, str | PersonName) or hasattr(v, "original_string") for v in value):
        text = "\\".join(str(v) for v in value)
    else:
        return None
    data = text.encode(codec)
    if len(data) % 2:
        data += b"\0" if element.VR == "UI" else b" "
    return data


def encode_explicit_little(ds: Dataset) -> bytes:
    """A dataset of Unicode values in Explicit VR Little Endian, UTF-8: what pydicom's writer
    produces (sequences and items of explicit length), in a fifth of its time; elements of
    other kinds (binary, numbers) are written by pydicom."""
    out = bytearray()
    for element in ds:
        tag, vr = int(element.tag), element.VR
        if vr == "SQ":
            body = b"".join(_ITEM + struct.pack("<I", len(item)) + item
                            for item in (encode_explicit_little(i) for i in element.value))
            out += _header(tag, vr, len(body)) + body
            continue
        data = text_bytes(element) if vr in TEXT_VRS else None
        if data is not None and (vr in _LONG_LENGTH_VRS or len(data) <= 0xFFFF):
            out += _header(tag, vr, len(data)) + data
            continue
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, element, "utf_8")
        out += buffer.getvalue()
    return bytes(out)


def _file_meta(instance_uid: str) -> bytes:
    """File Meta Information (PS3.10 7.1), Explicit VR Little Endian."""
    elements = [
        (0x00020001, "OB", b"\0\1"),
        (0x00020002, "UI", _MWL_FIND.encode()),
        (0x00020003, "UI", instance_uid.encode()),
        (0x00020010, "UI", ExplicitVRLittleEndian.encode()),
        (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode()),
        (0x00020013, "SH", _IMPLEMENTATION_VERSION.encode()),
    ]
    body = bytearray()
    for tag, vr, data in elements:
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        body += _header(tag, vr, len(data)) + data
    return _header(0x00020000, "UL", 4) + struct.pack("<I", len(body)) + bytes(body)


def worklist_file(row: WorklistRow) -> bytes:
    """A stored item as the ``.wl`` file wlmscpfs reads: its dataset, declared UTF-8, in
    Explicit VR Little Endian with the Modality Worklist SOP class in the file meta."""
    ds = item_dataset(row)
    ds.SpecificCharacterSet = "ISO_IR 192"
    meta = _file_meta(row.procedure.study_instance_uid or "1.2.3")
    return _PREAMBLE + meta + encode_explicit_little(ds)


def _file_name(accession: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in accession) + ".wl"


def export_worklist(store: Store, directory: Path,
                    progress: Callable[[int], None] | None = None) -> int:
    """Write every visible worklist item as ``<accession>.wl``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    with store.reading() as session:
        rows = find_worklist(session, WorklistQuery(limit=100_000_000))
    # Threads create and write the files (the file system's share of the time, without the
    # GIL) while this one encodes; at most a few batches wait in memory.
    writing: list[Future[int]] = []
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        for start in range(0, len(rows), BATCH_SIZE):
            batch = rows[start:start + BATCH_SIZE]
            encoded = [(directory / _file_name(row.procedure.accession_number),
                        worklist_file(row)) for row in batch]
            for future in writing:
                future.result()  # the previous batch is written (or its error raised)
            if progress is not None and writing:
                progress(len(writing))
            writing = [pool.submit(path.write_bytes, data) for path, data in encoded]
        for future in writing:
            future.result()
        if progress is not None and writing:
            progress(len(writing))
    return len(rows)


def count_files(directory: Path) -> int:
    return sum(1 for _ in Path(directory).glob("*.wl"))

