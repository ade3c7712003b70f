"""Worklist benchmark: the broker against DCMTK's wlmscpfs, same items, side by side.

For each size the database grows the way a site's does, by history: about 100 orders a day
across modalities, going back size/100 days, so the typical poll (one modality, today) finds
the same few dozen items at every size. The same items are exported as .wl files for
wlmscpfs. Each query is one association, as a modality does it (pynetdicom as the modality),
and the two servers' queries are taken in turn (medians of 20 interleaved runs, as issue 12
measured).

    python bench/worklist.py [--sizes 1000,10000,100000] [--queries 20] [--burst-seconds 30]

Not a test. Prints p50/p95 per query kind and size, the ratio to wlmscpfs, and a 40-modality
burst against the broker (refused associations, failure statuses, queries/s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from broker.dicom.wl_files import export_worklist  # noqa: E402
from broker.models import Patient, WorklistItem  # noqa: E402
from broker.store import Store  # noqa: E402
from tests.e2e.broker_process import BrokerProcess, start_broker  # noqa: E402
from tests.support import dcmtk, free_port, wait_for  # noqa: E402

# The modality here is the harness, not what is measured: pynetdicom formats every response
# identifier for its debug log, read or not (about 0.4 ms a response, in the modality's
# process), which no modality's own software does. Both servers are measured with it off.
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

MODALITIES = ("CT", "MR", "US", "CR", "DX", "MG")
TODAY = dt.date.today()


def fill(store: Store, size: int) -> None:
    with store.writing() as s:
        s.execute(insert(Patient), [{"patient_id": f"P{n}", "patient_name": f"NAME{n:05d}^A",
                                     "sex": "MF"[n % 2]} for n in range(5000)])
        ids = dict(s.execute(text("select patient_id, id from patient")).all())
    days = max(size // 100, 1)
    rows = []
    for n in range(size):
        day = TODAY - dt.timedelta(days=days - 1 - n // 100)
        rows.append({
            "patient_fk": ids[f"P{n % 5000}"], "accession_number": f"ACC{n:07d}",
            "study_instance_uid": f"1.2.826.0.1.3680043.10.1491.9.{n}",
            "modality": MODALITIES[n % len(MODALITIES)],
            "scheduled_station_ae_title": f"{MODALITIES[n % len(MODALITIES)]}_ROOM1",
            "scheduled_start": dt.datetime.combine(day, dt.time(7 + (n % 100) // 10,
                                                                (n % 10) * 5)),
            "requested_procedure_id": f"RP{n}", "requested_procedure_description": "EXAM",
            "sps_id": f"SPS{n}", "sps_description": "EXAM", "status": "SCHEDULED",
            "referring_physician_name": "HOUSE^GREGORY",
        })
    for start in range(0, len(rows), 20_000):
        with store.writing() as s:
            s.execute(insert(WorklistItem), rows[start:start + 20_000])


def typical_poll() -> Dataset:
    """One modality's poll for today, asking ~25 return keys, as real modalities do."""
    ds = Dataset()
    for keyword in ("AccessionNumber", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "PatientWeight", "StudyInstanceUID", "RequestedProcedureID",
                    "RequestedProcedureDescription", "RequestingPhysician",
                    "ReferringPhysicianName", "AdmissionID", "MedicalAlerts",
                    "Allergies", "PregnancyStatus", "RequestedProcedurePriority",
                    "PatientTransportArrangements", "OtherPatientIDs"):
        setattr(ds, keyword, "")
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledProcedureStepStartDate = TODAY.strftime("%Y%m%d")
    for keyword in ("ScheduledStationAETitle", "ScheduledProcedureStepStartTime",
                    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
                    "ScheduledProcedureStepID", "ScheduledStationName",
                    "ScheduledProcedureStepLocation"):
        setattr(step, keyword, "")
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def selective(size: int) -> Dataset:
    ds = Dataset()
    ds.AccessionNumber = f"ACC{size // 2:07d}"
    ds.PatientName = ""
    ds.ScheduledProcedureStepSequence = [Dataset()]
    return ds


