"""The DICOM SCP: Verification, Modality Worklist C-FIND, MPPS N-CREATE / N-SET and N-GET.

Handlers stay thin (after pynetdicom's ``apps/qrscp/handlers.py``): decode, call the core,
render. pynetdicom runs each association in its own thread, so every request opens its own
session, and the C-FIND handler closes it before the first response goes out: a modality that
reads its matches slowly must not hold a pooled connection while 40 others poll.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator

from pydicom import Dataset
from pynetdicom import AE, Association, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
    ModalityWorklistInformationFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from broker import metrics
from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.config import DicomConfig
from broker.dicom import mpps
from broker.dicom.charsets import codec_for
from broker.dicom.identifier import UnreadableKey, read_identifier
from broker.dicom.query_recorder import QueryRecorder
from broker.dicom.worklist import answer_encoder, query_from_identifier
from broker.domain import DEFAULT_REPORTING, MppsResult, StatusReporting
from broker.errors import ConfigError
from broker.matching import InvalidQuery, find_worklist
from broker.site_policy import apply_site_policy
from broker.store import Store
from broker.tls import (
    ContextSource,
    format_subject,
    handshake_failure,
    subject_allowed,
    subject_of,
)

log = logging.getLogger(__name__)

# C-FIND statuses (PS3.4 K.4.1.1.4 table K.4-1, PS3.7 C).
PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
PROCESSING_ERROR = 0xC001

FindResponse = tuple[int | Dataset, Dataset | None]

# How long stop() waits for each aborted association thread to end.
_JOIN_SECONDS = 5.0


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


class _QuickAckSocket(socket.socket):
    """A socket that acknowledges every segment at once (Linux TCP_QUICKACK).

    Modalities (pynetdicom, DCMTK) send a C-FIND request as two small writes without
    TCP_NODELAY: Nagle holds the second until the first is acknowledged, and a delayed ACK
    waits ~40 ms. The kernel falls back to delayed ACKs after a while, so the option is set
    again before every read.
    """

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass
        return super().recv(bufsize, flags)


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckSSLSocket(ssl.SSLSocket):
    """The same for a TLS connection: pynetdicom reads through the SSLSocket's recv(), and
    without it a TLS poll of a few matches measured ~50 ms slower than a plain one."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass
        return super().recv(buflen, flags)


def _on_conn_open(event: Event) -> None:
    # Each C-FIND response is a small PDU written right after the previous one; with Nagle's
    # algorithm and the peer's delayed ACK every query would wait ~40 ms.
    dul = event.assoc.dul
    sock = dul.socket.socket if dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None and type(sock) is socket.socket:
            sock.__class__ = _QuickAckSocket
        elif _TCP_QUICKACK is not None and type(sock) is ssl.SSLSocket:
            sock.__class__ = _QuickAckSSLSocket


def _peer(assoc: Association) -> tuple[str, str | None]:
    """The peer's address, and its certificate's subject on a TLS association."""
    requestor = assoc.requestor
    address = f"{requestor.address}:{requestor.port}" if requestor.address else ""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if not isinstance(sock, ssl.SSLSocket):
        return address, None
    try:
        return address, format_subject(subject_of(sock.getpeercert())) or "none"
    except (OSError, ValueError):
        return address, "none"


def _requested_ae(assoc: Association) -> str:
    primitive = assoc.requestor.primitive
    return str(primitive.calling_ae_title).strip() if primitive is not None else ""


def _on_echo(event: Event) -> int:
    return 0x0000


# PDUs a C-FIND handler may queue ahead of the network (a pending response is two or more).
_BACKLOG = 16
# Matches answered between two looks at the peer: each look (a select and a queue lock) cost
# about 0.1 ms, as much as encoding an answer; a C-CANCEL still stops the answer within a few
# matches, and the backlog bound still holds within _PACE_EVERY * 2 PDUs.
_PACE_EVERY = 4
# How long one wait for the reactor lasts before the association's state is looked at again.
_REACTOR_WAIT = 0.05


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile: the reactor sees to that
        return False


