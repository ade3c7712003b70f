"""Run the console's ASGI app with uvicorn in a thread of the serve process."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

from broker.tls import ContextSource

log = logging.getLogger(__name__)

_START_SECONDS = 10.0


class _Uvicorn:
    """One uvicorn server on its own thread, event loop and pre-bound socket."""

    def __init__(self, app: FastAPI, host: str, port: int,
                 ssl_context: ssl.SSLContext | None) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{self._host}:{self.port}/"

    @property
    def port(self) -> int:
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self._port

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.started and not self._server.should_exit

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections (Linux): a response's head and body leave at
        # once, instead of the body waiting ~40 ms for the client's delayed ACK (measured:
        # every small page and /metrics took 44 ms over a keep-alive connection).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(self._app, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=3,
                                # Slow clients must not hold connections forever.
                                timeout_keep_alive=5, limit_concurrency=200)
        config.load()
        # The broker's own context (broker/tls.py: its ciphers, client certificates), not
        # one uvicorn would build from file names.
        config.ssl = self._ssl
        self._server = uvicorn.Server(config)
        # Signals belong to the main thread (worklist-broker serve's loop).
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_SECONDS
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise OSError("the web server did not start within "
                              f"{_START_SECONDS:.0f} s")
            time.sleep(0.01)
        if not self._thread.is_alive():
            raise OSError("the web server stopped at start-up")
        log.info("console listening on %s", self.url)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(5)
        self._server = self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class WebServer:
    """The console on HTTP, HTTPS (``web.tls``) or both, started and stopped by the
    composition root like the other listeners. Each socket is bound before its thread starts,
    so a port in use fails ``start`` at once with OSError (as the DICOM and HL7 listeners
    do)."""

    def __init__(self, app: FastAPI, *, host: str, port: int, plain: bool = True,
                 tls_port: int | None = None, tls: ContextSource | None = None) -> None:
        self._app = app
        self._host = host
        self._plain = _Uvicorn(app, host, port, None) if plain else None
        self._tls_port = tls_port
        self._tls = tls
        self._secure: _Uvicorn | None = None

    def _new_secure(self) -> _Uvicorn | None:
        if self._tls is None or self._tls_port is None:
            return None
        return _Uvicorn(self._app, self._host, self._tls_port, self._tls.context)

    @property
    def port(self) -> int:
        """The plain port, else the TLS one."""
        if self._plain is not None:
            return self._plain.port
        return self._secure.port if self._secure is not None else self._tls_port or 0

    @property
    def tls_port(self) -> int | None:
        return self._secure.port if self._secure is not None else self._tls_port

    @property
    def urls(self) -> list[str]:
        return [server.url for server in (self._plain, self._secure) if server is not None]

    @property
    def running(self) -> bool:
        servers = [server for server in (self._plain, self._secure) if server is not None]
        return bool(servers) and all(server.running for server in servers)

    def start(self) -> None:
        if self._plain is not None:
            self._plain.start()
        self._secure = self._new_secure()
        if self._secure is not None:
            try:
                self._secure.start()
            except OSError:
                if self._plain is not None:
                    self._plain.stop()
                raise

    def restart_tls(self) -> None:
        """Serve HTTPS with the certificates as they are now (after a reload: uvicorn keeps
        the context it started with, so its server starts again; HTTP is not touched)."""
        if self._secure is None:
            return
        self._secure.stop()
        self._secure = self._new_secure()
        if self._secure is not None:
            self._secure.start()

    def stop(self) -> None:
        for server in (self._secure, self._plain):
            if server is not None:
                server.stop()
        log.info("console stopped")
