"""A downstream MPPS SCP for the forwarding tests: a real pynetdicom AE on 127.0.0.1 standing in
for a PACS, recording every N-CREATE / N-SET it receives."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer

from tests.support import free_port, wait_for


@dataclass(frozen=True)
class Received:
    operation: str  # "create" | "set"
    sop_instance_uid: str
    dataset: Dataset
    calling_ae_title: str


class DownstreamMpps:
    """Answers ``status`` (0 by default) to every request, and 0x0111 to an N-CREATE of an
    instance it already holds, as a PACS does; the next ``lose_responses`` requests are
    carried out and then answered with an A-ABORT, as if the response were lost on the way."""

    def __init__(self, port: int | None = None, *, ae_title: str = "PACS", status: int = 0,
                 allowed_calling_ae_titles: list[str] | None = None,
                 mpps_supported: bool = True,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = port or free_port()
        self.status = status
        self.lose_responses = 0
        self.received: list[Received] = []
        self._instances: set[str] = set()
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(ModalityPerformedProcedureStep if mpps_supported
                                 else Verification)
        ae.require_calling_aet = allowed_calling_ae_titles or []
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        self._server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)])

    def _answer(self, event: Event, operation: str, uid: str, dataset: Dataset,
                ) -> tuple[int, Dataset | None]:
        with self._lock:
            self.received.append(Received(operation, uid, dataset,
                                          str(event.assoc.requestor.ae_title).strip()))
            status = self.status
            if operation == "create" and status == 0:
                status = 0x0111 if uid in self._instances else 0
                self._instances.add(uid)
            if self.lose_responses:
                self.lose_responses -= 1
                event.assoc.abort()  # done here, but the requestor never hears of it
                return 0x0110, None
        return status, dataset if status == 0 else None

    def _on_create(self, event: Event) -> tuple[int, Dataset | None]:
        return self._answer(event, "create", event.request.AffectedSOPInstanceUID,
                            event.attribute_list)

    def _on_set(self, event: Event) -> tuple[int, Dataset | None]:
        return self._answer(event, "set", event.request.RequestedSOPInstanceUID,
                            event.modification_list)

    def operations(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.operation, r.sop_instance_uid) for r in self.received]

    def wait_for(self, count: int, timeout: float = 15) -> list[Received]:
        wait_for(lambda: len(self.received) >= count, timeout=timeout,
                 what=f"{count} MPPS requests downstream")
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
