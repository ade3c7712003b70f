"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 2): <VT> payload <FS><CR>.

Framing only, no meaning: :func:`read_frame` for the asyncio listener, :class:`MllpClient` for the
``send`` command and the outbound sender. Neither ever buffers more than the caller's limit.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from types import TracebackType

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_FS = b"\x1c"


class FrameTooLarge(Exception):
    """A frame grew past the limit; ``head`` is its beginning (enough to read the MSH)."""

    def __init__(self, limit: int, head: bytes = b"") -> None:
        super().__init__(f"message exceeds {limit} bytes")
        self.limit = limit
        self.head = head


class FramingError(Exception):
    """A complete frame that breaks MLLP's rules (e.g. a stray <FS> inside the payload)."""


class MllpError(OSError):
    """Sending or receiving over MLLP failed; the connection is closed, the caller may retry."""


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK


async def _skip_to_start(reader: asyncio.StreamReader) -> bool:
    """Consume up to and including the next start block; False on EOF before one."""
    discarded = 0
    try:
        while True:
            try:
                data = await reader.readuntil(START_BLOCK)
                discarded += len(data) - 1
                return True
            except asyncio.LimitOverrunError as exc:
                # No start block within the reader's buffer limit: drop what was scanned.
                discarded += len(await reader.readexactly(exc.consumed))
    except asyncio.IncompleteReadError as exc:
        discarded += len(exc.partial)
        return False
    finally:
        if discarded:
            log.warning("discarded %d bytes received outside an MLLP frame", discarded)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """The next frame's payload, or None on a clean EOF between frames.

    Raises FrameTooLarge past ``max_bytes`` (the rest of the frame is left unread: close the
    connection), FramingError for a stray <FS> inside the payload (the frame was consumed, the
    stream is still in step) and asyncio.IncompleteReadError on EOF inside a frame. Memory is
    bounded by ``max_bytes`` plus the reader's own buffer limit.
    """
    if not await _skip_to_start(reader):
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            data = await reader.readuntil(END_BLOCK)
        except asyncio.LimitOverrunError as exc:
            # readuntil keeps back the last byte in case it starts the two-byte end block.
            data = await reader.readexactly(exc.consumed)
            size += len(data)
            chunks.append(data)
            if size > max_bytes:
                raise FrameTooLarge(max_bytes, b"".join(chunks)[:65536]) from None
            continue
        size += len(data) - len(END_BLOCK)
        chunks.append(data[:-len(END_BLOCK)])
        if size > max_bytes:
            raise FrameTooLarge(max_bytes, b"".join(chunks)[:65536])
        break
    payload = b"".join(chunks)
    restart = payload.rfind(START_BLOCK)
    if restart >= 0:
        # The sender abandoned a frame and started again (seen after sender-side timeouts):
        # the last start block begins the real message.
        log.warning("discarded %d bytes of an unterminated MLLP frame", restart + 1)
        payload = payload[restart + 1:]
    if _FS in payload:
        raise FramingError("an <FS> byte not followed by <CR> inside an MLLP frame")
    return payload


class MllpClient:
    """A blocking MLLP client that keeps its connection open across :meth:`send` calls.

    Every socket operation has a timeout (a hung peer must never stall a scheduler job). Any
    failure closes the connection and raises :class:`MllpError`; the next call reconnects.
    """

    def __init__(self, host: str, port: int, *, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, max_bytes: int = 1 << 20) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _peer_closed(self, sock: socket.socket) -> bool:
        # A listener that timed our idle connection out has closed its end; sending into it
        # would "succeed" and the reply would never come. Check before sending anything.
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _connection(self) -> socket.socket:
        if self._sock is not None and self._peer_closed(self._sock):
            log.debug("MLLP peer %s:%d closed the idle connection; reconnecting",
                      self.host, self.port)
            self.close()
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def send(self, message: bytes) -> bytes:
        """Frame and send one message, return the payload of the one framed reply."""
        try:
            sock = self._connection()
            sock.settimeout(self.read_timeout)
            sock.sendall(frame(message))
            return self._read_reply(sock)
        except (OSError, FramingError, FrameTooLarge) as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                reason = f"no reply within {self.read_timeout:g} s"
            else:
                reason = str(exc) or type(exc).__name__
            raise MllpError(f"MLLP {self.host}:{self.port}: {reason}") from exc

    def _read_reply(self, sock: socket.socket) -> bytes:
        deadline = time.monotonic() + self.read_timeout
        buffer = b""
        started = False
        while True:
            if not started:
                start = buffer.find(START_BLOCK)
                if start >= 0:
                    if start:
                        log.warning("discarded %d bytes received outside an MLLP frame", start)
                    buffer = buffer[start + 1:]
                    started = True
                else:
                    buffer = b""
            if started:
                end = buffer.find(END_BLOCK)
                if end >= 0:
                    payload = buffer[:end]
                    if len(buffer) > end + len(END_BLOCK):
                        log.warning("discarded %d bytes after the MLLP reply",
                                    len(buffer) - end - len(END_BLOCK))
                    return payload
                if len(buffer) > self.max_bytes + len(END_BLOCK):
                    raise FrameTooLarge(self.max_bytes)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the reply")
            buffer += chunk
