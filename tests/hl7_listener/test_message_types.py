"""Every order and patient message a RIS sends, through the handler into a real store."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from broker.models import Patient, WorklistItem
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.status_message import parse_ack
from tests.messages import adt, omi, orm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def handler(store) -> OrderMessageHandler:
    return OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                               uid_root="1.2.3", sending_application="WLB", sending_facility="")


_counter = iter(range(1, 10_000))


def send(handler: OrderMessageHandler, text: str) -> str:
    # Every message gets its own MSH-10, as a RIS would send them.
    text = text.replace("|MSG-1|", f"|MSG-{next(_counter)}|", 1)
    ack = parse_ack(handler.handle(text.encode()))
    return ack.code if ack.code == "AA" else f"{ack.code}: {ack.text}"


def items(handler: OrderMessageHandler) -> dict[str, tuple[str, str, str | None]]:
    with handler.store.reading() as s:
        rows = s.execute(select(WorklistItem.accession_number, WorklistItem.status,
                                Patient.patient_id, WorklistItem.modality)
                         .join(WorklistItem.patient)).all()
    return {a: (status, pid, modality) for a, status, pid, modality in rows}


@pytest.mark.parametrize(("control", "extra", "status"), [
    ("CA", {}, "CANCELLED"),
    ("OC", {}, "CANCELLED"),
    ("DC", {}, "DISCONTINUED"),
    ("HD", {}, "HELD"),
    ("SC", {"order_status": "CM"}, "COMPLETED"),
])
def test_order_controls_change_the_status(handler, control, extra, status):
    assert send(handler, orm(accession="A1")) == "AA"
    message = orm(control=control, accession="A1")
    if extra:
        message = message.replace("||SC\r", f"||{extra['order_status']}\r")  # ORC-5
    assert send(handler, message) == "AA"
    assert items(handler)["A1"][0] == status


def test_hold_and_release(handler):
    send(handler, orm(accession="A1"))
    assert send(handler, orm(control="HD", accession="A1")) == "AA"
    assert items(handler)["A1"][0] == "HELD"
    assert send(handler, orm(control="RL", accession="A1")) == "AA"
    assert items(handler)["A1"][0] == "SCHEDULED"


def test_unknown_control_and_status_are_refused_naming_the_field(handler):
    send(handler, orm(accession="A1"))
    assert send(handler, orm(control="ZZ", accession="A1")).startswith(
        "AR: ORC-1 order control 'ZZ' is not supported")
    assert send(handler, orm(control="SC", accession="A1").replace("||SC\r", "||XX\r")
                ).startswith("AE: ORC-5 order status 'XX'")
    assert send(handler, orm(control="CA", accession="NOPE")).startswith(
        "AE: OBR-18 no order with AccessionNumber 'NOPE'")
    assert items(handler)["A1"][0] == "SCHEDULED"


def test_several_order_groups_in_one_message_are_one_transaction(handler):
    two = orm(accession="G1") + "ORC|NW|PLC-1|FIL-1||SC\rOBR|1|PLC-1|FIL-1|CTCHEST^CT Chest^L" \
        "||||||||||||5678^WILSON||G2|RP-1|SPS-2||||CT|||^^^20261129100000\r"
    assert send(handler, two) == "AA"
    with handler.store.reading() as s:
        uids = dict(s.execute(select(WorklistItem.accession_number,
                                     WorklistItem.study_instance_uid)).all())
    # Same placer order and requested procedure: one study.
    assert uids["G1"] == uids["G2"]
    bad = orm(accession="G3").replace("MSG-1", "MSG-X") + (
        "ORC|NW|PLC-2|FIL-2||SC\rOBR|1|PLC-2|FIL-2|X^Y^Z||||||||||||||\r")
    assert send(handler, bad).startswith("AE: OBR-18 AccessionNumber is required")
    assert "G3" not in items(handler)  # all or nothing


def test_omi_o23_gives_one_item_per_ipc(handler):
    message = omi(ipcs=[
        {1: "ACC-O1", 2: "RP-O", 3: "1.2.840.5.1", 4: "SPS-O1", 5: "MR", 9: "MR_ROOM1"},
        {1: "ACC-O2", 2: "RP-O", 3: "1.2.840.5.1", 4: "SPS-O2", 5: "MR", 9: "MR_ROOM2"},
    ])
    assert send(handler, message) == "AA"
    with handler.store.reading() as s:
        rows = s.execute(select(WorklistItem.accession_number, WorklistItem.sps_id,
                                WorklistItem.scheduled_station_ae_title,
                                WorklistItem.study_instance_uid, WorklistItem.scheduled_start)
                         .order_by(WorklistItem.accession_number)).all()
    assert [tuple(r[:4]) for r in rows] == [
        ("ACC-O1", "SPS-O1", "MR_ROOM1", "1.2.840.5.1"),
        ("ACC-O2", "SPS-O2", "MR_ROOM2", "1.2.840.5.1")]
    assert rows[0][4].strftime("%Y%m%d%H%M") == "202611291000"


def test_adt_updates_merges_and_changes_identifiers(handler):
    send(handler, orm(accession="A1", patient_id="OLD"))
    send(handler, orm(accession="A2", patient_id="NEW").replace("MSG-1", "MSG-2"))
    assert send(handler, adt("A08", patient_id="NEW", patient_name="ROSSI^ANNA")) == "AA"
    with handler.store.reading() as s:
        assert s.scalar(select(Patient.patient_name).where(Patient.patient_id == "NEW")) == (
            "ROSSI^ANNA")
    assert send(handler, adt("A40", patient_id="NEW", old_patient_id="OLD",
                             control_id="ADT-2")) == "AA"
    assert {a: pid for a, (_, pid, _) in items(handler).items()} == {"A1": "NEW", "A2": "NEW"}
    assert send(handler, adt("A47", patient_id="NEWER", old_patient_id="NEW",
                             control_id="ADT-3")) == "AA"
    assert {pid for _, pid, _ in items(handler).values()} == {"NEWER"}
    with handler.store.reading() as s:
        assert list(s.scalars(select(Patient.patient_id))) == ["NEWER"]
    assert send(handler, adt("A01", control_id="ADT-4")) == "AA"  # acknowledged, no effect
    assert send(handler, adt("A40", control_id="ADT-5")).startswith(
        "AE: MRG-1 prior patient identifier is required")


def _with_msh15(text: str, accept: str, application: str = "NE") -> str:
    # MSH-15 / MSH-16 follow MSH-12 (2.3.1) with MSH-13 and MSH-14 empty.
    return text.replace("|P|2.3.1\r", f"|P|2.3.1|||{accept}|{application}\r", 1)


def test_enhanced_mode_answers_ca_ce_and_honours_ne_er_su(handler):
    ca = parse_ack(handler.handle(_with_msh15(orm(accession="E1"), "AL").encode()))
    assert (ca.code, ca.control_id) == ("CA", "MSG-1")
    ce = parse_ack(handler.handle(_with_msh15(orm(accession="", control_id="E2"), "AL").encode()))
    assert ce.code == "CE" and "OBR-18" in ce.text
    assert handler.handle(_with_msh15(orm(accession="E3", control_id="E3"), "NE").encode()) is None
    assert handler.handle(_with_msh15(orm(accession="E4", control_id="E4"), "ER").encode()) is None
    assert parse_ack(handler.handle(_with_msh15(orm(accession="", control_id="E5"), "ER")
                                    .encode())).code == "CE"
    assert handler.handle(_with_msh15(orm(accession="", control_id="E6"), "SU").encode()) is None
    assert set(items(handler)) == {"E1", "E3", "E4"}  # stored even when no ACK was wanted


def test_existing_order_policy_reject(store):
    strict = OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                                 uid_root="1.2.3", sending_application="WLB",
                                 sending_facility="", existing_order="reject")
    first = strict.handle(orm(accession="D1", control_id="D-ONCE").encode())
    # The RIS lost the ACK and resends: the original ACK, not "already exists".
    assert strict.handle(orm(accession="D1", control_id="D-ONCE").encode()) == first
    assert send(strict, orm(accession="D1", modality="MR")).startswith(
        "AE: OBR-18 an order with AccessionNumber 'D1' already exists")
    assert items(strict)["D1"][2] == "CT"
    assert send(strict, orm(accession="D1", control="XO", modality="MR")) == "AA"
    assert items(strict)["D1"][2] == "MR"


def test_wrong_charset_gets_ae_or_the_configured_fallback(store):
    raw = orm(patient_name="MÜLLER", charset="ASCII").encode("latin-1")
    plain = OrderMessageHandler(store, load_mapping(REPO / "config" / "mapping.yaml"),
                                uid_root="1.2.3", sending_application="WLB",
                                sending_facility="")
    nak = parse_ack(plain.handle(raw))
    assert (nak.code, nak.control_id) == ("AE", "MSG-1")
    assert "not valid ASCII" in nak.text and "0xDC" in nak.text
    assert items(plain) == {}
    lenient = OrderMessageHandler(store, plain.mapping, uid_root="1.2.3",
                                  sending_application="WLB", sending_facility="",
                                  charset_fallback="cp1252")
    assert parse_ack(lenient.handle(raw)).code == "AA"
    with store.reading() as s:
        assert s.scalar(select(Patient.patient_name)) == "MÜLLER"
