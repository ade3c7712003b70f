from __future__ import annotations

import datetime as dt

import pytest

from broker.domain import StatusEvent
from hl7_listener.message import MessageError, parse
from hl7_listener.status_message import parse_ack, render_status_message


def test_status_message_round_trips_through_the_parser():
    event = StatusEvent("CM", "ACC|1", placer_order_number="PL^1", filler_order_number="FI1",
                        patient_id="P1", issuer_of_patient_id="HOSP",
                        patient_name="MÜLLER^JÜRGEN^^DR", requested_procedure_code_value="CT1",
                        requested_procedure_code_meaning="CT Head",
                        requested_procedure_code_scheme="LOCAL",
                        mpps_sop_instance_uid="1.2.3.4", event_time=dt.datetime(2026, 11, 29, 10))
    raw = render_status_message(event, message_control_id="WLB123",
                                sending_application="WLB", sending_facility="RAD",
                                receiving_application="RIS", receiving_facility="HOSP")
    message = parse(raw)
    assert (message.message_type, message.trigger_event, message.control_id) == (
        "ORM", "O01", "WLB123")
    assert message.get("ORC-1") == "SC" and message.get("ORC-5") == "CM"
    # Delimiters inside values are escaped on the way out and decoded on the way in.
    assert message.get("ORC-2") == "PL^1" and message.get("OBR-2") == "PL^1"
    assert message.get("ORC-3") == "FI1" and message.get("OBR-18") == "ACC|1"
    assert message.get("PID-3.1") == "P1" and message.get("PID-3.4") == "HOSP"
    assert message.get("PID-5.1") == "MÜLLER" and message.get("PID-5.5") == "DR"
    assert message.get("OBR-4.1") == "CT1" and message.get("ZDS-1.1") == "1.2.3.4"
    assert message.get("ORC-9") == "20261129100000"


def test_parse_ack_reads_msa_and_refuses_what_is_not_an_ack():
    ack = parse_ack(b"MSH|^~\\&|RIS||WLB||2026||ACK|X|P|2.3.1\rMSA|AE|WLB123|bad \\T\\ sad\r")
    assert (ack.code, ack.control_id, ack.text) == ("AE", "WLB123", "bad & sad")
    with pytest.raises(MessageError):
        parse_ack(b"MSH|^~\\&|RIS||WLB||2026||ACK|X|P|2.3.1\rPID|1\r")
    with pytest.raises(MessageError):
        parse_ack(b"HTTP/1.1 400 Bad Request\r\n")
