"""Resends, the kept raw messages, and recovering a refused order without the RIS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from sqlalchemy import func, select

from broker.models import InboundMessage, WorklistItem
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.status_message import parse_ack
from tests.messages import orm

REPO = Path(__file__).resolve().parents[2]


def _handler(store, mapping: Path = REPO / "config" / "mapping.yaml") -> OrderMessageHandler:
    return OrderMessageHandler(store, load_mapping(mapping), uid_root="1.2.3",
                               sending_application="WLB", sending_facility="")


def test_resend_of_an_accepted_message_gets_the_same_ack_and_changes_nothing(store):
    handler = _handler(store)
    first = handler.handle(orm(control_id="R1", accession="A1", modality="CT").encode())
    # The RIS did not see the ACK and resends; meanwhile the order was changed by hand.
    with store.writing() as s:
        s.execute(WorklistItem.__table__.update().values(modality="MR"))
    again = handler.handle(orm(control_id="R1", accession="A1", modality="CT").encode())
    assert again == first
    with store.reading() as s:
        assert s.scalar(select(WorklistItem.modality)) == "MR"
        assert s.scalar(select(func.count(InboundMessage.id))) == 1
    # Another sender may use the same MSH-10: that is a different message.
    other = handler.handle(orm(control_id="R1", accession="A2").encode().replace(
        b"|RIS|HOSP|", b"|RIS2|HOSP|", 1))
    assert parse_ack(other).code == "AA" and other != first


def test_refused_messages_are_kept_with_their_reason(store):
    handler = _handler(store)
    handler.handle(b"not hl7")
    handler.handle(orm(control_id="BAD", accession="").encode())
    with store.reading() as s:
        rows = s.scalars(select(InboundMessage).order_by(InboundMessage.id)).all()
        assert [(r.outcome, r.ack_code) for r in rows] == [("rejected", "AR"),
                                                           ("rejected", "AE")]
        assert rows[0].raw == b"not hl7"
        assert rows[1].reason == "OBR-18 AccessionNumber is required"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args, "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_administrator_finds_fixes_and_replays_a_refused_order(tmp_path, sqlite_store):
    # The RIS sends the accession in OBR-20 instead of OBR-18: every order is refused.
    message = orm(control_id="M-42", accession="").replace("|SPS-1|", "|ACC-42|").encode()
    _handler(sqlite_store).handle(message)
    mapping = tmp_path / "mapping.yaml"
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(mapping)}))
    mapping.write_text((REPO / "config" / "mapping.yaml").read_text())

    listed = _cli(config, "messages", "list", "--failed")
    assert listed.returncode == 0, listed.stderr
    line = listed.stdout.splitlines()[1]
    assert "M-42" in line and "OBR-18 AccessionNumber is required" in line
    message_id = line.split("\t")[0]
    shown = _cli(config, "messages", "show", message_id)
    assert "OBR|1|PLC-1|FIL-1|" in shown.stdout and "MSA|AE|M-42" in shown.stdout

    text = mapping.read_text().replace("AccessionNumber: {from: OBR-18, required: true}",
                                       "AccessionNumber: {from: [OBR-18, OBR-20], "
                                       "required: true}")
    mapping.write_text(text)
    replayed = _cli(config, "messages", "replay", message_id)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "MSA|AA|M-42" in replayed.stdout
    with sqlite_store.reading() as s:
        assert s.scalar(select(WorklistItem.accession_number)) == "ACC-42"
    missing = _cli(config, "messages", "show", "9999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "worklist-broker: error: no inbound message 9999"
