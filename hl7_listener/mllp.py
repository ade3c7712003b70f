"""MLLP framing (start block 0x0B, end block 0x1C 0x0D), separate from what a message means.

Used alike by the listener (``read_frame`` over asyncio streams), the ``send`` command and the
outbound sender (``MllpClient``, blocking, with timeouts).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import ssl
from collections.abc import Callable
from types import TracebackType

from broker.tls import handshake_failure

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


class FrameTooLarge(Exception):
    """A frame longer than the configured limit; the connection cannot be resynchronised.

    ``head`` is the frame's start, so that the refusal can name the message (its MSH-10).
    """

    def __init__(self, reason: str, head: bytes = b"") -> None:
        super().__init__(reason)
        self.head = head


_HEAD_BYTES = 4096  # more than any MSH segment


class FramingError(Exception):
    """The peer broke the framing, e.g. closed the connection inside a frame."""


class FrameTimeout(FramingError):
    """A frame was started but not finished in time (a sender trickling its bytes)."""


class MllpError(OSError):
    """The peer could not be reached, or did not answer with a frame in time."""


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, *,
                     idle_timeout: float | None = None,
                     frame_timeout: float | None = None) -> bytes | None:
    """The next frame's payload, or None when the peer closed the connection between frames.

    The reader's own limit (set when the server is started) must exceed ``max_bytes``; bytes
    outside a frame are skipped and logged, never treated as a message, up to ``max_bytes``
    of them. Two clocks bound a connection's time: waiting for a start block lasts at most
    ``idle_timeout`` (``TimeoutError``), and a frame once started must end within
    ``frame_timeout`` (:class:`FrameTimeout`), however slowly its bytes trickle in.
    """
    async with asyncio.timeout(idle_timeout):
        started = await _frame_start(reader, max_bytes)
    if not started:
        return None
    try:
        async with asyncio.timeout(frame_timeout):
            return await _frame_body(reader, max_bytes)
    except TimeoutError:
        raise FrameTimeout(f"frame not complete within {frame_timeout}s") from None


async def _frame_start(reader: asyncio.StreamReader, max_bytes: int) -> bool:
    """Skip to the next start block; False when the peer closed the connection first."""
    skipped = 0
    while True:
        try:
            junk = await reader.readuntil(START_BLOCK)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                log.warning("discarded %d bytes after the last frame", len(exc.partial))
            return False
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            skipped += exc.consumed
            log.warning("discarded %d bytes outside a frame", exc.consumed)
        else:
            if len(junk) > 1 and junk[:-1].strip():
                log.warning("discarded %d bytes outside a frame", len(junk) - 1)
            return True
        if skipped > max_bytes:
            # Not an MLLP peer (or one that lost the start block for good): holding the
            # connection open would only let it stream without end.
            raise FramingError(f"more than {max_bytes} bytes without a start block")


async def _frame_body(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    try:
        body = await reader.readuntil(END_BLOCK)
    except asyncio.LimitOverrunError as exc:
        # Those bytes are already buffered: reading them back does not wait on the peer.
        head = await reader.readexactly(min(exc.consumed, _HEAD_BYTES))
        raise FrameTooLarge(f"message exceeds {max_bytes} bytes", head) from None
    except asyncio.IncompleteReadError as exc:
        raise FramingError(f"connection closed inside a frame after {len(exc.partial)} bytes"
                           ) from None
    payload = body[:-len(END_BLOCK)]
    if START_BLOCK in payload:
        # A start block inside a frame means the previous frame was cut short by the sender;
        # its remains are dropped rather than glued to the next message.
        cut = payload.rindex(START_BLOCK)
        log.warning("discarded a truncated frame of %d bytes", cut)
        payload = payload[cut + 1:]
    if len(payload) > max_bytes:
        raise FrameTooLarge(f"message exceeds {max_bytes} bytes", payload[:_HEAD_BYTES])
    return payload


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed (or wrote unasked-for bytes on) an idle connection."""
    try:
        # poll, not select: select fails for descriptors past 1024 (a busy broker).
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        readable = poller.poll(0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    if not isinstance(sock, ssl.SSLSocket):
        return True
    # Over TLS, readable may only mean records without data (a TLS 1.3 session ticket):
    # read without waiting to tell them from a close.
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        sock.recv(1)  # b"": closed; bytes: unasked for; either way start afresh
        return True
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


class MllpClient:
    """A blocking MLLP client that keeps its connection open between messages."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, max_bytes: int = 1 << 20,
                 tls: Callable[[], ssl.SSLContext] | None = None,
                 server_name: str | None = None) -> None:
        self.host = host
        self.port = port
        # Asked at every new connection: a context reloaded since (SIGHUP) applies.
        self._tls = tls
        self._server_name = server_name
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_bytes = max_bytes
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is not None and _closed_by_peer(self._sock):
            # The RIS closed the idle connection since the last message: reconnect before
            # sending, rather than lose a write into a dead socket and wait for a timeout.
            self.close()
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    # The handshake runs under the connect timeout.
                    sock = self._tls().wrap_socket(sock, server_hostname=self._server_name)
                except ssl.SSLError as exc:
                    sock.close()
                    raise MllpError(f"TLS handshake failed: {handshake_failure(exc)}"
                                    ) from None
                except OSError:
                    sock.close()
                    raise
            sock.settimeout(self._read_timeout)
            self._sock = sock
        return self._sock

    def _read_reply(self, sock: socket.socket) -> bytes:
        buffer = b""
        while END_BLOCK not in buffer:
            if len(buffer) > self._max_bytes + 2:
                raise MllpError(f"reply exceeds {self._max_bytes} bytes")
            chunk = sock.recv(65536)
            if not chunk:
                raise MllpError("connection closed before a complete reply")
            buffer += chunk
        start = buffer.find(START_BLOCK)
        end = buffer.index(END_BLOCK)
        if start < 0 or start > end:
            raise MllpError("reply is not an MLLP frame")
        return buffer[start + 1:end]

    def send(self, message: bytes) -> bytes:
        """Send one message and return the payload of the reply frame."""
        try:
            sock = self._connect()
            sock.sendall(frame(message))
            return self._read_reply(sock)
        except MllpError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise MllpError(reason) from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
