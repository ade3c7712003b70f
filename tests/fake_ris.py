"""A fake RIS for the tests: a real MLLP server on 127.0.0.1 that records what it receives.

It is written separately from hl7_listener's framing on purpose, so a framing bug in the
broker cannot hide behind the same bug in its test peer.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field

from tests.support import wait_for

SB, EB = b"\x0b", b"\x1c\x0d"


def field_of(message: str, segment: str, index: int) -> str:
    for line in message.replace("\n", "\r").split("\r"):
        parts = line.split("|")
        if parts[0] == segment:
            # MSH-1 is the field separator itself, so MSH fields are shifted by one.
            offset = index - 1 if segment == "MSH" else index
            return parts[offset] if offset < len(parts) else ""
    return ""


@dataclass
class FakeRis:
    """Answers each message with ``ack_code`` (AA by default) echoing MSH-10 in MSA-2.

    Misbehaviour on demand: ``ack_delay`` seconds before each ACK (a slow RIS), and
    ``cut_acks``: that many messages are answered with half an ACK frame and a hang-up (a
    connection dropped mid-ACK).
    """

    ack_code: str = "AA"
    ack_delay: float = 0.0
    cut_acks: int = 0
    received: list[str] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    # A server context: the RIS listens with TLS (handshake failures are counted).
    ssl_context: ssl.SSLContext | None = None
    tls_failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._drop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def drop_connections(self) -> None:
        """Hang up every open connection, as a RIS closing idle links does."""
        self._drop.set()

    def _connection(self, conn: socket.socket) -> None:
        if self.ssl_context is not None:
            conn.settimeout(5)
            try:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.tls_failures.append(str(exc))
                conn.close()
                return
        conn.settimeout(0.2)
        buffer = b""
        with self._lock:
            self.open_connections += 1
        try:
            self._converse(conn, buffer)
        finally:
            conn.close()
            with self._lock:
                self.open_connections -= 1
            if self.open_connections == 0:
                self._drop.clear()

    def _converse(self, conn: socket.socket, buffer: bytes) -> None:
        with conn:
            while not self._stop.is_set() and not self._drop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while SB in buffer and EB in buffer:
                    start = buffer.index(SB)
                    end = buffer.index(EB, start)
                    text = buffer[start + 1:end].decode("utf-8", errors="replace")
                    buffer = buffer[end + 2:]
                    with self._lock:
                        self.received.append(text)
                    control_id = field_of(text, "MSH", 10)
                    ack = (f"MSH|^~\\&|RIS||WORKLIST_BROKER||20261129120000||ACK^O01|R{control_id}"
                           f"|P|2.3.1\rMSA|{self.ack_code}|{control_id}|\r")
                    if self.ack_delay and self._stop.wait(self.ack_delay):
                        return
                    with self._lock:
                        cut = self.cut_acks > 0
                        self.cut_acks -= cut
                    try:
                        if cut:
                            conn.sendall(SB + ack.encode()[:20])
                            return
                        conn.sendall(SB + ack.encode() + EB)
                    except OSError:  # the broker gave up waiting and hung up first
                        return

    def wait_for_messages(self, count: int, timeout: float = 15.0) -> list[str]:
        wait_for(lambda: len(self.received) >= count, timeout,
                 what=f"{count} messages at the fake RIS (got {len(self.received)})")
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)
