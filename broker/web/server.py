"""Run the console's ASGI app with uvicorn in a thread of the serve process."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

_START_SECONDS = 10.0


class WebServer:
    """uvicorn on its own thread and event loop, started and stopped by the composition
    root like the other listeners. The socket is bound here, before the thread starts, so a
    port in use fails ``start`` at once with OSError (as the DICOM and HL7 listeners do)."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

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
        log.info("console listening on http://%s:%d/", self._host, self.port)

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
        log.info("console stopped")