def week_range() -> Dataset:
    ds = typical_poll()
    start = (TODAY - dt.timedelta(days=6)).strftime("%Y%m%d")
    ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate = (
        f"{start}-{TODAY.strftime('%Y%m%d')}")
    return ds


def name_wildcard() -> Dataset:
    ds = Dataset()
    ds.PatientName = "NAME0012*"
    ds.AccessionNumber = ""
    ds.PatientID = ""
    ds.ScheduledProcedureStepSequence = [Dataset()]
    ds.ScheduledProcedureStepSequence[0].Modality = ""
    return ds


def query(port: int, identifier: Dataset) -> tuple[float, int, int | None]:
    """One association, one C-FIND; (seconds, matches, failure status or None)."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    if not assoc.is_established:
        return time.perf_counter() - started, 0, -1
    matches, failure = 0, None
    for status, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
        if status is None or "Status" not in status:
            failure = -2
        elif status.Status in (0xFF00, 0xFF01):
            matches += 1
        elif status.Status != 0:
            failure = int(status.Status)
    assoc.release()
    return time.perf_counter() - started, matches, failure


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads: what a query cost the server,
    whatever the machine's load does to the wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, and those of children waited for (a server forking per association).
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def measure(port: int, make: Callable[[], Dataset], count: int, pid: int | None = None
            ) -> tuple[float, float, int, float]:
    """p50, p95 (ms), matches, and the server's CPU ms per query (nan without ``pid``)."""
    query(port, make())  # warm-up
    times, matches = [], 0
    cpu_before = cpu_seconds(pid) if pid else 0.0
    for _ in range(count):
        seconds, matches, failure = query(port, make())
        if failure is not None:
            raise SystemExit(f"query failed with {failure:#x} on port {port}")
        times.append(seconds * 1000)
    cpu = (cpu_seconds(pid) - cpu_before) * 1000 / count if pid else float("nan")
    q = statistics.quantiles(times, n=20, method="inclusive")
    return q[9], q[18], matches, cpu


def measure_interleaved(servers: list[tuple[int, int, int]], make: Callable[[], Dataset]
                        ) -> list[tuple[float, float, int, float]]:
    """:func:`measure` for several servers, (port, pid, queries) each, their queries taken in
    turn, as the issue measured: whatever else the machine does weighs on all alike, and no
    server's background work (a flush after a query) lands on its own next query."""
    for port, _, _ in servers:
        query(port, make())  # warm-up
    times: list[list[float]] = [[] for _ in servers]
    matches = [0] * len(servers)
    cpu_before = [cpu_seconds(pid) for _, pid, _ in servers]
    for turn in range(max(count for _, _, count in servers)):
        for n, (port, _, count) in enumerate(servers):
            if turn >= count:
                continue
            seconds, matches[n], failure = query(port, make())
            if failure is not None:
                raise SystemExit(f"query failed with {failure:#x} on port {port}")
            times[n].append(seconds * 1000)
    results = []
    for n, (_, pid, count) in enumerate(servers):
        q = statistics.quantiles(times[n], n=20, method="inclusive")
        results.append((q[9], q[18], matches[n], (cpu_seconds(pid) - cpu_before[n]) * 1000 / count))
    return results


