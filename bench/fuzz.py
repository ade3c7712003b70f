"""Coverage-guided fuzzing (atheris) of what crosses the broker's edges. Not a test: run it by
hand, for as many inputs as you can spare:

    pip install atheris
    python bench/fuzz.py hl7-parse -runs=1000000
    python bench/fuzz.py hl7 -runs=100000
    python bench/fuzz.py identifier -runs=200000

Targets:
- ``hl7-parse``: any bytes through the parser, the mapping and the ACK, without the store
  (fast: for runs of a million inputs and more). The ACK must be well formed and name the
  message whenever its MSH-10 can be read; only the parser's and the mapping's own refusals
  may come out.
- ``hl7``: any bytes as an inbound message through the real handler (parse, mapping, the
  store on SQLite in a temporary folder, the ACK). Every input must be answered with a
  well-formed ACK naming its MSH-10 whenever that can be read (or, in enhanced mode, with
  none), and never raise.
- ``identifier``: any bytes as a C-FIND identifier, read as explicit and as implicit VR
  little endian the way the SCP reads one (pynetdicom's decoding, then ``read_identifier``),
  matched against a small worklist, rendered and encoded in the same transfer syntax as
  pynetdicom sends each answer. Only ``InvalidQuery`` (answered 0xA900 naming the key) may
  come out; what pydicom cannot split into elements (a truncated header) is answered 0xC000
  and skipped here.

A finding stops the run with the input saved as ``crash-*`` in the working directory
(atheris / libFuzzer); libFuzzer's last line ("Done N runs") counts the inputs.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

# Imported first, so that only the broker's own code (and pydicom's reading) is instrumented.
import hl7apy  # noqa: E402, F401
import pydantic  # noqa: E402, F401
import sqlalchemy.orm  # noqa: E402, F401
import yaml  # noqa: E402, F401

with atheris.instrument_imports():
    import pydicom  # noqa: F401

    import broker.matching
    import hl7_listener.ack
    import hl7_listener.handler
    import hl7_listener.mapping
    import hl7_listener.message
    from broker.dicom.identifier import read_identifier
    from broker.dicom.worklist import answer_encoder, query_from_identifier

from pynetdicom.dsutils import decode, encode  # noqa: E402

from broker.domain import Order, OrderControl, PatientData, ProcedureData  # noqa: E402
from broker.orders import apply_order  # noqa: E402
from broker.store import Store  # noqa: E402
from hl7_listener.mapping import load_mapping  # noqa: E402
from tests.hl7_listener.test_properties import SEEDS, check_ack  # noqa: E402


def _store() -> Store:
    folder = Path(tempfile.mkdtemp(prefix="wlb-fuzz-", dir="/dev/shm"
                                   if Path("/dev/shm").is_dir() else None))
    store = Store(f"sqlite:///{folder / 'w.db'}", pool_size=2)
    store.create_schema()
    return store


def hl7_target() -> object:
    handler = hl7_listener.handler.OrderMessageHandler(
        _store(), load_mapping(ROOT / "config" / "mapping.yaml"), uid_root="1.2.3",
        sending_application="WLB", sending_facility="")

    def one(data: bytes) -> None:
        check_ack(data, handler.handle(data))

    return one


def hl7_parse_target() -> object:
    from broker.errors import InvalidOrder, UnsupportedMessage
    from hl7_listener.ack import ErrorDetail, build_ack
    from hl7_listener.message import MessageError, parse, salvage_header

    mapping = load_mapping(ROOT / "config" / "mapping.yaml")

    def ack(msg: object, code: str, reason: str = "", error: object = None) -> bytes:
        return build_ack(msg, code, text=reason, error=error,  # type: ignore[arg-type]
                         sending_application="WLB", sending_facility="")

    def one(data: bytes) -> None:
        try:
            msg = parse(data)
        except MessageError as exc:
            header = exc.message or salvage_header(data)
            check_ack(data, ack(header, exc.ack_code, exc.reason, ErrorDetail(exc.code)))
            return
        try:
            if msg.message_type == "ADT":
                mapping.to_patient(msg)
            else:
                mapping.warnings(msg, mapping.to_orders(msg))
            check_ack(data, ack(msg, "AA"))
        except (InvalidOrder, UnsupportedMessage) as exc:
            check_ack(data, ack(msg, "AE", exc.reason, ErrorDetail(exc.code)))

    return one


def identifier_target() -> object:
    import datetime as dt

    store = _store()
    with store.writing() as session:
        for n, modality in enumerate(("CT", "MR", "US")):
            apply_order(session, Order(OrderControl.NEW, PatientData(
                f"P{n}", patient_name=f"DOE^JANE{n}"), ProcedureData(
                f"ACC{n}", modality=modality, scheduled_station_ae_title=f"{modality}_1",
                scheduled_start=dt.datetime(2026, 11, 29, 9 + n))), uid_root="1.2.3")

    def one(data: bytes) -> None:
        # Read as both transfer syntaxes a modality proposes: implicit VR takes each VR from
        # the dictionary (a sequence key's bytes are then parsed as items).
        for implicit_vr in (False, True):
            answer(data, implicit_vr)

    def answer(data: bytes, implicit_vr: bool) -> None:
        try:
            identifier = decode(io.BytesIO(data), implicit_vr, True)
            # Element headers are read eagerly: what pydicom cannot even split into
            # elements is answered 0xC000 by the SCP (nothing to name) and not the broker's.
            _ = list(identifier.keys())
        except Exception:
            return
        try:
            read_identifier(identifier)
            query = query_from_identifier(identifier, max_matches=100)
            with store.reading() as session:
                rows = broker.matching.find_worklist(session, query)
        except broker.matching.InvalidQuery:
            return
        render = answer_encoder(identifier, implicit_vr=implicit_vr)
        for row in rows:
            if encode(render(row), implicit_vr, True) is None:
                raise AssertionError("an answer pynetdicom cannot encode")

    return one


def identifier_seeds() -> list[bytes]:
    """Identifiers as modalities send them, in explicit and in implicit VR little endian."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    def encoded(implicit_vr: bool = False, **top: object) -> bytes:
        step = Dataset()
        step.Modality = top.pop("Modality", "CT")
        step.ScheduledStationAETitle = top.pop("ScheduledStationAETitle", "")
        step.ScheduledProcedureStepStartDate = top.pop("Date", "20261129")
        step.ScheduledProcedureStepStartTime = ""
        step.ScheduledPerformingPhysicianName = ""
        ds = Dataset()
        ds.SpecificCharacterSet = top.pop("SpecificCharacterSet", "")
        ds.PatientName = top.pop("PatientName", "")
        ds.PatientID = ""
        ds.AccessionNumber = top.pop("AccessionNumber", "")
        ds.StudyInstanceUID = ""
        ds.RequestedProcedureCodeSequence = []
        ds.ScheduledProcedureStepSequence = [step]
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
        write_dataset(buffer, ds)
        return buffer.getvalue()

    seeds = []
    for implicit_vr in (False, True):
        seeds += [encoded(implicit_vr), encoded(implicit_vr, PatientName="DOE*", Modality="MR"),
                  encoded(implicit_vr, AccessionNumber="ACC1", Date="20261128-20261130"),
                  encoded(implicit_vr, SpecificCharacterSet="ISO 2022 IR 87",
                          PatientName="ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"),
                  encoded(implicit_vr, ScheduledStationAETitle="CT_1", Modality="")]
    return seeds


def main() -> None:
    targets = {"hl7": hl7_target, "hl7-parse": hl7_parse_target,
               "identifier": identifier_target}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        raise SystemExit(__doc__)
    target = sys.argv.pop(1)
    logging.disable(logging.CRITICAL)  # a million refusals would be a million log lines
    warnings.simplefilter("ignore")  # pydicom warns of every odd value it reads
    one = targets[target]()
    corpus = Path(tempfile.mkdtemp(prefix=f"wlb-fuzz-{target}-corpus-"))
    for n, seed in enumerate(identifier_seeds() if target == "identifier" else SEEDS):
        (corpus / f"seed{n}").write_bytes(seed)
    atheris.Setup([*sys.argv, str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
