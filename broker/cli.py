"""The ``worklist-broker`` command: serve, purge, and the administrator's tools.

Every failure ends as one line on stderr and a non-zero exit status: 2 for an invalid
configuration or invocation, 1 for anything else that went wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from broker import __version__
from broker.config import BrokerConfig, load_config
from broker.errors import BrokerError, ConfigError
from broker.logs import configure_logging
from broker.models import OUTBOX_STATES
from broker.store import Store, open_store

log = logging.getLogger("broker.cli")

EXIT_FAILURE = 1
EXIT_CONFIG = 2


class CommandError(Exception):
    """A failure to report as one line with exit status 1."""


def _config(args: argparse.Namespace) -> BrokerConfig:
    from broker.orthanc.config_file import apply_orthanc_config

    config = apply_orthanc_config(load_config(args.config))
    configure_logging(config.logging.level)
    return config


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[tuple[BrokerConfig, Store]]:
    """The configuration and an open store for one administrator command."""
    config = _config(args)
    # Not through broker.app: importing the console, the DICOM server and the HL7 listener
    # took 1.4 s of a 1.8 s command.
    store = open_store(config.database.url, pool_size=config.database.pool_size)
    try:
        yield config, store
    finally:
        store.dispose()


def _serve(args: argparse.Namespace) -> int:
    from broker.app import Broker

    config = _config(args)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    broker = Broker(config)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: broker.reload_mapping())
    # SIGHUP also re-reads the TLS certificates (renewed ones apply to new connections).
    previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, lambda signum, frame: (
        previous(signum, frame) if callable(previous) else None, broker.reload_tls()))
    try:
        broker.start()
    except OSError as exc:
        broker.stop()
        raise CommandError(f"cannot listen: {exc}") from None
    try:
        if args.load_samples:
            candidates = [Path(args.samples_dir)] if args.samples_dir else [
                config.base_dir.parent / "sample_messages", Path.cwd() / "sample_messages"]
            samples = next((c for c in candidates if c.is_dir()), candidates[0])
            if not samples.is_dir():
                raise CommandError(f"no sample messages folder at {samples}")
            broker.load_samples(samples)
        # Everything made so far lives as long as the process: out of the garbage collector's
        # sight, so that its full collections, which stop every thread, walk only what came
        # since (measured: 107-126 ms stops, and C-FINDs above 100 ms, without this).
        gc.collect()
        gc.freeze()
        # Signals only interrupt the main thread: wait here, in bounded slices.
        while not stop.wait(1.0):
            pass
    finally:
        broker.stop()
    return 0


def _purge(args: argparse.Namespace) -> int:
    from broker.purge import purge

    with _store(args) as (config, store):
        result = purge(store, retention=config.jobs.retention_with(config.audit),
                       dry_run=args.dry_run)
    if result.skipped:
        print("error: another broker or purge command is purging this database now; "
              "nothing deleted", file=sys.stderr)
        return EXIT_FAILURE
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb}: {result.summary()}")
    return 0


@dataclass(frozen=True, slots=True)
class _Queue:
    """A delivery queue as the list / retry / drop commands see it (outbox, mpps-forward)."""

    command: str
    noun: str  # what one row is called in errors ("outbox message")
    item: str  # ...and in confirmations ("message")
    header: str
    line: Callable[[Any], str]
    list_rows: Callable[[Session, str | None, int], Sequence[Any]]
    retry: Callable[[Session, int | None], int]
    drop: Callable[[Session, int], Any]
    describe: Callable[[Any], str]


def _when(moment: Any) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment is not None else ""


def _queue_command(args: argparse.Namespace, queue: _Queue) -> int:
    with _store(args) as (_, store):
        if args.action == "list":
            with store.reading() as session:
                print(queue.header)
                for row in queue.list_rows(session, args.state, args.limit):
                    print(queue.line(row))
            return 0
        if args.action == "retry":
            if (args.id is None) == (not args.all_failed):
                raise CommandError(f"{queue.command} retry takes a {queue.item} ID or "
                                   "--all-failed")
            with store.writing() as session:
                count = queue.retry(session, args.id)
            if args.id is not None and count == 0:
                raise CommandError(f"{queue.noun} {args.id} is not in the failed state")
            print(f"{count} {queue.item}(s) will be sent again")
            return 0
        if args.id is None:
            raise CommandError(f"{queue.command} drop takes a {queue.item} ID")
        with store.writing() as session:
            dropped = queue.drop(session, args.id)
        if dropped is None:
            raise CommandError(f"{queue.noun} {args.id} does not exist or was already sent")
        print(f"dropped {queue.item} {args.id} ({queue.describe(dropped)})")
        return 0


def _outbox(args: argparse.Namespace) -> int:
    from broker import outbox

    return _queue_command(args, _Queue(
        command="outbox", noun="outbox message", item="message",
        header="ID\tSTATE\tEVENT\tACCESSION\tMSH-10\tATTEMPTS\tCREATED\tLAST ERROR",
        line=lambda m: (f"{m.id}\t{m.state}\t{m.event}\t{m.accession_number}\t"
                        f"{m.message_control_id}\t{m.attempts}\t{_when(m.created_at)}\t"
                        f"{m.last_error or ''}"),
        list_rows=outbox.list_messages, retry=outbox.retry, drop=outbox.drop,
        describe=lambda m: f"{m.event} for {m.accession_number}"))


def _mpps_forward(args: argparse.Namespace) -> int:
    from broker import mpps_forward

    return _queue_command(args, _Queue(
        command="mpps-forward", noun="MPPS forward", item="forward",
        header="ID\tSTATE\tOPERATION\tDESTINATION\tMPPS UID\tATTEMPTS\tCREATED\t"
               "NEXT ATTEMPT\tLAST ERROR",
        line=lambda f: (f"{f.id}\t{f.state}\t{f.operation}\t{f.destination}\t"
                        f"{f.sop_instance_uid}\t{f.attempts}\t{_when(f.created_at)}\t"
                        f"{_when(f.next_attempt_at)}\t{f.last_error or ''}"),
        list_rows=mpps_forward.list_forwards, retry=mpps_forward.retry,
        drop=mpps_forward.drop,
        describe=lambda f: f"N-{f.operation.upper()} of {f.sop_instance_uid} to {f.destination}"))


def _messages(args: argparse.Namespace) -> int:
    from broker import inbound_log

    with _store(args) as (config, store):
        if args.action == "list":
            with store.reading() as session:
                rows = inbound_log.list_messages(session, failed_only=args.failed,
                                                 limit=args.limit)
                print("ID\tRECEIVED\tACK\tTYPE\tMSH-10\tSENDER\tACCESSION\tREASON / WARNING")
                for m in rows:
                    # Accepted with a warning (control ID reused, no start): say so here too.
                    note = m.reason or "; ".join(
                        f"warning: {w}" for w in (m.warnings or "").splitlines())
                    print(f"{m.id}\t{m.received_at:%Y-%m-%d %H:%M:%S}\t{m.ack_code}\t"
                          f"{m.message_type}\t{m.control_id}\t{m.sender}\t"
                          f"{m.accession_number or ''}\t{note}")
            return 0
        if args.id is None:
            raise CommandError(f"messages {args.action} takes a message ID")
        with store.reading() as session:
            entry = inbound_log.get(session, args.id)
            if entry is None:
                raise CommandError(f"no inbound message {args.id}")
            raw, ack = entry.raw, entry.ack
            header = (f"message {entry.id}: received {entry.received_at:%Y-%m-%d %H:%M:%S} "
                      f"from {entry.sender}, {entry.outcome} ({entry.ack_code})"
                      f"{': ' + entry.reason if entry.reason else ''}"
                      + "".join(f"\nwarning: {w}" for w in (entry.warnings or "").splitlines()))
        if args.action == "show":
            print(header)
            print(_printable(raw))
            print("--- answered:")
            print(_printable(ack))
            return 0
        # Replay: the stored bytes go through the current mapping, as if just received.
        from hl7_listener.handler import handler_from_config
        from hl7_listener.replay import replay

        result = replay(store, handler_from_config(store, config), args.id)
        if result.reply is None:
            print("processed; the message asks for no acknowledgement (MSH-15)")
            return 0
        print(_printable(result.reply))
        return 0 if result.accepted else EXIT_FAILURE


def _printable(message: bytes) -> str:
    return message.decode("utf-8", errors="replace").replace("\r", "\n").rstrip("\n")


@contextmanager
def _progress(what: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (tqdm: small, no dependencies of its own, writes to
    stderr so that stdout stays the result); nothing when stderr is not a terminal, where the
    command prints one summary line instead."""
    if not sys.stderr.isatty():
        yield lambda _done: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit=" files", desc=what, file=sys.stderr, leave=False) as bar:
        yield bar.update


