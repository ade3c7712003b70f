"""The MLLP listener: owns the wire (connections, frames, limits, timeouts); a handler owns
what a message means.

It runs its own asyncio event loop in one thread. Database work never runs on that loop:
each message goes to a worker thread, and its ACK is written back when the handler returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from typing import Protocol

from broker import metrics
from hl7_listener.mllp import FrameTooLarge, FramingError, frame, read_frame

log = logging.getLogger(__name__)


class MessageHandler(Protocol):
    def handle(self, raw: bytes) -> bytes | None: ...

    def reject(self, reason: str, code: str = "100", raw: bytes = b"") -> bytes: ...


class MllpServer:
    def __init__(self, handler: MessageHandler, *, host: str, port: int, max_connections: int,
                 idle_timeout: float, max_message_bytes: int, max_waiting: int = 256,
                 wait_timeout: float = 60) -> None:
        self._handler = handler
        self._host = host
        self._port = port
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
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # SQLite has one writer at a time anyway; a few workers keep PostgreSQL busy enough
        # without letting a flood of connections open a flood of database sessions.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(max_connections, 8), thread_name_prefix="hl7-worker")

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return self._server.sockets[0].getsockname()[1]

    @property
    def running(self) -> bool:
        """Listening now (for /health)."""
        server = self._server
        return server is not None and server.is_serving()

    def start(self) -> None:
        """Listen, in a thread of its own; returns once listening, or raises OSError."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._connection, self._host, self._port,
                    limit=self._max_bytes + 64, reuse_address=True))
            except BaseException as exc:
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
        log.info("MLLP listener on %s:%d", self._host, self.port)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._slots.locked() and self._waiting >= self._max_waiting:
            log.warning("refused HL7 connection from %s: %d connections open and %d waiting",
                        peer, self._max_connections, self._waiting)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if await self._take_slot(peer):
                try:
                    log.debug("HL7 connection from %s", peer)
                    await self._serve(reader, writer, peer)
                finally:
                    self._slots.release()
        except (ConnectionError, OSError) as exc:
            log.warning("HL7 connection from %s lost: %s", peer, exc)
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _take_slot(self, peer: object) -> bool:
        """Wait for one of the max_connections slots; False when none freed up in time."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            return True
        if self._waiting == 0:
            log.info("all %d HL7 connection slots busy: new connections wait their turn (up "
                     "to %ss)", self._max_connections, self._wait_timeout)
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self._wait_timeout)
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
        while True:
            try:
                payload = await asyncio.wait_for(read_frame(reader, self._max_bytes),
                                                 self._idle_timeout)
            except TimeoutError:
                log.info("HL7 connection from %s idle for %ss, closed", peer,
                         self._idle_timeout)
                return
            except FrameTooLarge as exc:
                # The rest of the oversized frame cannot be told apart from a new one: answer,
                # then close so the sender starts clean.
                nak = await loop.run_in_executor(self._executor, self._handler.reject,
                                                 str(exc), "100", exc.head)
                writer.write(frame(nak))
                await writer.drain()
                return
            except FramingError as exc:
                log.warning("HL7 connection from %s: %s", peer, exc)
                return
            if payload is None:
                return
            received = time.perf_counter()
            ack = await loop.run_in_executor(self._executor, self._handler.handle, payload)
            metrics.HL7_ACK_SECONDS.observe(time.perf_counter() - received)
            if ack is not None:  # None: enhanced mode and the sender asked for no ACK
                writer.write(frame(ack))
                await writer.drain()

    def stop(self, timeout: float = 5) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            self._executor.shutdown(wait=False)
            return

        async def close_all() -> None:
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
