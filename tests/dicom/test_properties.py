"""Property-based tests (issue 13, part 3): any dataset, sent byte for byte over a real
association to a real DicomServer as a C-FIND identifier or an MPPS N-CREATE / N-SET, gets a
well-formed DICOM status: never an unhandled exception, a 0xC311 (pynetdicom's answer when a
handler raises or its answer cannot be encoded), a dropped association or a half-written
transaction. Inputs: elements of worklist and MPPS keys, with their own VR or another one,
values valid, odd or random, and nested sequences."""

from __future__ import annotations

import datetime as dt
import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
    ModalityWorklistInformationFind,
)
from sqlalchemy import func, select

from broker.dicom.mpps_scu import create_dataset, set_dataset
from broker.dicom.scp import DicomServer
from broker.domain import ItemStatus
from broker.models import MPPSTracking, OutboxMessage, WorklistItem
from broker.store import Store
from tests.dicom.conftest import DAY, ORDERS, load, order, start_server
from tests.dicom.raw import element, raw_dataset

# Modest, per backend, so that the suite stays fast (bench/fuzz.py is the long run): each
# MPPS example is four associations and two commits.
BUDGET = settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
MPPS_BUDGET = settings(BUDGET, max_examples=25)

# Keys the broker matches on or returns, MPPS attributes, and a few others (one private).
TAGS: dict[int, str] = {
    0x00080005: "CS", 0x00080050: "SH", 0x00080060: "CS", 0x00080090: "PN", 0x00100010: "PN",
    0x00100020: "LO", 0x00100021: "LO", 0x00100030: "DA", 0x00100040: "CS", 0x00101010: "AS",
    0x00101030: "DS", 0x0020000D: "UI", 0x00201208: "IS", 0x00321032: "PN", 0x00401001: "SH",
    0x00321060: "LO", 0x00400001: "AE", 0x00400002: "DA", 0x00400003: "TM", 0x00400006: "PN",
    0x00400007: "LO", 0x00400009: "SH", 0x00400010: "SH", 0x00400020: "CS", 0x00401003: "SH",
    0x00400241: "AE", 0x00400244: "DA", 0x00400245: "TM", 0x00400250: "DA", 0x00400251: "TM",
    0x00400252: "CS", 0x00400253: "SH", 0x00400254: "LO", 0x00400100: "SQ", 0x00321064: "SQ",
    0x00400270: "SQ", 0x00400340: "SQ", 0x00080100: "SH", 0x00080102: "SH", 0x00080104: "LO",
    0x00091010: "LO", 0x00189073: "FD", 0x00280010: "US", 0x00400260: "SQ",
}
VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW",
       "PN", "SH", "SL", "SQ", "SS", "ST", "TM", "UC", "UI", "UL", "UN", "US", "UT"]
CHARSETS = [b"", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"\\ISO 2022 IR 87",
            b"ISO_IR 13\\ISO 2022 IR 87", b"GB18030", b"ISO_IR 6", b"NONSENSE"]
TEXTS = [b"", b"*", b"?", b"DOE*", b"DOE^JOHN^^=^", b"^=", b"=^^", b"\\", b"a\\b\\", b"CT",
         b"ACC-CT-1", b"20260302", b"20260302-20260303", b"-", b"0800-0900", b"abc", b"x,y",
         b"1e999", b"NaN", b"1" * 4400, b"9" * 40, b"SCHEDULED", b"IN PROGRESS", b"COMPLETED",
         b"\x1b$B0!\x1b(B", b"\xff\xfe", b"M\xfcller", b"\xe5\xb1\xb1\xe7\x94\xb0", b" \x00"]