def burst(port: int, seconds: float, modalities: int = 40) -> tuple[int, int, int, float]:
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "refused": 0, "failed": 0}
    lock = threading.Lock()

    def modality() -> None:
        for _ in range(100_000):
            if time.monotonic() > stop:
                return
            _, _, failure = query(port, typical_poll())
            with lock:
                key = "ok" if failure is None else ("refused" if failure == -1 else "failed")
                counts[key] += 1

    threads = [threading.Thread(target=modality) for _ in range(modalities)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return counts["ok"], counts["refused"], counts["failed"], counts["ok"] / elapsed


def start_wlmscpfs(files: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([dcmtk("wlmscpfs"), "-dfp", str(files), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: query(port, selective(2))[2] in (None, 0), timeout=20,
             what="wlmscpfs to answer")
    return process, port


def side_by_side(tmp: Path, size: int) -> tuple[BrokerProcess, subprocess.Popen[bytes], int]:
    """``size`` items in a broker on SQLite and, exported as .wl files, in wlmscpfs; both
    started (the broker's port is on it, wlmscpfs's returned)."""
    db = tmp / "worklist.db"
    store = Store(f"sqlite:///{db}")
    store.create_schema()
    fill(store, size)
    files = tmp / "wlfiles"
    export_worklist(store, files / "WORKLISTS")
    (files / "WORKLISTS" / "lockfile").touch()
    store.dispose()
    broker = start_broker(tmp / "broker", database_url=f"sqlite:///{db}")
    try:
        wlm, wlm_port = start_wlmscpfs(files)
    except BaseException:
        broker.stop()
        raise
    return broker, wlm, wlm_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--burst-seconds", type=float, default=30)
    args = parser.parse_args()
    kinds: list[tuple[str, Callable[[int], Callable[[], Dataset]]]] = [
        ("selective", lambda size: lambda: selective(size)),
        ("typical poll", lambda size: typical_poll),
        ("7-day range", lambda size: week_range),
        ("name wildcard", lambda size: name_wildcard),
    ]
    table = []
    burst_row = None
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            broker, wlm, wlm_port = side_by_side(Path(tmp), size)
            try:
                for name, make in kinds:
                    (b50, b95, bm, bcpu), (w50, w95, wm, wcpu) = measure_interleaved(
                        [(broker.dicom_port, broker.process.pid, args.queries),
                         (wlm_port, wlm.pid, args.queries)], make(size))
                    table.append((size, name, bm, b50, b95, wm, w50, w95, bcpu, wcpu))
                    # As measured too: a long run that fails later keeps what it has.
                    print(f"  {size} {name}: broker p50 {b50:.1f} ms, wlmscpfs p50 "
                          f"{w50:.1f} ms", flush=True)
                if size == 10_000 or burst_row is None:
                    burst_row = (size, *burst(broker.dicom_port, args.burst_seconds))
            finally:
                broker.stop()
                wlm.terminate()
                wlm.wait(timeout=10)
    print(f"{'items':>7} {'query':<14}{'matches':>8}{'broker p50':>11}{'p95':>8}"
          f"{'wlmscpfs p50':>13}{'p95':>8}{'wlm/broker':>11}{'CPU broker':>11}{'wlmscpfs':>9}"
          "   (ms; CPU: the server process's per query)")
    for size, name, bm, b50, b95, wm, w50, w95, bcpu, wcpu in table:
        flag = "" if bm == wm else f"  (wlmscpfs matched {wm})"
        print(f"{size:>7} {name:<14}{bm:>8}{b50:>11.1f}{b95:>8.1f}{w50:>13.1f}{w95:>8.1f}"
              f"{w50 / b50:>10.1f}x{bcpu:>11.1f}{wcpu:>9.1f}{flag}")
    by_kind = {(row[0], row[1]): row for row in table}
    for size in sorted({row[0] for row in table}):
        poll, week = by_kind.get((size, "typical poll")), by_kind.get((size, "7-day range"))
        if poll and week and week[2] > poll[2]:
            extra = week[2] - poll[2]
            print(f"broker's own cost per match at {size} items: "
                  f"{(week[3] - poll[3]) / extra:.2f} ms wall (p50s), "
                  f"{(week[8] - poll[8]) / extra:.2f} ms CPU")
    sizes = sorted({row[0] for row in table})
    if len(sizes) > 1:
        p50 = {(row[0], row[1]): row[3] for row in table}
        for name in ("selective", "typical poll"):
            growth = p50[(sizes[-1], name)] / p50[(sizes[0], name)]
            print(f"broker {name} p50 from {sizes[0]} to {sizes[-1]} items: x{growth:.2f} "
                  "(target < 1.5)")
    if burst_row:
        size, ok, refused, failed, rate = burst_row
        print(f"\n40 modalities polling for {args.burst_seconds:.0f} s against the broker at "
              f"{size} items: {ok} answered, {refused} refused associations, {failed} "
              f"failure statuses, {rate:.0f} queries/s")
    os.environ.pop("WLB_BENCH", None)


if __name__ == "__main__":
    main()
