"""The audit trail's writer: edges call :meth:`AuditTrail.record` on their hot paths (a list
append under a lock); a thread writes the buffered events every few seconds, in one short
transaction (``broker.audit``), as JSON lines appended to the audit log file, and as RFC 5424
syslog messages to a collector (the transport IHE ATNA uses), as the C-FIND record does
(``broker.dicom.query_recorder``).

A batch the database refuses while it is unavailable is kept for the next flush up to a
bound, then dropped with a warning: the file and the collector have it already, and a broker
must not stop answering modalities because its audit table is unavailable. When the database
is there but refuses the batch, its events are stored one by one and only one it can never
take is dropped (logged as an error), so that it does not hold back every flush after it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from broker import audit
from broker.audit import AuditEvent
from broker.periodic_flush import PeriodicFlush
from broker.store import Store

log = logging.getLogger(__name__)

# Events held for the database between flushes (and after failed ones) before new ones are
# dropped from it (never from the file or the collector).
MAX_PENDING = 200_000

# RFC 5424 6.2.1: facility 10 (security/authorization), as DICOM PS3.15 A.5 suggests for
# audit messages; severity 5 (notice) for what happened as asked, 4 (warning) for refusals.
_FACILITY = 10
_NOTICE, _WARNING = 5, 4
_REFUSED = {"rejected", "failed", "refused", "AE", "AR", "CE", "CR"}


def rfc5424(event: AuditEvent, *, hostname: str, app_name: str = "worklist-broker",
            procid: str | None = None) -> bytes:
    """One syslog message (RFC 5424 6): header, no structured data, the JSON object as MSG."""
    refused = event.outcome in _REFUSED or event.kind.endswith(("rejected", "failed"))
    priority = _FACILITY * 8 + (_WARNING if refused else _NOTICE)
    stamp = event.at.isoformat(timespec="milliseconds") + "Z"

    def token(text: str, size: int) -> str:
        # PRINTUSASCII without spaces, or the NILVALUE.
        cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:size]
        return cleaned or "-"

    header = (f"<{priority}>1 {stamp} {token(hostname, 255)} {token(app_name, 48)} "
              f"{token(procid or str(os.getpid()), 128)} {token(event.kind, 32)} -")
    body = json.dumps(event.as_json(), ensure_ascii=False, separators=(",", ":"))
    return f"{header} {body}".encode()


class SyslogSender:
    """Sends audit messages to one collector: UDP datagrams, or TCP with RFC 6587 octet
    counting (``LEN SP MSG``), reconnecting when the connection drops. Every socket has a
    timeout; a message that cannot be sent is counted and dropped."""

    def __init__(self, host: str, port: int, protocol: str = "udp", *,
                 timeout: float = 5.0) -> None:
        self.host, self.port, self.protocol, self.timeout = host, port, protocol, timeout
        self.hostname = socket.gethostname()
        self._sock: socket.socket | None = None
        self.dropped = 0

    def _connect(self) -> socket.socket:
        if self._sock is None:
            if self.protocol == "udp":
                info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
                sock = socket.socket(info[0], socket.SOCK_DGRAM)
                sock.settimeout(self.timeout)
                sock.connect(info[4])
            else:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._sock = sock
        return self._sock

    def send(self, events: list[AuditEvent]) -> None:
        if not events:
            return
        messages = [rfc5424(event, hostname=self.hostname) for event in events]
        try:
            sock = self._connect()
            if self.protocol == "udp":
                for message in messages:
                    sock.send(message)
            else:
                sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
        except OSError as exc:
            self.close()
            self.dropped += len(messages)
            log.warning("audit: %d events not sent to syslog %s:%d/%s: %s", len(messages),
                        self.host, self.port, self.protocol, exc)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class AuditTrail(PeriodicFlush):
    """Buffers audit events and writes them in batches between :meth:`start` and
    :meth:`stop` (or at each :meth:`flush` when no thread runs)."""

    def __init__(self, store: Store | None, *, file: Path | None = None,
                 syslog: SyslogSender | None = None, flush_seconds: float = 2.0) -> None:
        self._store = store
        self._file = file
        self._syslog = syslog
        super().__init__(flush_seconds=flush_seconds, thread_name="audit-trail")
        self._lock = threading.Lock()
        self._lines: list[AuditEvent] = []  # for the file and the collector
        self._rows: list[AuditEvent] = []  # for the database
        self._flush_lock = threading.Lock()
        self.dropped = 0
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)

    # --- the hot paths ----------------------------------------------------------------

    def record(self, event: AuditEvent, *, stored: bool = True) -> None:
        """Audit one event; ``stored=False`` when the database holds it already (an operator
        action, written with its change): only the file and the collector get it."""
        with self._lock:
            self._lines.append(event)
            if stored:
                if len(self._rows) < MAX_PENDING:
                    self._rows.append(event)
                else:
                    self.dropped += 1

    # --- the writer -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the thread and write what is still buffered."""
        super().stop()
        if self._syslog is not None:
            self._syslog.close()

    def flush(self) -> int:
        """Write what is buffered now; returns how many events reached the database."""
        with self._flush_lock:
            with self._lock:
                lines, self._lines = self._lines, []
                rows, self._rows = self._rows, []
            self._write_lines(lines)
            if self._syslog is not None:
                self._syslog.send(lines)
            return self._write_rows(rows)

    def _write_lines(self, events: list[AuditEvent]) -> None:
        if self._file is None or not events:
            return
        text = "".join(json.dumps(e.as_json(), ensure_ascii=False, separators=(",", ":"))
                       + "\n" for e in events)
        try:
            # Opened for each batch: a log rotated meanwhile (logrotate) is followed.
            with self._file.open("a", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            log.error("audit: %d events not written to %s: %s", len(events), self._file, exc)

    def _write_rows(self, events: list[AuditEvent]) -> int:
        if self._store is None or not events:
            return 0
        try:
            self._store_events(events)
            return len(events)
        except Exception as exc:
            if _unavailable(exc):
                self._keep(events, exc)
                return 0
        # One of them can never be stored: each alone, so that it does not hold back the
        # others at every flush after it (a batch is kept whole only while the database is
        # unavailable).
        stored = 0
        for index, event in enumerate(events):
            try:
                self._store_events([event])
            except Exception as exc:
                if _unavailable(exc):
                    self._keep(events[index:], exc)
                    return stored
                with self._lock:
                    self.dropped += 1
                log.error("audit: an event could not be stored and is dropped (the audit file "
                          "and the collector, where configured, have it): %s %s: %s",
                          event.kind, event.actor, getattr(exc, "orig", None) or exc)
                continue
            stored += 1
        return stored

    def _store_events(self, events: list[AuditEvent]) -> None:
        assert self._store is not None
        with self._store.writing() as session:
            audit.write_events(session, events)

    def _keep(self, events: list[AuditEvent], exc: Exception) -> None:
        with self._lock:
            room = max(0, MAX_PENDING - len(self._rows))
            self.dropped += len(events) - min(room, len(events))
            self._rows[:0] = events[:room]
        log.warning("audit: %d events not stored (kept for the next try): %s",
                    len(events), getattr(exc, "orig", None) or exc)


def _unavailable(exc: Exception) -> bool:
    """The database, not the events: unreachable, locked, a table missing, no write slot."""
    return isinstance(exc, OperationalError | InterfaceError | SQLAlchemyTimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)