def _values(vr: str) -> st.SearchStrategy[bytes]:
    if vr in ("FD", "FL", "SL", "SS", "UL", "US", "AT"):
        return st.one_of(st.binary(max_size=12), st.just(struct.pack("<I", 7)))
    return st.one_of(st.sampled_from(TEXTS), st.binary(max_size=24),
                     st.text(max_size=12).map(lambda text: text.encode("utf-8")))


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> bytes:
    tag = draw(st.one_of(st.sampled_from(sorted(TAGS)), st.integers(0x00080000, 0x7FDFFFFF)))
    vr = draw(st.one_of(st.just(TAGS.get(tag, "LO")), st.sampled_from(VRS)))
    if vr == "SQ":
        if depth >= 2:
            return element(tag, "SQ", b"")
        items = draw(st.lists(st.lists(elements(depth + 1), max_size=4), max_size=2))
        body = b""
        for item in items:
            content = b"".join(_ordered(item))
            body += struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
        return element(tag, "SQ", body)
    return element(tag, vr, draw(_values(vr)))


def _ordered(encoded: list[bytes]) -> list[bytes]:
    """Elements in ascending tag order, one per tag (as a dataset holds them)."""
    by_tag: dict[tuple[int, int], bytes] = {}
    for one in encoded:
        by_tag.setdefault(struct.unpack("<HH", one[:4]), one)
    return [by_tag[key] for key in sorted(by_tag)]


def _sendable(dataset: Dataset) -> bool:
    """Whether pynetdicom's SCU sends the elements as they are: only when the dataset's
    character set can be read (else pydicom decodes them all again), and when something is
    left to send (pydicom leaves group lengths out, and for an empty data set pynetdicom's
    SCU sends no fragment at all although it announced one: the SCP waits for it until the
    network timeout, the SCU's doing)."""
    try:
        dataset.set_original_encoding(False, True, dataset._character_set)
        return bool(encode(dataset, False, True))
    except Exception:
        return False


def _released(assoc) -> None:  # type: ignore[no-untyped-def]
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted, "the association was dropped"


def _well_formed(status: Dataset, allowed: set[int]) -> int:
    assert "Status" in status, "no answer (the association was dropped or timed out)"
    code = int(status.Status)
    assert code != 0xC311, "a handler raised inside pynetdicom"
    assert code in allowed, hex(code)
    if code not in (0x0000, 0xFF00, 0xFF01, 0xFE00):
        assert 0 < len(str(status.get("ErrorComment", ""))) <= 64
    return code


# --- C-FIND -----------------------------------------------------------------------------

@pytest.fixture
def find_server(store: Store) -> Iterator[DicomServer]:
    load(store, ORDERS)
    server = start_server(store)
    yield server
    server.stop()


