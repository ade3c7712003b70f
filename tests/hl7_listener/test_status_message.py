from __future__ import annotations

import datetime as dt
import re

import pytest
from pydantic import ValidationError

from broker.config import StatusMessagesConfig
from broker.domain import StatusEvent
from hl7_listener.message import MessageError, parse
from hl7_listener.status_message import StatusFormat, parse_ack, render_status_message


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


def _event(**changes) -> StatusEvent:
    base = dict(order_status="CM", accession_number="ACC1", placer_order_number="PL1",
                filler_order_number="FI1", patient_id="P1", patient_name="DOE^JANE",
                requested_procedure_id="RP1", sps_id="SPS1", study_instance_uid="1.2.3",
                modality="CT", station_ae_title="CT01", mpps_sop_instance_uid="1.2.3.4",
                event_time=dt.datetime(2026, 11, 29, 10, 30),
                performed_start=dt.datetime(2026, 11, 29, 10),
                performed_end=dt.datetime(2026, 11, 29, 10, 30), number_of_images=42)
    base.update(changes)
    return StatusEvent(**base)


def _render(event: StatusEvent, fmt: StatusFormat):
    return parse(render_status_message(event, message_control_id="WLB1",
                                       sending_application="WLB", sending_facility="",
                                       receiving_application="RIS", receiving_facility="",
                                       fmt=fmt))


def test_oru_r01_carries_result_status_times_and_the_image_count():
    message = _render(_event(), StatusFormat("ORU^R01", "2.5"))
    assert (message.message_type, message.trigger_event) == ("ORU", "R01")
    assert message.get("MSH-9.3") == "ORU_R01" and message.get("MSH-12") == "2.5"
    assert message.get("ORC-1") == "RE" and message.get("OBR-25") == "R"
    assert message.get("OBR-7") == "20261129100000" and message.get("OBR-8") == "20261129103000"
    assert message.get("OBX-5") == "42" and message.get("OBX-3.1") == "IMAGES"
    # In progress: no count yet, so no OBX at all, and result status I.
    started = _render(_event(order_status="IP", number_of_images=None, performed_end=None),
                      StatusFormat("ORU^R01", "2.5"))
    assert started.get("OBR-25") == "I" and started.segment_fields("OBX") is None


def test_omi_o23_has_one_ipc_with_the_dicom_identifiers():
    message = _render(_event(), StatusFormat("OMI^O23", "2.5.1"))
    assert message.get("MSH-9.1") == "OMI" and message.get("MSH-9.3") == "OMI_O23"
    assert [message.get(f"IPC-{n}") for n in (1, 2, 3, 4, 5, 9)] == [
        "ACC1", "RP1", "1.2.3", "SPS1", "CT", "CT01"]
    assert message.get("ORC-5") == "CM"


def test_field_templates_override_add_and_remove_fields():
    fmt = StatusFormat("ORM^O01", "2.3.1", {
        "OBR-4": "{procedure_code_value}^{procedure_code_meaning}^L",
        "OBR-4.3": "99LOCAL",  # a component over a whole-field template
        "OBR-18": "",  # removed
        "ZDS-1.2": "MY_BROKER",
        "ZWL-1": "{number_of_images}",
        "ZWL-2": "{station_ae_title}",
    })
    event = _event(requested_procedure_code_value="CT^1", requested_procedure_code_meaning="Head")
    message = _render(event, fmt)
    assert message.get("OBR-4.1") == "CT^1" and message.get("OBR-4.2") == "Head"
    assert message.get("OBR-4.3") == "99LOCAL" and not message.get("OBR-18")
    assert message.get("ZDS-1.1") == "1.2.3.4" and message.get("ZDS-1.2") == "MY_BROKER"
    assert message.get("ZWL-1") == "42" and message.get("ZWL-2") == "CT01"
    # Without an MPPS the ZDS goes, and a field whose placeholders are empty is empty.
    bare = _render(_event(mpps_sop_instance_uid=None, number_of_images=None), fmt)
    assert bare.segment_fields("ZDS") is None
    assert not bare.get("ZWL-1") and bare.get("ZWL-2") == "CT01"


@pytest.mark.parametrize(("path", "template", "reason"), [
    ("OBR4", "x", "not a field path"),
    ("MSH-9", "x", "MSH is written by the broker"),
    ("OBR-4", "{procedure}", "unknown placeholder {procedure}"),
    ("OBR-4", "a|b", "cannot contain |"),
    ("OBR-4", "{accession_number", "braces only enclose placeholders"),
])
def test_bad_templates_are_refused_when_the_config_loads(path, template, reason):
    with pytest.raises(ValidationError, match=re.escape(reason)):
        StatusMessagesConfig(field_templates={"ORM^O01": {path: template}})