def _worklist_files(args: argparse.Namespace) -> int:
    import time

    from broker.dicom.wl_files import count_files, export_worklist, import_worklist

    directory = Path(args.directory)
    started = time.perf_counter()
    with _store(args) as (config, store):
        if args.command == "export-wl":
            with _progress("export-wl", None) as progress:
                count = export_worklist(store, directory, progress=progress)
            seconds = time.perf_counter() - started
            print(f"wrote {count} worklist files to {directory} in {seconds:.1f} s "
                  f"({count / max(seconds, 1e-6):.0f} files/s)")
            return 0
        if not directory.is_dir():
            raise CommandError(f"no folder {directory}")
        with _progress("import-wl", count_files(directory)) as progress:
            result = import_worklist(store, directory, uid_root=config.uid_root,
                                     progress=progress)
    rate = result.imported / max(result.seconds, 1e-6)
    print(f"imported {result.imported} worklist files from {directory} in "
          f"{result.seconds:.1f} s ({rate:.0f} files/s), {len(result.refused)} not imported")
    for name, reason in result.refused:
        print(f"not imported: {name}: {reason}", file=sys.stderr)
    return 0 if not result.refused else EXIT_FAILURE


def _studies(args: argparse.Namespace) -> int:
    from broker import studies

    with _store(args) as (_, store), store.reading() as session:
        rows = studies.list_studies(session, unmatched=args.unmatched, limit=args.limit)
        unmatched = studies.count_unmatched(session)
        print("ID\tRECEIVED\tACTION\tORDER\tSTUDY ACCESSION\tPATIENT ID\tMODALITIES\t"
              "INSTANCES\tSTUDY DATE\tSTUDY INSTANCE UID\tSOURCE")
        for s in rows:
            order = (s.item.accession_number if s.item is not None
                     else "(purged)" if s.matched_by else "(unmatched)")
            action = f"{s.action} ({s.matched_by})" if s.matched_by else "-"
            print(f"{s.id}\t{_when(s.received_at)}\t{action}\t{order}\t"
                  f"{s.accession_number or ''}\t{s.patient_id or ''}\t"
                  f"{s.modalities or ''}\t{s.number_of_instances or 0}\t"
                  f"{_when(s.performed_at)}\t{s.study_instance_uid or ''}\t{s.source}")
    print(f"{unmatched} unmatched stud{'y' if unmatched == 1 else 'ies'} in all")
    return 0