@BUDGET
@given(encoded=st.lists(elements(), min_size=1, max_size=8))
def test_any_identifier_gets_a_well_formed_answer(find_server: DicomServer,
                                                  encoded: list[bytes]) -> None:
    try:
        identifier = raw_dataset(*_ordered(encoded))
    except Exception:
        # pydicom reads the Specific Character Set while it splits the elements: a value it
        # cannot read (a NUL byte, a wrong VR) fails it here, and in the SCP's decoding as
        # well, answered 0xC000 (tests/dicom/test_scp.py: undecodable identifier).
        return
    if not _sendable(identifier):
        return
    ae = AE(ae_title="FUZZ_SCU")
    ae.add_requested_context(ModalityWorklistInformationFind, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", find_server.port, ae_title="WORKLISTS")
    assert assoc.is_established
    codes = []
    for status, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
        codes.append(_well_formed(status, {0xFF00, 0xFF01, 0x0000, 0xA900, 0xC000}))
    _released(assoc)
    assert codes and codes[-1] in (0x0000, 0xA900, 0xC000)
    event(f"C-FIND 0x{codes[-1]:04X}")
    assert all(code in (0xFF00, 0xFF01) for code in codes[:-1])
    if codes[-1] != 0x0000:
        assert len(codes) == 1  # a refusal comes before any match


# --- MPPS -------------------------------------------------------------------------------

_numbers = itertools.count(1)
MPPS_FAILURES = {0x0106, 0x0110, 0x0111, 0x0112, 0x0120, 0x0121}


@pytest.fixture
def mpps_server(store: Store) -> Iterator[DicomServer]:
    server = start_server(store)
    yield server
    server.stop()


def _with_raw(dataset: Dataset, encoded: list[bytes]) -> Dataset | None:
    try:
        extra = raw_dataset(*_ordered(encoded))
    except Exception:  # as for C-FIND above: pydicom cannot split the elements
        return None
    for raw in extra.values():
        assert isinstance(raw, RawDataElement)
        dataset[raw.tag] = raw
    return dataset


def _mpps_request(port: int, dataset: Dataset, uid: str, *, create: bool) -> int:
    ae = AE(ae_title="FUZZ_SCU")
    ae.add_requested_context(ModalityPerformedProcedureStep, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established
    send = assoc.send_n_create if create else assoc.send_n_set
    status, _ = send(dataset, ModalityPerformedProcedureStep, uid)
    _released(assoc)
    return _well_formed(status, {0x0000} | MPPS_FAILURES)


def _n_get(port: int, uid: str) -> tuple[int, Dataset | None]:
    ae = AE(ae_title="FUZZ_SCU")
    ae.add_requested_context(ModalityPerformedProcedureStepRetrieve)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established
    status, kept = assoc.send_n_get([0x00400252], ModalityPerformedProcedureStepRetrieve, uid)
    _released(assoc)
    return _well_formed(status, {0x0000, 0x0112}), kept


def _state(store: Store, uid: str, accession: str) -> tuple[str | None, str, int]:
    """The MPPS's status, its item's status and the item's outbox rows."""
    with store.reading() as session:
        mpps = session.scalars(select(MPPSTracking.status).where(
            MPPSTracking.sop_instance_uid == uid)).one_or_none()
        item = session.scalars(select(WorklistItem.status).where(
            WorklistItem.accession_number == accession)).one()
        rows = session.scalar(select(func.count()).select_from(OutboxMessage).where(
            OutboxMessage.accession_number == accession))
    return (None if mpps is None else str(mpps)), str(item), int(rows or 0)


@MPPS_BUDGET
@given(created=st.lists(elements(), max_size=5), modified=st.lists(elements(), max_size=4))
def test_any_mpps_is_kept_whole_or_refused_whole(mpps_server: DicomServer, store: Store,
                                                 created: list[bytes],
                                                 modified: list[bytes]) -> None:
    number = next(_numbers)
    accession = f"ACC-P{number}"
    load(store, [order(accession, f"P{number}", "DOE^JANE", "CT",
                       dt.datetime.combine(DAY, dt.time(8)))])
    uid = f"1.2.826.0.1.3680043.10.1491.77.{number}"
    # The Scheduled Step Attributes Sequence links the step to its item: kept as sent.
    created = [one for one in created if one[:4] != struct.pack("<HH", 0x0040, 0x0270)]
    create = _with_raw(create_dataset(accession=accession, calling_aet="FUZZ_SCU",
                                      modality="CT", study_instance_uid=None), created)
    if create is None or not _sendable(create):
        return
    port = mpps_server.port
    code = _mpps_request(port, create, uid, create=True)
    event(f"N-CREATE 0x{code:04X}")
    got, kept = _n_get(port, uid)
    if code != 0x0000:
        # Refused whole: nothing recorded, nothing owed to the RIS.
        assert got == 0x0112
        assert _state(store, uid, accession) == (None, str(ItemStatus.SCHEDULED), 0)
        return
    assert got == 0x0000 and kept is not None
    assert kept.PerformedProcedureStepStatus == "IN PROGRESS"
    assert _state(store, uid, accession) == ("IN PROGRESS", str(ItemStatus.IN_PROGRESS), 1)

    modification = _with_raw(set_dataset("COMPLETED"), modified)
    if modification is None or not _sendable(modification):
        return
    code = _mpps_request(port, modification, uid, create=False)
    event(f"N-SET 0x{code:04X}")
    got, kept = _n_get(port, uid)
    assert got == 0x0000 and kept is not None
    if code == 0x0000:
        # What N-GET reports is what was applied, to the step and to its item.
        mpps, item, rows = _state(store, uid, accession)
        assert str(kept.PerformedProcedureStepStatus).strip().upper() == mpps == item
        assert rows == (1 if mpps == "IN PROGRESS" else 2)
    else:
        assert kept.PerformedProcedureStepStatus == "IN PROGRESS"
        assert _state(store, uid, accession) == ("IN PROGRESS", str(ItemStatus.IN_PROGRESS), 1)
