"""Start the real ``worklist-broker serve`` process on free ports for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import free_port, listening, wait_for

REPO = Path(__file__).resolve().parents[2]


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    config_path: Path
    dicom_port: int
    hl7_port: int
    log_path: Path
    web_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"broker did not stop on SIGTERM within {timeout}s") from None


def write_config(directory: Path, *, database_url: str | None = None, ris_port: int | None = None,
                 outbound_interval: float = 0.2, mapping: str | None = None,
                 dicom: dict[str, object] | None = None,
                 hl7: dict[str, object] | None = None, web: dict[str, object] | None = None,
                 ris: dict[str, object] | None = None,
                 sections: dict[str, object] | None = None) -> tuple[Path, int, int, int]:
    dicom_port, hl7_port, web_port = free_port(), free_port(), free_port()
    config = {
        "database": {"url": database_url or f"sqlite:///{directory / 'worklist.db'}"},
        "dicom": {"ae_title": "WORKLISTS", "host": "127.0.0.1", "port": dicom_port,
                  **(dicom or {})},
        "hl7": {"host": "127.0.0.1", "port": hl7_port, **(hl7 or {})},
        "ris": {"enabled": ris_port is not None, "host": "127.0.0.1", "port": ris_port or 2576,
                "connect_timeout_seconds": 2, "ack_timeout_seconds": 5, **(ris or {})},
        "jobs": {"outbound_interval_seconds": outbound_interval, "mapping_check_seconds": 0.5},
        "mapping": mapping or str(REPO / "config" / "mapping.yaml"),
        # Every broker a test starts has its console on a free port of its own.
        "web": {"host": "127.0.0.1", "port": web_port, **(web or {})},
        **(sections or {}),  # further sections, e.g. orthanc
    }
    path = directory / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, dicom_port, hl7_port, web_port


def start_broker(directory: Path, *extra_args: str, **config: object) -> BrokerProcess:
    directory.mkdir(parents=True, exist_ok=True)
    config_path, dicom_port, hl7_port, web_port = write_config(
        directory, **config)  # type: ignore[arg-type]
    web: dict[str, object] = config.get("web") or {}  # type: ignore[assignment]
    # Waited for only when the console serves plain HTTP (a test of HTTPS waits itself).
    plain_web = bool(web.get("enabled", True)) and bool(
        (web.get("tls") or {}).get("plain_port", True))  # type: ignore[union-attr]
    return launch(directory, config_path, dicom_port, hl7_port, *extra_args,
                  web_port=web_port if plain_web else 0)


def launch(directory: Path, config_path: Path, dicom_port: int, hl7_port: int,
           *extra_args: str, web_port: int = 0) -> BrokerProcess:
    """``serve`` with a config file written by the caller, listening on these ports (and on
    ``web_port`` for the console, when given)."""
    log_path = directory / "broker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WLB_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--config", str(config_path),
             *extra_args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    broker = BrokerProcess(process, config_path, dicom_port, hl7_port, log_path, web_port)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"broker exited with {process.returncode}:\n{broker.log()}")
        return listening(dicom_port) and listening(hl7_port) and (
            not web_port or listening(web_port))

    try:
        wait_for(ready, timeout=30, what="the broker to listen")
    except BaseException:
        # A broker that never came up must not outlive the test (nor hold its ports).
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        raise
    return broker
