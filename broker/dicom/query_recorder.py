"""Remembers, off the C-FIND path, which calling AE was given which item and what it asked.

The C-FIND handler only updates two in-memory maps under a lock (:meth:`record`); a
background thread writes them every few seconds in one short transaction
(``broker.cfind_log``), and :meth:`stop` writes what is left. The identifiers are turned into
DICOM JSON in that thread too, not in the handler.

If the database cannot be written, the batch is merged back (up to a bound) and tried again
at the next flush: the record is informational, so beyond the bound it is dropped with a
warning rather than holding memory without end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections import deque
from typing import Any

from pydicom import Dataset

from broker import cfind_log
from broker.cfind_log import AskedQuery, Exposure
from broker.models import utcnow
from broker.periodic_flush import PeriodicFlush
from broker.store import Store

log = logging.getLogger(__name__)

# Distinct (calling AE, item) pairs held between flushes before new ones are dropped.
MAX_PENDING_EXPOSURES = 200_000


class QueryRecorder(PeriodicFlush):
    """The C-FIND record of one DicomServer: buffered by :meth:`record`, written in batches
    by a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, store: Store, *, flush_seconds: float = 5.0,
                 queries_per_ae: int = cfind_log.DEFAULT_QUERIES_PER_AE) -> None:
        super().__init__(flush_seconds=flush_seconds, thread_name="cfind-recorder")
        self._store = store
        self._queries_per_ae = queries_per_ae
        self._lock = threading.Lock()
        self._exposures: dict[tuple[str, str], list[Any]] = {}
        self._queries: dict[str, deque[tuple[Dataset, dt.datetime, int]]] = {}
        self._flush_lock = threading.Lock()  # one flush at a time: the thread, or stop()

    # --- the C-FIND path --------------------------------------------------------------

    def record(self, calling_ae: str, identifier: Dataset, accessions: list[str]) -> None:
        """One C-FIND: its identifier, and the accession numbers of the items sent."""
        now = utcnow()
        with self._lock:
            exposures = self._exposures
            for accession in accessions:
                seen = exposures.get((calling_ae, accession))
                if seen is not None:
                    seen[1] = now
                    seen[2] += 1
                elif len(exposures) < MAX_PENDING_EXPOSURES:
                    exposures[(calling_ae, accession)] = [now, now, 1]
            asked = self._queries.get(calling_ae)
            if asked is None:
                asked = self._queries[calling_ae] = deque(maxlen=self._queries_per_ae)
            asked.append((identifier, now, len(accessions)))

    # --- the flusher ------------------------------------------------------------------

    def flush(self) -> int:
        """Write the buffered record now; returns how many rows were written."""
        with self._flush_lock:
            with self._lock:
                exposures, self._exposures = self._exposures, {}
                queries, self._queries = self._queries, {}
            if not exposures and not queries:
                return 0
            batch = [Exposure(ae, accession, first, last, count)
                     for (ae, accession), (first, last, count) in exposures.items()]
            asked = _distinct(queries)
            try:
                with self._store.writing() as session:
                    cfind_log.write_exposures(session, batch)
                    cfind_log.write_queries(session, asked, keep=self._queries_per_ae)
            except Exception as exc:
                self._merge_back(exposures, queries)
                log.warning("C-FIND record not written (kept for the next try): %s",
                            getattr(exc, "orig", None) or exc)
                return 0
            return len(batch) + len(asked)

    def _merge_back(self, exposures: dict[tuple[str, str], list[Any]],
                    queries: dict[str, deque[tuple[Dataset, dt.datetime, int]]]) -> None:
        with self._lock:
            for key, (first, last, count) in exposures.items():
                seen = self._exposures.get(key)
                if seen is not None:
                    seen[0] = first
                    seen[2] += count
                elif len(self._exposures) < MAX_PENDING_EXPOSURES:
                    self._exposures[key] = [first, last, count]
            for calling_ae, older in queries.items():
                newer = self._queries.get(calling_ae, ())
                self._queries[calling_ae] = deque([*older, *newer],
                                                  maxlen=self._queries_per_ae)


def identifier_json(identifier: Dataset) -> str:
    """The identifier as the modality sent it, as DICOM JSON (PS3.18 F.2), keys in order."""
    return json.dumps(identifier.to_json_dict(), sort_keys=True, ensure_ascii=False)


def _distinct(queries: dict[str, deque[tuple[Dataset, dt.datetime, int]]]) -> list[AskedQuery]:
    """One entry per calling AE and identifier: a modality polling with the same keys."""
    found: dict[tuple[str, str], AskedQuery] = {}
    for calling_ae, asked in queries.items():
        for identifier, at, matches in asked:
            try:
                text = identifier_json(identifier)
            except Exception as exc:  # an element pydicom cannot put in JSON
                log.warning("C-FIND record: identifier from %s not kept: %s", calling_ae, exc)
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            earlier = found.get((calling_ae, digest))
            if earlier is None:
                found[(calling_ae, digest)] = AskedQuery(calling_ae, digest, text, at, at, 1,
                                                         matches)
            else:
                found[(calling_ae, digest)] = AskedQuery(
                    calling_ae, digest, text, earlier.first_at, at,
                    earlier.count + 1, matches)
    return list(found.values())
