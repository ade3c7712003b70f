"""How fast can any server answer a pynetdicom modality? The floor under bench/worklist.py.

bench/worklist.py's 7-day range (117 matches at 10,000 items) times one association and one
C-FIND as a pynetdicom modality sees it. Part of that time is the modality's own: it reads,
decodes and queues every response whoever sends it. This script puts four servers side by
side, answering the same query with the same 117 identifiers (captured from the broker), one
association per query, interleaved, on the same machine:

- wlmscpfs: DCMTK's worklist SCP over the same items exported as .wl files;
- the broker: ``worklist-broker serve`` on a SQLite database of the items;
- pynetdicom, bare: an SCP with no database, no matching and no pacing that yields the
  captured identifiers, with the broker's socket options; what pynetdicom's public API
  costs per match and no more;
- no server work: pynetdicom negotiates the association, then every pending response, framed
  in advance, is written to the socket in one call; only the final status goes through
  pynetdicom. No server can do less; what remains is the modality's time and the network's.

    python bench/answer_floor.py [--items 10000] [--queries 20]

Not a test. Prints p50 and the CPU each side spent per query; the ratio column is what
issue 12 part 3 asks of the broker (wlmscpfs p50 / server p50, target 5x).
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.dsutils import decode, encode  # noqa: E402
from pynetdicom.events import Event  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from bench.worklist import cpu_seconds, query, side_by_side, week_range  # noqa: E402
from broker.dicom.scp import _on_conn_open  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

FIND = ModalityWorklistInformationFind


def capture(port: int) -> list[bytes]:
    """The broker's answers to the 7-day range, encoded as they came (implicit VR LE)."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established
    answers = [encode(ds, True, True) for status, ds in assoc.send_c_find(week_range(), FIND)
               if status is not None and status.Status in (0xFF00, 0xFF01)]
    assoc.release()
    return [a for a in answers if a is not None]


def _command(message_id: int, status: int, with_data: bool) -> bytes:
    """A C-FIND-RSP command set, implicit VR little endian (PS3.7 9.3.2.2)."""
    def element(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", group, elem, len(value)) + value

    uid = FIND.encode("ascii")
    uid += b"\0" * (len(uid) % 2)
    body = (element(0, 0x0002, uid) + element(0, 0x0100, struct.pack("<H", 0x8020))
            + element(0, 0x0120, struct.pack("<H", message_id))
            + element(0, 0x0800, struct.pack("<H", 0x0001 if with_data else 0x0101))
            + element(0, 0x0900, struct.pack("<H", status)))
    return element(0, 0x0000, struct.pack("<I", len(body))) + body


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5): control 0x03 last command fragment,
    0x02 last data fragment."""
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


class Server:
    """A pynetdicom SCP answering every C-FIND with the captured identifiers."""

    def __init__(self, answers: list[bytes], raw: bool, port: int) -> None:
        self.answers = answers
        self.datasets = [] if raw else [decode(io.BytesIO(a), True, True) for a in answers]
        self.raw = raw
        ae = AE(ae_title="WORKLISTS")
        ae.add_supported_context(FIND)
        ae.require_called_aet = False
        # The broker's socket options (TCP_NODELAY, TCP_QUICKACK), or both would wait on
        # delayed ACKs (~40 ms a query) and measure the network stack, not the servers.
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self.on_find),
                                                    (evt.EVT_CONN_OPEN, _on_conn_open)])

    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        if not self.raw:
            for ds in self.datasets:
                yield 0xFF00, ds
            return
        context = event.context.context_id
        command = _command(event.request.MessageID, 0xFF00, True)
        # Everything framed first, then written at once: no server does less per match.
        wire = b"".join(_p_data(context, 0x03, command) + _p_data(context, 0x02, answer)
                        for answer in self.answers)
        event.assoc.dul.socket.socket.sendall(wire)
        yield 0x0000, None


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(kind: str, port: int, answers_file: Path) -> None:
    """The child process: one of the two bare servers, until terminated."""
    blob = answers_file.read_bytes()
    answers, offset = [], 0
    while offset < len(blob):
        (length,) = struct.unpack_from("<I", blob, offset)
        answers.append(blob[offset + 4:offset + 4 + length])
        offset += 4 + length
    Server(answers, raw=kind == "raw", port=port)
    threading.Event().wait()


def start_server(kind: str, answers: list[bytes], tmp: Path) -> tuple[subprocess.Popen[bytes],
                                                                         int]:
    answers_file = tmp / "answers.bin"
    answers_file.write_bytes(b"".join(struct.pack("<I", len(a)) + a for a in answers))
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port),
                                "--answers", str(answers_file)])
    wait_for(lambda: query(port, week_range())[2] is None, timeout=30,
             what=f"the {kind} server to answer")
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--serve", choices=("bare", "raw"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answers", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.answers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        broker, wlm, wlm_port = side_by_side(Path(tmp), args.items)
        children = [wlm]
        try:
            answers = capture(broker.dicom_port)
            bare, bare_port = start_server("bare", answers, Path(tmp))
            children.append(bare)
            raw, raw_port = start_server("raw", answers, Path(tmp))
            children.append(raw)
            servers = [("wlmscpfs", wlm_port, wlm.pid),
                       ("broker", broker.dicom_port, broker.process.pid),
                       ("pynetdicom, bare", bare_port, bare.pid),
                       ("no server work", raw_port, raw.pid)]
            times: dict[str, list[float]] = {name: [] for name, _, _ in servers}
            client_cpu = {name: 0.0 for name, _, _ in servers}
            server_cpu = {name: 0.0 for name, _, _ in servers}
            matches: dict[str, int] = {}
            for _name, port, _ in servers:
                query(port, week_range())  # warm-up
            # Interleaved: whatever else the machine does weighs on all four alike.
            for _ in range(args.queries):
                for name, port, pid in servers:
                    before_client, before_server = self_cpu(), cpu_seconds(pid)
                    seconds, found, failure = query(port, week_range())
                    if failure is not None:
                        raise SystemExit(f"{name}: query failed with {failure}")
                    matches[name] = found
                    times[name].append(seconds * 1000)
                    client_cpu[name] += self_cpu() - before_client
                    server_cpu[name] += cpu_seconds(pid) - before_server
        finally:
            broker.stop()
            for child in children:
                child.terminate()
                child.wait(timeout=10)
    wlm_p50 = statistics.median(times["wlmscpfs"])
    print(f"7-day range at {args.items} items: {args.queries} queries to each, interleaved, "
          "one association per query, pynetdicom as the modality; ms per query")
    print(f"{'server':<18}{'matches':>8}{'p50':>8}{'min':>8}{'wlmscpfs/it':>12}"
          f"{'modality CPU':>13}{'server CPU':>11}")
    for name, _, _ in servers:
        p50 = statistics.median(times[name])
        print(f"{name:<18}{matches[name]:>8}{p50:>8.1f}{min(times[name]):>8.1f}"
              f"{wlm_p50 / p50:>11.1f}x{client_cpu[name] * 1000 / args.queries:>13.1f}"
              f"{server_cpu[name] * 1000 / args.queries:>11.1f}")


if __name__ == "__main__":
    main()