def _pace(assoc: Association, timeout: float) -> None:
    """Let the peer be heard before the next C-FIND response (a C-CANCEL, PS3.7 9.1.2.1.5).

    pynetdicom's DUL reactor reads from the socket only when it has nothing left to send,
    and the handler renders responses faster than the reactor sends them: a C-CANCEL then
    stayed unread until every match had gone out (measured: 1000 of 1000 matches sent, final
    status Success). So at most ``_BACKLOG`` PDUs wait to be sent, and when the peer has sent
    something, the handler waits until the reactor has drained the queue and read it.
    """
    dul = assoc.dul
    outgoing = dul.to_provider_queue
    deadline = time.monotonic() + timeout
    # Queue.get() notifies not_full: the reactor has taken a PDU to send.
    with outgoing.not_full:
        while (len(outgoing.queue) > _BACKLOG and assoc.is_established
               and time.monotonic() < deadline):
            outgoing.not_full.wait(_REACTOR_WAIT)
    sock = dul.socket.socket if dul.socket is not None else None
    while (sock is not None and assoc.is_established and _readable(sock)
           and time.monotonic() < deadline):
        with outgoing.not_full:
            outgoing.not_full.wait_for(lambda: not outgoing.queue, _REACTOR_WAIT)
        # The reactor reads once it has nothing to send, and says so to nobody: look again
        # after one of its turns (it polls every millisecond). Only when the peer spoke.
        time.sleep(0.001)


# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised
# (PS3.8 9.3.4): what a modality presenting the wrong certificate for its AE title gets.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)


