"""Log set-up for the command line: one line per event, the standard logging module."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    if level != "DEBUG":
        # pynetdicom logs every PDU at INFO; an administrator wants the broker's own lines.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
