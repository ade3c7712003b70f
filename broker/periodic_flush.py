"""A buffer written in batches by a thread of its own: the hot paths (C-FIND, HL7) only append
under a lock, and this thread calls ``flush`` every few seconds, and once more on ``stop``.
Shared by the C-FIND exposure recorder and the audit trail."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PeriodicFlush:
    """Subclasses implement ``flush`` (safe to call from any thread, at any time)."""

    def __init__(self, *, flush_seconds: float, thread_name: str) -> None:
        self._flush_seconds = flush_seconds
        self._thread_name = thread_name
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def flush(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write what is still buffered."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join(30)
        self.flush()

    def _run(self) -> None:
        while not self._stopping.wait(self._flush_seconds):
            try:
                self.flush()
            except Exception:  # never let the thread die: the next flush tries again
                log.exception("%s: flush failed", self._thread_name)