@contextmanager
def _per_record_lines_off(config: BrokerConfig, *names: str) -> Iterator[None]:
    """A bulk command's summary says what happened; the domain's line per record (one per
    MPPS on import-db) buried it on the terminal. DEBUG keeps them."""
    if config.logging.level == "DEBUG":
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _import_db(args: argparse.Namespace) -> int:
    from broker.legacy_import import LegacyImportError, import_legacy

    path = Path(args.path)
    with _store(args) as (config, store), _per_record_lines_off(config, "broker.mpps"):
        try:
            result = import_legacy(store, path, uid_root=config.uid_root,
                                   dry_run=args.dry_run)
        except LegacyImportError as exc:
            print(f"worklist-broker: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    verb = "would import" if result.dry_run else "imported"
    print(f"{verb} from {path}: {result.patients} patients, {result.items} worklist items, "
          f"{result.mpps} MPPS; {result.already_present} already in the broker; "
          f"{len(result.skipped)} skipped")
    if result.patients_without_items:
        print(f"note: {result.patients_without_items} patients without any worklist item "
              "are not imported (the RIS sends them again with their next order)")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for line in result.skipped:
        print(f"skipped: {line}")
    if result.dry_run:
        print("dry run: nothing was written")
    return 0


def _mapping_test(args: argparse.Namespace) -> int:
    from hl7_listener.mapping import load_mapping
    from hl7_listener.mapping_report import mapping_report, prepare

    mapping = load_mapping(Path(args.mapping))
    try:
        text = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    report = mapping_report(mapping, prepare(text))
    if report.patient is not None:
        print(f"{report.message_type}: patient {report.patient}")
        return 0
    for number, item in enumerate(report.items, start=1):
        print(f"item {number}: ORC-1 {item.order_control}"
              + (f", ORC-5 {item.order_status}" if item.order_status else ""))
        width = max(len(row.keyword) for row in item.attributes)
        for row in item.attributes:
            print(f"  {row.keyword:<{width}}  {row.value or '(empty)':<30}  <- {row.source}")
        for warning in item.warnings:
            print(f"  warning: {warning}")
    return 0


def _hash_password(_args: argparse.Namespace) -> int:
    import getpass

    from broker.web.security import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("empty password")
    print(hash_password(password))
    return 0


def _send_tls(args: argparse.Namespace) -> tuple[Any, str | None] | None:
    """The client context for ``send --tls`` (a ConfigError, exit 2, for a bad file)."""
    if not args.tls:
        if args.ca or args.cert or args.key or args.server_name:
            raise ConfigError("--ca, --cert, --key and --server-name need --tls")
        return None
    from pydantic import ValidationError

    from broker.config import TlsClientConfig
    from broker.tls import client_context, expected_server_name

    try:
        config = TlsClientConfig(enabled=True, ca_certificates=args.ca,
                                 certificate=args.cert, private_key=args.key,
                                 server_name=args.server_name)
    except ValidationError:
        raise ConfigError("--cert and --key go together") from None
    context = client_context(config, host=args.host, base_dir=Path.cwd(), where="send")
    return context, expected_server_name(config, args.host)


def _send(args: argparse.Namespace) -> int:
    import datetime as dt

    from hl7_listener.mllp import MllpClient, MllpError
    from hl7_listener.samples import render_sample
    from hl7_listener.status_message import parse_ack

    try:
        text = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    # Sample files carry {TODAY}-style placeholders; real RIS exports pass through unchanged.
    message = render_sample(text.decode("utf-8", errors="surrogateescape"),
                            dt.date.today()).encode("utf-8", errors="surrogateescape")
    tls = _send_tls(args)
    try:
        with MllpClient(args.host, args.port, connect_timeout=args.timeout,
                        read_timeout=args.timeout,
                        tls=(lambda: tls[0]) if tls else None,
                        server_name=tls[1] if tls else None) as client:
            reply = client.send(message)
    except MllpError as exc:
        raise CommandError(f"cannot send to {args.host}:{args.port}: {exc}") from None
    print(reply.decode("utf-8", errors="replace").replace("\r", "\n").rstrip("\n"))
    try:
        ack = parse_ack(reply)
    except BrokerError as exc:
        raise CommandError(f"the reply is not an ACK: {exc}") from None
    except Exception as exc:
        raise CommandError(f"the reply is not an ACK: {exc}") from None
    return 0 if ack.code in ("AA", "CA") else EXIT_FAILURE


def _mpps_show(args: argparse.Namespace) -> int:
    from pydicom.dataset import Dataset
    from sqlalchemy import select

    from broker.models import MPPSTracking

    uid = args.uid or args.target
    if not uid:
        raise CommandError("mpps show takes the MPPS SOP Instance UID")
    with _store(args) as (_, store):
        with store.reading() as session:
            record = session.scalars(select(MPPSTracking).where(
                MPPSTracking.sop_instance_uid == uid)).one_or_none()
            if record is None:
                raise CommandError(f"no MPPS {uid}")
            accessions = ", ".join(item.accession_number for item in record.items)
            print(f"MPPS {record.sop_instance_uid}: {record.status}")
            print(f"  started {record.start_datetime or '-'}, ended {record.end_datetime or '-'}")
            print(f"  from {record.calling_ae_title or '-'} (station "
                  f"{record.performed_station_ae_title or '-'})")
            print(f"  orders: {accessions or 'none (unscheduled)'}")
            if record.attributes_json:
                print(Dataset.from_json(record.attributes_json))
    return 0


def _mpps(args: argparse.Namespace) -> int:
    from broker.dicom.mpps_scu import MppsScuError, send_mpps

    if args.action == "show":
        return _mpps_show(args)
    if not args.accession:
        raise CommandError(f"mpps {args.action} needs --accession")
    try:
        outcome = send_mpps(args.action, accession=args.accession, host=args.host,
                            port=args.port, called_aet=args.aet, calling_aet=args.calling_aet,
                            sop_instance_uid=args.uid, study_instance_uid=args.study_uid,
                            modality=args.modality, timeout=args.timeout)
    except MppsScuError as exc:
        raise CommandError(str(exc)) from None
    comment = f" ({outcome.error_comment})" if outcome.error_comment else ""
    print(f"MPPS {args.action} accession={args.accession} uid={outcome.sop_instance_uid} "
          f"status=0x{outcome.status:04X}{comment}")
    return 0 if outcome.status == 0 else EXIT_FAILURE


def _timeline(args: argparse.Namespace) -> int:
    from broker.timeline import order_timeline

    with _store(args) as (_, store):
        with store.reading() as session:
            events = order_timeline(session, args.accession)
    if not events:
        raise CommandError(f"nothing is known of accession number {args.accession}")
    for event in events:
        print(f"{event.at:%Y-%m-%d %H:%M:%S}\t{event.kind}\t{event.title}\t{event.detail}")
    return 0


def _since(text: str) -> dt.datetime:
    """``7d``, ``12h``, ``30m`` ago, or an ISO date / date and time (UTC)."""
    import re

    from broker.models import utcnow

    relative = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if relative:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[relative.group(2)]
        return utcnow() - dt.timedelta(**{unit: int(relative.group(1))})
    try:
        moment = dt.datetime.fromisoformat(text.strip().removesuffix("Z"))
    except ValueError:
        raise CommandError(f"--since {text!r}: expected 7d, 12h, 30m, 2026-11-29 or "
                           "2026-11-29T08:00") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def _audit(args: argparse.Namespace) -> int:
    import json

    from broker.audit import list_events

    if args.accession is None and args.calling_ae is None and not (args.kind or args.since):
        raise CommandError("audit list needs --accession or --calling-ae (or --actor), or "
                           "at least --kind or --since")
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    since = _since(args.since) if args.since else None
    with _store(args) as (_, store):
        with store.reading() as session:
            events = list_events(session, accession_number=args.accession,
                                 actor=args.calling_ae, since=since,
                                 kinds=args.kind or (), limit=args.limit)
    for event in events:
        line = event.as_json()
        if args.json:
            print(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            continue
        rest = {k: v for k, v in line.items()
                if k not in ("at", "kind", "actor", "outcome", "address", "tls_subject",
                             "accessions") and v not in (None, "")}
        print("\t".join([line["at"], event.kind, event.actor or "-", event.outcome,
                         event.address or "-", event.tls_subject or "-",
                         ",".join(event.accessions) or "-",
                         " ".join(f"{k}={v}" for k, v in rest.items())]).rstrip())
    if not events:
        print("no audit events match", file=sys.stderr)
    return 0


def _why_not(args: argparse.Namespace) -> int:
    from broker.dicom.why_not import explain_recent

    with _store(args) as (config, store):
        explanations = explain_recent(store, config.dicom, args.accession, args.aet)
    if not explanations:
        raise CommandError(f"no C-FIND from calling AE {args.aet} is recorded")
    for explanation in explanations:
        verdict = "matched" if explanation.matched else "not matched"
        print(f"C-FIND from {explanation.calling_ae} at {explanation.at:%Y-%m-%d %H:%M:%S} "
              f"(asked {explanation.count} time(s), {explanation.matches} item(s) sent): "
              f"{verdict}")
        for key in explanation.verdicts:
            print(f"  {'ok' if key.matched else 'NO'}\t{key.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worklist-broker",
        description="HL7-fed DICOM Modality Worklist and MPPS broker.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the MLLP listener, DICOM SCP and scheduler")
    serve.add_argument("--config", default="config/broker.yaml", help="config file "
                       "(default: config/broker.yaml)")
    serve.add_argument("--load-samples", action="store_true",
                       help="at start, ingest the sample orders through the HL7 path")
    serve.add_argument("--samples-dir", help="sample orders folder (default: sample_messages "
                       "next to the config folder, else in the working directory)")
    serve.set_defaults(func=_serve)

    purge = commands.add_parser("purge", help="delete expired worklist items once")
    purge.add_argument("--config", default="config/broker.yaml")
    purge.add_argument("--dry-run", action="store_true", help="only count what would go")
    purge.set_defaults(func=_purge)

    for name, text, item, func in (
            ("outbox", "inspect and repair status messages to the RIS", "message", _outbox),
            ("mpps-forward", "inspect and repair MPPS copies owed to downstream MPPS SCPs "
             "(dicom.mpps_forward)", "forward", _mpps_forward)):
        queue = commands.add_parser(name, help=text)
        queue.add_argument("action", choices=["list", "retry", "drop"])
        queue.add_argument("id", nargs="?", type=int, help=f"{item} ID (retry, drop)")
        queue.add_argument("--config", default="config/broker.yaml")
        queue.add_argument("--state", choices=list(OUTBOX_STATES), help="list only this state")
        queue.add_argument("--limit", type=int, default=100, help="list at most this many")
        queue.add_argument("--all-failed", action="store_true",
                           help=f"retry every failed {item}")
        queue.set_defaults(func=func)

    msgs = commands.add_parser("messages", help="find, read and replay received HL7 messages")
    msgs.add_argument("action", choices=["list", "show", "replay"])
    msgs.add_argument("id", nargs="?", type=int, help="message ID (show, replay)")
    msgs.add_argument("--config", default="config/broker.yaml")
    msgs.add_argument("--failed", action="store_true", help="list only refused messages")
    msgs.add_argument("--limit", type=int, default=100, help="list at most this many")
    msgs.set_defaults(func=_messages)

    for name, text in (("import-wl", "import DICOM worklist files (*.wl) from a folder"),
                       ("export-wl", "write the current worklist as DICOM worklist files")):
        files = commands.add_parser(name, help=text)
        files.add_argument("directory")
        files.add_argument("--config", default="config/broker.yaml")
        files.set_defaults(func=_worklist_files)

    timeline = commands.add_parser("timeline", help="everything that happened to one order, "
                                   "oldest first (UTC)")
    timeline.add_argument("accession", help="AccessionNumber of the order")
    timeline.add_argument("--config", default="config/broker.yaml")
    timeline.set_defaults(func=_timeline)

    audit = commands.add_parser("audit", help="who saw or sent an order's data: DICOM "
                                "associations, C-FIND answers, MPPS, HL7 messages, console "
                                "logins and operator actions, one line per event")
    audit.add_argument("action", choices=["list"])
    audit.add_argument("--accession", help="events concerning this AccessionNumber")
    audit.add_argument("--calling-ae", "--actor", dest="calling_ae",
                       help="events of this calling AE title (or HL7 sender MSH-3^MSH-4, or "
                       "console user)")
    audit.add_argument("--since", help="only events since then: 7d, 12h, 30m, or an ISO date "
                       "or date and time (UTC)")
    audit.add_argument("--kind", action="append", help="only this kind (repeatable): "
                       "association-accepted, association-rejected, c-find, mpps-n-create, "
                       "mpps-n-set, hl7-received, hl7-sent, tls-handshake-failed, login, "
                       "login-failed, operator-action")
    audit.add_argument("--limit", type=int, default=1000,
                       help="at most this many, the newest (default 1000)")
    audit.add_argument("--json", action="store_true",
                       help="one JSON object a line, as in the audit log file")
    audit.add_argument("--config", default="config/broker.yaml")
    audit.set_defaults(func=_audit)

    why_not = commands.add_parser("why-not", help="why a modality's recent C-FIND queries did "
                                  "or did not return an order, key by key")
    why_not.add_argument("accession", help="AccessionNumber of the order")
    why_not.add_argument("--aet", required=True, help="calling AE title of the modality")
    why_not.add_argument("--config", default="config/broker.yaml")
    why_not.set_defaults(func=_why_not)

    studies = commands.add_parser("studies", help="studies the PACS (Orthanc) reported stable, "
                                  "with the order each completed")
    studies.add_argument("action", choices=["list"])
    studies.add_argument("--unmatched", action="store_true",
                         help="only studies that matched no worklist item")
    studies.add_argument("--limit", type=int, default=100, help="list at most this many")
    studies.add_argument("--config", default="config/broker.yaml")
    studies.set_defaults(func=_studies)

    legacy = commands.add_parser("import-db", help="import the database of the old Orthanc "
                                 "companion worklist server (patients, worklist_items, "
                                 "mpps_tracking)")
    legacy.add_argument("path", help="the old server's SQLite file (worklist.db)")
    legacy.add_argument("--dry-run", action="store_true",
                        help="print what would be imported, write nothing")
    legacy.add_argument("--config", default="config/broker.yaml")
    legacy.set_defaults(func=_import_db)

    test = commands.add_parser("mapping-test", help="show the worklist entry an HL7 file "
                               "would produce, without touching the database")
    test.add_argument("file", help="HL7 message file ({TODAY}-style placeholders are filled)")
    test.add_argument("--mapping", default="config/mapping.yaml",
                      help="mapping file (default: config/mapping.yaml)")
    test.set_defaults(func=_mapping_test)

    hashing = commands.add_parser(
        "hash-password", help="read a password (standard input, or a prompt on a terminal) "
        "and print its hash for web.users")
    hashing.set_defaults(func=_hash_password)

    send = commands.add_parser("send", help="send an HL7 file over MLLP and print the ACK")
    send.add_argument("file", help="HL7 message file ({TODAY}-style placeholders are filled)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=2575)
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("--tls", action="store_true",
                      help="over TLS (the listener's hl7.tls.port), verifying its certificate")
    send.add_argument("--ca", help="--tls: PEM CA bundle (default: the system's)")
    send.add_argument("--cert", help="--tls: client certificate (PEM), with --key")
    send.add_argument("--key", help="--tls: the client certificate's private key (PEM)")
    send.add_argument("--server-name",
                      help="--tls: name the listener's certificate must carry (default: --host "
                      "when it is a host name)")
    send.set_defaults(func=_send)

    mpps = commands.add_parser("mpps", help="act as a modality (MPPS N-CREATE / N-SET), or "
                               "show a stored MPPS")
    mpps.add_argument("action", choices=["in-progress", "completed", "discontinued", "show"])
    mpps.add_argument("target", nargs="?", help="show: the MPPS SOP Instance UID")
    mpps.add_argument("--accession", help="AccessionNumber of the order (in-progress, ...)")
    mpps.add_argument("--config", default="config/broker.yaml", help="show: config file")
    mpps.add_argument("--host", default="127.0.0.1")
    mpps.add_argument("--port", type=int, default=5243)
    mpps.add_argument("--aet", default="WORKLISTS", help="called AE title (default WORKLISTS)")
    mpps.add_argument("--calling-aet", default="MPPS_SCU")
    mpps.add_argument("--uid", help="MPPS SOP Instance UID (default: derived from the "
                      "accession, so in-progress and completed agree)")
    mpps.add_argument("--study-uid", help="StudyInstanceUID for the scheduled step")
    mpps.add_argument("--modality", default="OT")
    mpps.add_argument("--timeout", type=float, default=30.0)
    mpps.set_defaults(func=_mpps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"worklist-broker: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (CommandError, BrokerError) as exc:
        print(f"worklist-broker: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"worklist-broker: error: database: {reason}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
