"""The MLLP listener: owns the wire (connections, frames, limits, timeouts); a handler owns
what a message means.

It runs its own asyncio event loop in one thread. Database work never runs on that loop:
each message goes to a worker thread, and its ACK is written back when the handler returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from broker import metrics
from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.tls import ContextSource, format_subject, handshake_failure, subject_of
from hl7_listener.mllp import FrameTimeout, FrameTooLarge, FramingError, frame, read_frame

log = logging.getLogger(__name__)

_REFUSAL_LOG_SECONDS = 10.0


class MessageHandler(Protocol):
    # ``peer``: who sent it, for the audit trail (address, and certificate subject on TLS).
    def handle(self, raw: bytes, peer: Peer | None = None) -> bytes | None: ...

    def reject(self, reason: str, code: str = "100", raw: bytes = b"",
               peer: Peer | None = None) -> bytes: ...


class Peer(NamedTuple):
    address: str  # host:port
    tls_subject: str | None = None  # None: not TLS; "none": TLS without a certificate


def _address(peer: object) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _peer_of(writer: asyncio.StreamWriter, peer: object) -> Peer:
    address = _address(peer)
    if writer.get_extra_info("ssl_object") is None:
        return Peer(address)
    return Peer(address, format_subject(subject_of(writer.get_extra_info("peercert"))) or "none")


class MllpServer:
    def __init__(self, handler: MessageHandler, *, host: str, port: int, max_connections: int,
                 idle_timeout: float, max_message_bytes: int, max_waiting: int = 256,
                 wait_timeout: float = 60, frame_timeout: float = 30,
                 max_per_source: int = 0, unlimited_sources: Sequence[str] = (),
                 plain: bool = True, tls: ContextSource | None = None, tls_port: int = 0,
                 handshake_timeout: float = 10, audit: AuditTrail | None = None) -> None:
        if not plain and tls is None:
            raise ValueError("a listener needs a plain port, a TLS port or both")
        self._handler = handler
        self._audit = audit  # failed TLS handshakes (messages are the handler's to audit)
        self._host = host
        self._port = port
        self._plain = plain
        self._tls = tls
        self._tls_port = tls_port
        self._handshake_timeout = handshake_timeout
        self._frame_timeout = frame_timeout
        # Connections served at once per source address (as many again may wait): one
        # misbehaving client (1,000 idle connections) must leave slots for the RIS.
        self._max_per_source = max_per_source
        self._unlimited = tuple(ipaddress.ip_network(net, strict=False)
                                for net in unlimited_sources)
        self._per_source: Counter[str] = Counter()  # connections open (served or waiting)
        self._by_source: dict[str, asyncio.Semaphore] = {}  # slots per address
        # Address -> (when a refusal was last logged, refusals not logged since).
        self._refusals: dict[str, tuple[float, int]] = {}
        self._max_connections = max_connections
        # Connections past max_connections wait their turn (an interface engine reconnecting
        # all its channels at once); only past max_waiting is one closed unanswered.
        self._slots = asyncio.Semaphore(max_connections)
        self._max_waiting = max_waiting
        self._waiting = 0
        self._wait_timeout = wait_timeout
        self._idle_timeout = idle_timeout
        self._max_bytes = max_message_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None  # the plain port
        self._tls_server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # SQLite has one writer at a time anyway; a few workers keep PostgreSQL busy enough
        # without letting a flood of connections open a flood of database sessions.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(max_connections, 8), thread_name_prefix="hl7-worker")

    @property
    def port(self) -> int:
        """The plain port (the bound one when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return self._server.sockets[0].getsockname()[1]

    @property
    def running(self) -> bool:
        """Listening now, on every port it was given (for /health)."""
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        return bool(servers) and all(s.is_serving() for s in servers)

    @property
    def tls_port(self) -> int | None:
        if self._tls is None:
            return None
        if self._tls_server is None or not self._tls_server.sockets:
            return self._tls_port
        return self._tls_server.sockets[0].getsockname()[1]

    def start(self) -> None:
        """Listen, in a thread of its own; returns once listening, or raises OSError."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                if self._plain:
                    self._server = loop.run_until_complete(asyncio.start_server(
                        self._connection, self._host, self._port,
                        limit=self._max_bytes + 64, reuse_address=True))
                if self._tls is not None:
                    # Accepted as plain TCP and upgraded per connection: the per-source
                    # limit comes before the handshake, and each handshake uses the context
                    # in use at that moment (reloaded on SIGHUP).
                    self._tls_server = loop.run_until_complete(asyncio.start_server(
                        functools.partial(self._connection, tls=True), self._host,
                        self._tls_port, limit=self._max_bytes + 64, reuse_address=True))
            except BaseException as exc:
                for server in (self._server, self._tls_server):
                    if server is not None:
                        server.close()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="mllp-listener", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure:
            self._thread.join(timeout=5)
            raise failure[0]
        if self._plain:
            log.info("MLLP listener on %s:%d", self._host, self.port)
        if self._tls is not None:
            log.info("MLLP listener (TLS) on %s:%d", self._host, self.tls_port)

    def _source_limit(self, address: str) -> int:
        """Connections this address may have served at once (0: no limit of its own)."""
        if not self._max_per_source:
            return 0
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return self._max_per_source
        return 0 if any(ip in net for net in self._unlimited) else self._max_per_source

    def _refused(self, address: str, reason: str) -> None:
        """Log a refused connection, at most once per address every _REFUSAL_LOG_SECONDS: a
        flood of a thousand connections must not become a thousand log lines."""
        now = asyncio.get_running_loop().time()
        last, since = self._refusals.get(address, (None, 0))
        if last is not None and now - last < _REFUSAL_LOG_SECONDS:
            self._refusals[address] = (last, since + 1)
            return
        if len(self._refusals) > 10_000:  # many addresses: forget the quiet ones
            self._refusals = {a: v for a, v in self._refusals.items()
                              if now - v[0] < _REFUSAL_LOG_SECONDS}
        self._refusals[address] = (now, 0)
        more = f" ({since} more refused since the last report)" if since else ""
        log.warning("refused HL7 connection from %s: %s%s", address, reason, more)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, tls: bool = False) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        limit = self._source_limit(address)
        # As many again as an address may have served may wait for their turn (a RIS engine
        # reconnecting all its channels); past that, the address is flooding.
        if limit and self._per_source[address] >= 2 * limit:
            self._refused(address, f"{self._per_source[address]} connections from that "
                          "address already")
            writer.close()
            return
        if self._slots.locked() and self._waiting >= self._max_waiting:
            self._refused(address, f"{self._max_connections} connections open and "
                          f"{self._waiting} waiting")
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._per_source[address] += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if tls and not await self._handshake(writer, peer):
                return
            source = self._source_slots(address, limit)
            if await self._take_slot(peer, source):
                try:
                    log.debug("HL7 connection from %s", peer)
                    await self._serve(reader, writer, peer)
                finally:
                    self._slots.release()
                    if source is not None:
                        source.release()
        except (ConnectionError, OSError) as exc:
            log.warning("HL7 connection from %s lost: %s", peer, exc)
        finally:
            self._per_source[address] -= 1
            if self._per_source[address] <= 0:
                # Nobody from there holds or waits for its semaphore any more.
                del self._per_source[address]
                self._by_source.pop(address, None)
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _handshake(self, writer: asyncio.StreamWriter, peer: object) -> bool:
        """Upgrade to TLS with the context in use now; False (logged) when it fails."""
        assert self._tls is not None
        try:
            await writer.start_tls(self._tls.context,
                                   ssl_handshake_timeout=self._handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = handshake_failure(exc)
            log.warning("HL7 TLS handshake with %s failed: %s", peer, reason)
            if self._audit is not None:
                self._audit.record(AuditEvent(Kind.TLS_FAILED, "", "refused",
                                              address=_address(peer),
                                              detail={"link": "hl7", "reason": reason}))
            return False
        subject = format_subject(subject_of(writer.get_extra_info("peercert")))
        log.info("HL7 TLS connection from %s: %s, client certificate %s", peer,
                 writer.get_extra_info("cipher", ("?",))[0], subject or "none")
        return True

    def _source_slots(self, address: str, limit: int) -> asyncio.Semaphore | None:
        if not limit:
            return None
        if address not in self._by_source:
            self._by_source[address] = asyncio.Semaphore(limit)
        return self._by_source[address]

    async def _take_slot(self, peer: object, source: asyncio.Semaphore | None) -> bool:
        """Wait for one of the address's slots (``source``), then one of the max_connections
        slots; False when they did not free up within the wait time."""
        if (source is None or not source.locked()) and not self._slots.locked():
            if source is not None:
                await source.acquire()  # free: returns at once
            await self._slots.acquire()
            return True
        if self._slots.locked() and self._waiting == 0:
            log.info("all %d HL7 connection slots busy: new connections wait their turn (up "
                     "to %ss)", self._max_connections, self._wait_timeout)
        self._waiting += 1
        try:
            async with asyncio.timeout(self._wait_timeout):
                if source is not None:
                    await source.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    if source is not None:
                        source.release()
                    raise
            return True
        except TimeoutError:
            log.warning("HL7 connection from %s waited %ss for a free slot and was closed",
                        peer, self._wait_timeout)
            return False
        finally:
            self._waiting -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: object) -> None:
        loop = asyncio.get_running_loop()
        sender = _peer_of(writer, peer)
        while True:
            try:
                payload = await read_frame(reader, self._max_bytes,
                                           idle_timeout=self._idle_timeout,
                                           frame_timeout=self._frame_timeout)
            except TimeoutError:
                log.info("HL7 connection from %s idle for %ss, closed", peer,
                         self._idle_timeout)
                return
            except FrameTimeout as exc:
                # Nothing of the message can be trusted yet, so no NAK: the sender resends.
                log.warning("HL7 connection from %s: %s, closed", peer, exc)
                return
            except FrameTooLarge as exc:
                # The rest of the oversized frame cannot be told apart from a new one: answer,
                # then close so the sender starts clean.
                nak = await loop.run_in_executor(self._executor, functools.partial(
                    self._handler.reject, str(exc), "100", exc.head, peer=sender))
                writer.write(frame(nak))
                await writer.drain()
                return
            except FramingError as exc:
                log.warning("HL7 connection from %s: %s", peer, exc)
                return
            if payload is None:
                return
            received = time.perf_counter()
            ack = await loop.run_in_executor(
                self._executor, functools.partial(self._handler.handle, payload, peer=sender))
            metrics.HL7_ACK_SECONDS.observe(time.perf_counter() - received)
            if ack is not None:  # None: enhanced mode and the sender asked for no ACK
                writer.write(frame(ack))
                await writer.drain()

    def stop(self, timeout: float = 5) -> None:
        loop = self._loop
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        if loop is None or not servers or self._thread is None:
            self._executor.shutdown(wait=False)
            return

        async def close_all() -> None:
            for server in servers:
                server.close()
            for writer in list(self._writers):
                writer.close()
            if self._tasks:
                # A handler busy in a worker thread finishes its message and commit first.
                await asyncio.wait(list(self._tasks), timeout=timeout)

        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(close_all(), loop)
            try:
                future.result(timeout + 1)
            except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                log.warning("MLLP listener did not close cleanly: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        # Messages already handed to a worker finish (and commit) before the process exits.
        self._executor.shutdown(wait=True)
        log.info("MLLP listener stopped")
