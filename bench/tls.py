"""TLS against plain, in one run: one real broker process listening on both kinds of port.

Prints, for the MLLP listener and the DICOM SCP, plain and TLS (mutual, BCP 195 defaults):
ACKed orders per second and ACK p50 on one connection; the time to connect (TCP + TLS
handshake); and the C-FIND poll p50 as a modality polls (a new association per poll, ~25
return keys, today's 40 CT items). Not a test: run it by hand,

    python bench/tls.py [--orders 2000] [--polls 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from bench.worklist import typical_poll  # noqa: E402
from hl7_listener.mllp import MllpClient  # noqa: E402
from tests.e2e.broker_process import start_broker  # noqa: E402
from tests.messages import orm  # noqa: E402
from tests.support import free_port, listening, wait_for  # noqa: E402
from tests.tls_certs import Pki, client_context, make_pki  # noqa: E402

TODAY = dt.date.today().strftime("%Y%m%d")
POLL_MATCHES = 40  # one CT room's day; the ingested orders are MR and stay out of the polls


def _ingest(port: int, orders: int, context: ssl.SSLContext | None,
            modality: str = "MR") -> tuple[float, float]:
    tag = uuid.uuid4().hex[:4].upper()
    messages = [orm(control_id=f"T{tag}{n}", patient_id=f"P{n % 5000}",
                    accession=f"T{tag}{n}"[-16:], placer=f"PL{tag}{n}", filler=f"FI{tag}{n}",
                    start=f"{TODAY}0930", modality=modality).encode()
                for n in range(orders)]
    latencies = []
    with MllpClient("127.0.0.1", port, tls=(lambda: context) if context else None,
                    server_name="localhost" if context else None) as client:
        client.send(messages[0])  # the connection (and handshake) before the clock starts
        started = time.perf_counter()
        for message in messages[1:]:
            sent = time.perf_counter()
            ack = client.send(message)
            latencies.append(time.perf_counter() - sent)
            if b"MSA|AA|" not in ack:
                raise SystemExit(f"not accepted: {ack!r}")
        elapsed = time.perf_counter() - started
    return (orders - 1) / elapsed, statistics.median(latencies) * 1000


def _connect(port: int, context: ssl.SSLContext | None, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            if context is not None:
                with context.wrap_socket(raw, server_hostname="localhost"):
                    times.append(time.perf_counter() - started)
            else:
                times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _poll(port: int, context: ssl.SSLContext | None) -> tuple[float, int]:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS",
                         tls_args=(context, "localhost") if context else None)
    if not assoc.is_established:
        raise SystemExit(f"association refused on port {port}")
    matches = 0
    for status, _ in assoc.send_c_find(typical_poll(), ModalityWorklistInformationFind):
        if status is not None and status.get("Status") in (0xFF00, 0xFF01):
            matches += 1
    assoc.release()
    return (time.perf_counter() - started) * 1000, matches


def _polls(port: int, context: ssl.SSLContext | None, count: int) -> tuple[float, float, int]:
    _poll(port, context)  # warm-up
    results = [_poll(port, context) for _ in range(count)]
    times = [seconds for seconds, _ in results]
    q = statistics.quantiles(times, n=20, method="inclusive")
    return q[9], q[18], results[-1][1]


def _tls(pki: Pki, port: int) -> dict[str, object]:
    return {"port": port, "certificate": str(pki.cert("server")),
            "private_key": str(pki.key("server")), "ca_certificates": str(pki.ca),
            "require_client_certificate": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki")
        dicom_tls, hl7_tls = free_port(), free_port()
        broker = start_broker(Path(tmp) / "broker", dicom={"tls": _tls(pki, dicom_tls)},
                              hl7={"tls": _tls(pki, hl7_tls),
                                   # 50 connects in a row: measured, not limited
                                   "max_connections_per_source": 0})
        wait_for(lambda: listening(dicom_tls) and listening(hl7_tls), what="the TLS ports")
        context = client_context(pki)
        rows = []
        try:
            # Warm-up (imports, pools, caches), and the day's CT list the polls return.
            _ingest(broker.hl7_port, POLL_MATCHES, None, modality="CT")
            for name, port, tls in (("plain", broker.hl7_port, None),
                                    ("TLS", hl7_tls, context)):
                rate, p50 = _ingest(port, args.orders, tls)
                connect = _connect(port, tls, 50)
                rows.append(("MLLP", name, f"{rate:.0f}", f"{p50:.2f}", f"{connect:.2f}", "",
                             ""))
            for name, port, tls in (("plain", broker.dicom_port, None),
                                    ("TLS", dicom_tls, context)):
                p50, p95, matches = _polls(port, tls, args.polls)
                connect = _connect(port, tls, 50)
                rows.append(("C-FIND", name, "", "", f"{connect:.2f}", f"{p50:.1f}",
                             f"{p95:.1f} ({matches} matches)"))
        finally:
            broker.stop()
    print(f"TLS against plain, one broker process; {args.orders} orders on one connection, "
          f"{args.polls} polls (new association each)")
    print(f"{'link':<7}{'port':<7}{'orders/s':>9}{'ACK p50 ms':>11}{'connect ms':>11}"
          f"{'poll p50 ms':>12}{'poll p95 ms':>12}")
    for link, name, rate, ack, connect, p50, p95 in rows:
        print(f"{link:<7}{name:<7}{rate:>9}{ack:>11}{connect:>11}{p50:>12}  {p95}")


if __name__ == "__main__":
    main()
