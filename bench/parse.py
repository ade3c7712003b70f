"""Parsing benchmark: our parse + mapping against hl7apy's element tree, per message.

Prints a table of milliseconds per 6-segment ORM^O01 (with a ZDS). Not a test: run it by hand,

    python bench/parse.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7apy.consts import VALIDATION_LEVEL  # noqa: E402
from hl7apy.parser import parse_field, parse_message, parse_segment  # noqa: E402

from hl7_listener.mapping import load_mapping  # noqa: E402
from hl7_listener.message import parse  # noqa: E402

MESSAGE = (
    "MSH|^~\\&|RIS|HOSP|WLB|RAD|20261129080000||ORM^O01^ORM_O01|MSG1|P|2.3.1\r"
    "PID|1||PAT-1^^^HOSP^MR||MUSTERMANN^ERIKA^^^||19650412|F\r"
    "PV1|1|O||||||1234^HOUSE^GREGORY\r"
    "ORC|NW|PL-1^RIS|FI-1^RIS||SC\r"
    "OBR|1|PL-1^RIS|FI-1^RIS|CTHEAD^CT Head^LOCAL||||||||||||5678^WILSON^JAMES||ACC-1|RP-1|"
    "SPS-1||||CT|||^^^202611290930^^R\r"
    "ZDS|1.2.3.4^WLB^Application^DICOM\r"
)
ENC = {"FIELD": "|", "COMPONENT": "^", "SUBCOMPONENT": "&", "REPETITION": "~",
       "ESCAPE": "\\", "SEGMENT": "\r", "GROUP": "\r"}
TOLERANT = VALIDATION_LEVEL.TOLERANT


def _per_call(fn: Callable[[], object], rounds: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - started) / rounds * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    mapping = load_mapping(ROOT / "config" / "mapping.yaml")
    raw = MESSAGE.encode()
    mapped = [s for s in MESSAGE.split("\r") if s[:3] in ("PID", "PV1", "ORC", "OBR", "ZDS")]
    obr = mapped[3].split("|")
    fields = [obr[i] for i in (4, 16, 18, 19, 20, 24, 27)]
    few = max(args.rounds // 10, 50)
    rows = [
        ("hl7_listener parse", _per_call(lambda: parse(raw), args.rounds)),
        ("hl7_listener parse + mapping.to_order",
         _per_call(lambda: mapping.to_order(parse(raw)), args.rounds)),
        ("hl7apy parse_message (grouped; drops ZDS)", _per_call(lambda: parse_message(
            MESSAGE, validation_level=TOLERANT), few)),
        ("hl7apy parse_message(find_groups=False)", _per_call(lambda: parse_message(
            MESSAGE, validation_level=TOLERANT, find_groups=False), few)),
        ("hl7apy parse_segment x5 mapped segments", _per_call(lambda: [parse_segment(
            s, "2.3.1", ENC, TOLERANT) for s in mapped], few)),
        ("hl7apy parse_field x7 OBR fields", _per_call(lambda: [parse_field(
            f, None, "2.3.1", ENC, TOLERANT) for f in fields], few)),
    ]
    print(f"{'approach':<45} {'ms/message':>10}")
    for name, ms in rows:
        print(f"{name:<45} {ms:>10.3f}")


if __name__ == "__main__":
    main()