class _TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the accepting thread.

    pynetdicom wraps each accepted socket with a handshake in the thread that accepts: one
    client that connects and says nothing would stop the port from accepting anyone else.
    Here the handshake runs in the connection's own thread, bounded by a timeout, and the
    context is asked for at every connection, so that a reload (SIGHUP) applies.
    """

    source: ContextSource
    handshake_timeout: float = 10.0
    audit: AuditTrail | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        try:
            wrapped = self.source.context.wrap_socket(client, server_side=True,
                                                      do_handshake_on_connect=False)
        except OSError:
            client.close()
            raise
        return wrapped, address

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: tuple[str, int] | str) -> None:
        assert isinstance(request, ssl.SSLSocket)
        timeout = request.gettimeout()
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(timeout)
        except (OSError, ValueError) as exc:  # SSLError, timeout, reset
            reason = handshake_failure(exc)
            log.warning("DICOM TLS handshake with %s failed: %s", client_address, reason)
            if self.audit is not None:
                host, port = (client_address if isinstance(client_address, tuple)
                              else (client_address, ""))
                self.audit.record(AuditEvent(Kind.TLS_FAILED, "", "refused",
                                             address=f"{host}:{port}",
                                             detail={"link": "dicom", "reason": reason}))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


class DicomServer:
    """The broker's DICOM application entity, listening without blocking the caller."""

    def __init__(self, config: DicomConfig, store: Store,
                 reporting: StatusReporting = DEFAULT_REPORTING,
                 tls: ContextSource | None = None, audit: AuditTrail | None = None) -> None:
        self._config = config
        self._audit = audit
        self._store = store
        self._reporting = reporting
        self._tls = tls
        self._tls_server: _TlsAssociationServer | None = None
        self._tls_thread: threading.Thread | None = None
        # Who was given which item, and what each modality asked: written off the C-FIND
        # path by the recorder's own thread, between start() and stop().
        self.recorder = (QueryRecorder(store, flush_seconds=config.record_flush_seconds,
                                       queries_per_ae=config.recent_queries_per_ae)
                         if config.record_cfind else None)
        for calling_ae, modality in config.modalities.items():
            if modality.character_set is not None:
                try:
                    codec_for(modality.character_set)
                except ValueError as exc:
                    raise ConfigError(f"dicom.modalities.{calling_ae}.character_set: {exc}"
                                      ) from None
        self._ae = self._build_ae(config)
        self._server: ThreadedAssociationServer | None = None
        self._bound_port: int | None = None

    @staticmethod
    def _build_ae(config: DicomConfig) -> AE:
        # pynetdicom pretty-prints every request and response identifier for its debug log,
        # whatever the log level: measured 1.1 ms of CPU per C-FIND response.
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_REQUEST_IDENTIFIERS = False
        # pynetdicom's standard DIMSE logging handlers raise inside the library for an N-GET
        # with zero or one attribute identifier and print a traceback into the broker's log
        # although the answer is right; the broker logs each request itself.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=config.ae_title)
        # Default transfer syntaxes: implicit and explicit VR little endian (what findscu and
        # most modalities propose), deflated and big endian.
        for sop_class in (Verification, ModalityWorklistInformationFind,
                          ModalityPerformedProcedureStep, ModalityPerformedProcedureStepRetrieve):
            ae.add_supported_context(sop_class)
        # At 08:00 every modality of a site polls at once; pynetdicom's default is 10.
        ae.maximum_associations = config.max_associations
        ae.network_timeout = config.network_timeout_seconds
        ae.acse_timeout = config.network_timeout_seconds
        ae.dimse_timeout = config.network_timeout_seconds
        # findscu calls ANY-SCP by default and the companion answered it: any called AE.
        ae.require_called_aet = False
        ae.require_calling_aet = list(config.allowed_calling_ae_titles)
        return ae

    def _handlers(self) -> list[tuple[evt.EventType, object]]:
        return [
            (evt.EVT_CONN_OPEN, _on_conn_open),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_N_GET, self._on_n_get),
        ]

    def start(self) -> None:
        """Listen on the configured address(es); raises OSError if a port cannot be bound."""
        if self._server is not None or self._tls_server is not None:
            return
        if self._config.tls.plain_port:
            self._server = self._ae.start_server(
                (self._config.host, self._config.port), block=False,
                evt_handlers=self._handlers())  # type: ignore[arg-type]
            self._bound_port = int(
                self._server.socket.getsockname()[1])  # type: ignore[union-attr]
            log.info("DICOM SCP %s listening on %s:%d", self._config.ae_title,
                     self._config.host, self.port)
        if self._tls is not None:
            try:
                self._start_tls(self._tls)
            except BaseException:
                self.stop()
                raise
        if self.recorder is not None:
            self.recorder.start()

    def _start_tls(self, source: ContextSource) -> None:
        # One AE serving two ports: the same handlers and contexts on both.
        server = self._ae.make_server(
            (self._config.host, self._config.tls.port or 0), ssl_context=source.context,
            evt_handlers=self._handlers(),  # type: ignore[arg-type]
            server_class=_TlsAssociationServer)
        server.source = source
        server.handshake_timeout = self._config.tls.handshake_timeout_seconds
        server.audit = self._audit
        # As start_server does: the AE's shutdown() and the server's own look for it there.
        self._ae._servers.append(server)
        self._tls_server = server
        self._tls_thread = threading.Thread(target=server.serve_forever,
                                            name="dicom-tls-acceptor", daemon=True)
        self._tls_thread.start()
        log.info("DICOM SCP %s listening with TLS on %s:%d", self._config.ae_title,
                 self._config.host, self.tls_port)

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is not None and self._tls_server.socket is not None:
            return int(self._tls_server.socket.getsockname()[1])
        return self._config.tls.port if self._tls is not None else None

    @property
    def running(self) -> bool:
        """Listening now, on the plain port, the TLS port or both (for /health)."""
        return self._server is not None or self._tls_server is not None

    def open_associations(self) -> int:
        """Associations established now (for /metrics and the status page)."""
        return sum(1 for assoc in list(self._ae.active_associations) if assoc.is_established)

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when the configured port is 0); before the
        first start, the configured one."""
        return self._config.port if self._bound_port is None else self._bound_port

    def stop(self) -> None:
        """Stop listening, abort the open associations and wait for their threads."""
        server, self._server = self._server, None
        tls_server, self._tls_server = self._tls_server, None
        if server is None and tls_server is None:
            return
        for listening in (server, tls_server):
            if listening is not None:
                listening.shutdown()  # also closes its socket
        associations = list(self._ae.active_associations)
        established = [assoc for assoc in associations if assoc.is_established]
        for assoc in associations:
            if assoc.is_established:
                assoc.abort()
            else:
                # Still negotiating, or a bare TCP probe from a monitor: nothing to abort. Its
                # network thread is stopped here; the (daemon) association thread would only
                # wait out the ACSE timeout, so it is not waited for.
                assoc.kill()
        for assoc in established:
            assoc.join(_JOIN_SECONDS)
        if self.recorder is not None:
            # After the associations: what their last C-FINDs gave is written too.
            self.recorder.stop()
        log.info("DICOM SCP stopped")

    # --- association ----------------------------------------------------------------

    def _on_accepted(self, event: Event) -> None:
        if self._audit is not None:
            address, subject = _peer(event.assoc)
            self._audit.record(AuditEvent(Kind.ASSOCIATION_ACCEPTED, _requested_ae(event.assoc),
                                          "accepted", address=address, tls_subject=subject))

    def _on_rejected(self, event: Event) -> None:
        metrics.ASSOCIATIONS_REFUSED.inc()
        if self._audit is not None:
            address, subject = _peer(event.assoc)
            self._audit.record(AuditEvent(Kind.ASSOCIATION_REJECTED, _requested_ae(event.assoc),
                                          "rejected", address=address, tls_subject=subject))

    def _on_requested(self, event: Event) -> None:
        """Log who asks over TLS, and hold a calling AE title to its certificate subjects."""
        assoc = event.assoc
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        # Only the request itself is known yet (requestor.ae_title is set on acceptance).
        primitive = assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        over_tls = isinstance(sock, ssl.SSLSocket)
        subject = subject_of(sock.getpeercert()) if isinstance(sock, ssl.SSLSocket) else ()
        if over_tls:
            log.info("DICOM TLS association request calling_ae=%s from %s: client "
                     "certificate %s", calling_ae, assoc.requestor.address,
                     format_subject(subject) or "none")
        allowed = self._config.tls.allowed_subjects.get(calling_ae)
        if allowed is None or subject_allowed(subject, allowed):
            return
        log.warning("association rejected calling_ae=%s from %s: %s", calling_ae,
                    assoc.requestor.address,
                    f"certificate subject {format_subject(subject)} is not allowed for that AE "
                    "title" if subject else "that AE title must present a client certificate")
        # As pynetdicom's own ACSE does for a calling AE title it refuses.
        assoc.acse.send_reject(*_REJECT_CALLING_AE)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    # --- C-FIND ---------------------------------------------------------------------

    def _on_find(self, event: Event) -> Iterator[FindResponse]:
        started = time.perf_counter()
        calling_ae = _calling_ae(event)
        matches = sent = 0
        outcome = "success"
        identifier: Dataset | None = None
        given: list[str] = []
        try:
            try:
                identifier = read_identifier(event.identifier)
                modality = self._config.modalities.get(calling_ae)
                character_set = modality.character_set if modality is not None else None
                query = apply_site_policy(
                    query_from_identifier(
                        identifier, max_matches=self._config.max_matches,
                        names_case_sensitive=self._config.names_case_sensitive),
                    self._config, calling_ae).query
                syntax = event.context.transfer_syntax
                render = answer_encoder(identifier, character_set=character_set,
                                        unencodable=self._config.unencodable,
                                        implicit_vr=syntax.is_implicit_VR,
                                        little_endian=syntax.is_little_endian)
            except UnreadableKey as exc:
                outcome = "invalid"
                identifier = None
                log.warning("C-FIND from %s: %s", calling_ae, exc.reason)
                refusal = mpps.failure(IDENTIFIER_DOES_NOT_MATCH, exc.reason)
                refusal.OffendingElement = [exc.tag]
                yield refusal, None
                return
            except Exception as exc:
                outcome = "undecodable"
                identifier = None
                log.warning("C-FIND from %s: cannot decode the identifier: %s", calling_ae, exc)
                yield _failure(UNABLE_TO_PROCESS, f"cannot decode the identifier: {exc}")
                return
            try:
                with self._store.reading() as session:
                    rows = find_worklist(session, query)
            except InvalidQuery as exc:
                outcome = "invalid"
                log.warning("C-FIND from %s: %s", calling_ae, exc.reason)
                yield _failure(IDENTIFIER_DOES_NOT_MATCH, exc.reason)
                return
            except SQLAlchemyError as exc:
                outcome = "failed"
                log.error("C-FIND from %s: database error: %s", calling_ae,
                          getattr(exc, "orig", None) or exc.__class__.__name__)
                yield _failure(PROCESSING_ERROR, "the worklist database could not be read")
                return
            except Exception:
                outcome = "failed"
                log.exception("C-FIND from %s: query failed", calling_ae)
                yield _failure(PROCESSING_ERROR, "internal error while matching")
                return
            # The session is closed: from here on only the network can be slow.
            matches = len(rows)
            for index, row in enumerate(rows):
                if index % _PACE_EVERY == 0:
                    _pace(event.assoc, self._config.network_timeout_seconds)
                if event.is_cancelled:
                    outcome = "cancelled"
                    yield CANCEL, None
                    return
                try:
                    response = render(row)
                except Exception:
                    outcome = "failed"
                    log.exception("C-FIND from %s: cannot render accession %s", calling_ae,
                                  row.procedure.accession_number)
                    yield _failure(PROCESSING_ERROR, "a worklist item could not be encoded")
                    return
                yield PENDING, response
                sent += 1
                given.append(row.procedure.accession_number)
        finally:
            if self.recorder is not None and identifier is not None:
                self.recorder.record(calling_ae, identifier, given)
            if self._audit is not None:
                requestor = event.assoc.requestor
                self._audit.record(AuditEvent(
                    Kind.CFIND, calling_ae, outcome,
                    address=f"{requestor.address}:{requestor.port}",
                    accessions=tuple(given), detail={"matches": matches, "sent": sent}))
            elapsed = time.perf_counter() - started
            metrics.observe_cfind(calling_ae, outcome, sent, elapsed)
            log.info("C-FIND calling_ae=%s matches=%d sent=%d outcome=%s ms=%.1f", calling_ae,
                     matches, sent, outcome, elapsed * 1000)

    # --- MPPS -----------------------------------------------------------------------

    def _on_n_create(self, event: Event) -> mpps.Response:
        recorded: list[MppsResult] = []
        try:
            attribute_list = event.attribute_list
        except Exception as exc:
            refused: mpps.Response = (mpps.failure(
                mpps.INVALID_ATTRIBUTE_VALUE, f"cannot decode the attribute list: {exc}"), None)
            self._audit_mpps(event, Kind.MPPS_CREATE, refused, recorded,
                             event.request.AffectedSOPInstanceUID)
            return refused
        response = mpps.handle_create(self._store, attribute_list,
                                      sop_instance_uid=event.request.AffectedSOPInstanceUID,
                                      calling_ae_title=_calling_ae(event),
                                      reporting=self._reporting,
                                      forward_to=self._config.mpps_forward,
                                      recorded=recorded)
        _count_mpps("create", attribute_list, response)
        self._audit_mpps(event, Kind.MPPS_CREATE, response, recorded,
                         event.request.AffectedSOPInstanceUID)
        return response

    def _on_n_set(self, event: Event) -> mpps.Response:
        recorded: list[MppsResult] = []
        try:
            modification_list = event.modification_list
        except Exception as exc:
            refused: mpps.Response = (mpps.failure(
                mpps.INVALID_ATTRIBUTE_VALUE, f"cannot decode the modification list: {exc}"),
                None)
            self._audit_mpps(event, Kind.MPPS_SET, refused, recorded,
                             event.request.RequestedSOPInstanceUID)
            return refused
        response = mpps.handle_set(self._store, modification_list,
                                   sop_instance_uid=event.request.RequestedSOPInstanceUID,
                                   calling_ae_title=_calling_ae(event),
                                   reporting=self._reporting,
                                   forward_to=self._config.mpps_forward,
                                   recorded=recorded)
        _count_mpps("set", modification_list, response)
        self._audit_mpps(event, Kind.MPPS_SET, response, recorded,
                         event.request.RequestedSOPInstanceUID)
        return response

    def _audit_mpps(self, event: Event, kind: str, response: mpps.Response,
                    recorded: list[MppsResult], uid: object) -> None:
        if self._audit is None:
            return
        code = _status_code(response)
        result = recorded[0] if recorded else None
        requestor = event.assoc.requestor
        self._audit.record(AuditEvent(
            kind, _calling_ae(event), "success" if code == 0 else f"0x{code:04X}",
            address=f"{requestor.address}:{requestor.port}",
            accessions=tuple(result.linked_accessions) if result is not None else (),
            detail={"sop_instance_uid": result.sop_instance_uid if result is not None
                    else str(uid or ""),
                    "status": result.status if result is not None else None}))

    def _on_n_get(self, event: Event) -> mpps.Response:
        return mpps.handle_get(self._store, event.attribute_identifiers,
                               sop_instance_uid=event.request.RequestedSOPInstanceUID,
                               calling_ae_title=_calling_ae(event))


def _status_code(response: mpps.Response) -> int:
    status = response[0]
    return status if isinstance(status, int) else int(getattr(status, "Status", 0xC000))


def _count_mpps(operation: str, request: Dataset, response: mpps.Response) -> None:
    code = _status_code(response)
    try:
        asked = str(request.get("PerformedProcedureStepStatus", "") or "").strip().upper()
    except Exception:
        asked = "other"
    metrics.observe_mpps(operation, asked or None, code == 0)


def _failure(status: int, comment: str) -> FindResponse:
    return mpps.failure(status, comment), None
