"""The DICOM SCP: Verification, Modality Worklist C-FIND and MPPS on one AE.

Handlers stay thin: decode, call the core, render. A C-FIND handler fetches its matches and
closes its database session before it yields the first response, so a modality that reads
slowly never holds a pooled connection (measured: a handler that held one starved 40
concurrent modalities). No exception ever leaves a handler: pynetdicom would answer 0xC311.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError

from broker.config import DicomConfig
from broker.dicom.mpps import handle_n_create, handle_n_set
from broker.dicom.worklist import query_from_identifier, render_response
from broker.matching import InvalidQuery, find_worklist
from broker.store import Store

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
# PS3.4 C.4.1.1.4: 0xA900 identifier does not match SOP class; 0xC000-0xCFFF unable to process.
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


class DicomServer:
    def __init__(self, config: DicomConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self._server: Any = None
        ae = AE(ae_title=config.ae_title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(ModalityWorklistInformationFind)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        # pynetdicom's default of 10 refuses most of a ward at the 08:00 polling burst.
        ae.maximum_associations = config.max_associations
        ae.network_timeout = config.network_timeout_seconds
        ae.acse_timeout = config.network_timeout_seconds
        ae.dimse_timeout = config.network_timeout_seconds
        # findscu's default called AE title is ANY-SCP: answer to any called title.
        ae.require_called_aet = False
        ae.require_calling_aet = list(config.allowed_calling_ae_titles)
        self._ae = ae

    @property
    def port(self) -> int:
        if self._server is None:
            return self._config.port
        return int(self._server.socket.getsockname()[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
        ]
        self._server = self._ae.start_server((self._config.host, self._config.port),
                                             block=False, evt_handlers=handlers)
        log.info("DICOM SCP %s on %s:%d", self._config.ae_title, self._config.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()

    @staticmethod
    def _on_connect(event: Any) -> None:
        # Nagle's algorithm delays each small response PDU by ~40 ms on loopback.
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        try:
            identifier = event.identifier
            query = query_from_identifier(identifier, max_matches=self._config.max_matches)
            with self._store.reading() as session:
                rows = find_worklist(session, query)
        except InvalidQuery as exc:
            log.warning("C-FIND from %s refused: %s", calling, exc)
            yield _failure(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except SQLAlchemyError as exc:
            log.error("C-FIND from %s: database error: %s", calling,
                      str(getattr(exc, "orig", exc)).splitlines()[0])
            yield _failure(UNABLE_TO_PROCESS, "worklist database unavailable"), None
            return
        except Exception as exc:
            log.exception("C-FIND from %s: identifier could not be processed", calling)
            yield _failure(UNABLE_TO_PROCESS, f"cannot process identifier: {exc}"), None
            return
        if len(rows) >= self._config.max_matches:
            log.warning("C-FIND from %s hit dicom.max_matches=%d; the first %d by scheduled "
                        "time are returned", calling, self._config.max_matches, len(rows))
        sent = 0
        for row in rows:
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d of %d", calling, sent, len(rows))
                yield CANCEL, None
                return
            try:
                response = render_response(identifier, row)
            except Exception as exc:
                log.exception("C-FIND from %s: cannot render accession %s", calling,
                              row.procedure.accession_number)
                yield _failure(UNABLE_TO_PROCESS, f"cannot build a response: {exc}"), None
                return
            sent += 1
            yield PENDING, response
        log.info("C-FIND from %s: %d matches in %.1f ms", calling, sent,
                 (time.perf_counter() - started) * 1000)

    def _on_n_create(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        return handle_n_create(event, self._store)

    def _on_n_set(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        return handle_n_set(event, self._store)
