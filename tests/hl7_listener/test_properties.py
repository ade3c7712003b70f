"""Property-based tests: whatever bytes arrive, the framing and the handler answer with a
well-formed ACK (or, in enhanced mode, deliberately none) and never raise; an ACK names the
message whenever its MSH-10 can be read. Inputs: mutations of realistic orders, and noise."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.store import Store
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.mllp import END_BLOCK, START_BLOCK, FrameTooLarge, FramingError, read_frame
from tests.messages import adt, omi, orm

REPO = Path(__file__).resolve().parents[2]
SEEDS = [
    orm().encode(), orm(version="2.5", tq1=True).encode(), orm(start_in="ORC-7").encode(),
    orm(charset="8859/1", patient_name="M\xdcLLER^J\xd6RG").encode("latin-1"),
    omi(ipcs=[{1: "ACC-9", 2: "RP-9", 4: "SPS-9", 5: "MR"}]).encode(),
    adt("A08").encode(), adt("A40", old_patient_id="OLD-1").encode(),
    *(p.read_bytes() for p in sorted((REPO / "sample_messages").glob("*.hl7"))),
]
ACK_CODES = {b"AA", b"AE", b"AR", b"CA", b"CE", b"CR"}
BUDGET = settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A realistic message with a few bytes flipped, inserted, deleted or duplicated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "delimiter"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif action == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        else:  # the characters that matter most to a parser
            data[at:at] = draw(st.sampled_from([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n",
                                                b"\x0b", b"\x1c", b"\xef\xbb\xbf", b"MSH|"]))
    return bytes(data)


def readable_control_id(raw: bytes) -> bytes | None:
    """MSH-10 as a reader of the start of the frame sees it, or None."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.startswith(b"MSH") or len(raw) < 5:
        return None
    sep = raw[3:4]
    if sep.isalnum() or sep.isspace():
        return None
    header = re.split(rb"\r\n|\r|\n", raw, maxsplit=1)[0]
    fields = header.split(sep)
    return fields[9] if len(fields) > 9 else None


def check_ack(raw: bytes, ack: bytes | None) -> None:
    if ack is None:  # enhanced mode: the sender asked for no answer (MSH-15)
        assert b"|" in raw or raw
        return
    segments = [s for s in ack.split(b"\r") if s]
    assert segments[0].startswith(b"MSH") and len(segments[0]) > 4
    sep = segments[0][3:4]
    msa = next(s for s in segments if s.startswith(b"MSA" + sep)).split(sep)
    assert msa[1] in ACK_CODES
    control_id = readable_control_id(raw)
    if control_id is not None:
        assert msa[2] == control_id, (raw[:200], ack)


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrderMessageHandler]:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('prop') / 'w.db'}", pool_size=2)
    store.create_schema()
    yield OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                              uid_root="1.2.3", sending_application="WLB",
                              sending_facility="")
    store.dispose()


@BUDGET
@given(raw=mutated())
# Found by bench/fuzz.py: a line end right after "MSH".
@example(raw=b"MSH\n|^~;&|RIS|HOSP|WLB|HOSP|20261129080000||AKT^A08|ADT-1|P|2.4\rO\r")
@example(raw=b"MSH\xff\xff\xff\xff\xff\xff\xff\xff\xffMSH|\xff\xff^")  # 0xFF is a letter in Latin-1
@example(raw="MSH\ufeff^~\\&\ufeffRIS\ufeffH\ufeff\ufeff\ufeff\ufeff\ufeffORM^O01\ufeffC-9\ufeffP"
         "\ufeff2.5\r".encode())  # a multi-byte MSH-1 (found by hypothesis)
def test_any_mutated_message_gets_a_well_formed_ack_naming_it(handler, raw):
    check_ack(raw, handler.handle(raw))


@BUDGET
@given(raw=st.one_of(st.binary(max_size=300),
                     st.text(max_size=300).map(lambda t: ("MSH|^~\\&|" + t).encode()),
                     st.text(max_size=300).map(str.encode)))
def test_any_bytes_at_all_get_a_well_formed_ack(handler, raw):
    check_ack(raw, handler.handle(raw))


@BUDGET
@given(stream=st.lists(st.one_of(st.binary(max_size=40),
                                 st.sampled_from([START_BLOCK, END_BLOCK, b"\x1c", b"\r"])),
                       max_size=30).map(b"".join))
def test_any_bytes_through_the_framing_end_in_frames_or_a_framing_error(stream):
    async def read_all() -> list[bytes]:
        reader = asyncio.StreamReader(limit=256 + 64)
        reader.feed_data(stream)
        reader.feed_eof()
        frames: list[bytes] = []
        for _ in range(len(stream) + 2):  # each frame consumes at least its start block
            try:
                payload = await read_frame(reader, 256)
            except (FramingError, FrameTooLarge):
                return frames
            if payload is None:
                return frames
            frames.append(payload)
        raise AssertionError("read_frame did not reach the end of the stream")

    frames = asyncio.run(asyncio.wait_for(read_all(), 10))
    assert all(len(f) <= 256 and START_BLOCK not in f for f in frames)
