"""Which status events reach the outbox, and what they carry (config ris.status_messages)."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import select

from broker import outbox
from broker.config import Hl7Config, RisConfig, StatusMessagesConfig
from broker.domain import (
    MppsCreate,
    MppsSet,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
    StatusEvent,
    StatusKind,
)
from broker.models import OutboxMessage
from broker.mpps import record_mpps_create, record_mpps_set
from broker.orders import apply_order
from hl7_listener.outbound import OutboundSender
from tests.fake_ris import FakeRis, field_of

START = dt.datetime(2026, 11, 29, 10)
END = dt.datetime(2026, 11, 29, 10, 30)


def _image_refs(count: int) -> list[dict]:
    return [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": [f"1.2.9.{n}"]}} for n in range(count)]


# An N-SET as the DICOM edge hands it over: DICOM JSON of the modification list.
COMPLETED_JSON = json.dumps({
    "00400340": {"vr": "SQ", "Value": [
        {"00081140": {"vr": "SQ", "Value": _image_refs(3)}},
        {"00081140": {"vr": "SQ", "Value": _image_refs(2)},
         "00400220": {"vr": "SQ", "Value": _image_refs(1)}},
    ]},
})
DISCONTINUED_JSON = json.dumps({
    "00400281": {"vr": "SQ", "Value": [{
        "00080100": {"vr": "SH", "Value": ["110514"]},
        "00080102": {"vr": "SH", "Value": ["DCM"]},
        "00080104": {"vr": "LO", "Value": ["Incorrect worklist entry selected"]}}]},
})
UNSCHEDULED_JSON = json.dumps({
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "EMERGENCY^PATIENT"}]},
    "00100020": {"vr": "LO", "Value": ["TRAUMA-1"]},
    "00080060": {"vr": "CS", "Value": ["CT"]},
})


def _order(store, accession: str = "ACC1", control: OrderControl = OrderControl.NEW,
           policy: StatusMessagesConfig | None = None) -> None:
    reporting = (policy or StatusMessagesConfig()).reporting()
    with store.writing() as s:
        apply_order(s, Order(control, PatientData("P1", patient_name="DOE^JANE"),
                             ProcedureData(accession, placer_order_number="PL1",
                                           requested_procedure_id="RP1", sps_id="SPS1",
                                           modality="CT", scheduled_station_ae_title="CT01")),
                    uid_root="1.2.3", reporting=reporting)


def _events(store) -> list[tuple[str, StatusEvent]]:
    with store.reading() as s:
        rows = s.execute(select(OutboxMessage.accession_number, OutboxMessage.payload_json)
                         .order_by(OutboxMessage.id)).all()
    return [(key, outbox.decode_event(payload)) for key, payload in rows]


def test_mpps_events_carry_performed_times_image_count_and_station(store):
    _order(store)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.5.1", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="ACC1"),),
                                         start=START, performed_station_ae_title="CT02"))
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.5.1", "COMPLETED", end=END,
                                   attributes_json=COMPLETED_JSON))
    (_, started), (_, done) = _events(store)
    assert (started.kind, started.order_status, started.number_of_images) == (
        StatusKind.IN_PROGRESS, "IP", None)
    assert started.performed_start == START and started.station_ae_title == "CT02"
    assert (done.kind, done.order_status, done.number_of_images) == (
        StatusKind.COMPLETED, "CM", 6)
    assert (done.performed_start, done.performed_end, done.event_time) == (START, END, END)
    assert (done.requested_procedure_id, done.sps_id, done.modality) == ("RP1", "SPS1", "CT")


def _performed(store, uid: str, final: str, attributes_json: str) -> None:
    """ACC1 ordered, started on a modality, then ended with ``final``."""
    _order(store)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate(uid, "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="ACC1"),)))
    with store.writing() as s:
        record_mpps_set(s, MppsSet(uid, final, end=END, attributes_json=attributes_json))


def test_discontinued_event_keeps_the_reason_code(store):
    _performed(store, "1.5.2", "DISCONTINUED", DISCONTINUED_JSON)
    _, stopped = _events(store)[-1]
    assert (stopped.order_status, stopped.discontinuation_reason_code,
            stopped.discontinuation_reason_meaning) == (
        "DC", "110514", "Incorrect worklist entry selected")


def test_events_switched_off_are_not_queued(store):
    policy = StatusMessagesConfig(in_progress=False).reporting()
    _order(store)
    with store.writing() as s:
        record_mpps_create(s, MppsCreate("1.5.3", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="ACC1"),)), policy)
    with store.writing() as s:
        record_mpps_set(s, MppsSet("1.5.3", "COMPLETED", end=END), policy)
    assert [event.order_status for _, event in _events(store)] == ["CM"]


def test_unscheduled_mpps_is_reported_only_when_configured(store):
    for uid, policy in (("1.6.1", StatusMessagesConfig()),
                        ("1.6.2", StatusMessagesConfig(unscheduled=True))):
        with store.writing() as s:
            record_mpps_create(s, MppsCreate(uid, "IN PROGRESS", (), start=START,
                                             attributes_json=UNSCHEDULED_JSON),
                               policy.reporting())
        with store.writing() as s:
            record_mpps_set(s, MppsSet(uid, "COMPLETED", end=END), policy.reporting())
    events = _events(store)
    assert [event.mpps_sop_instance_uid for _, event in events] == ["1.6.2", "1.6.2"]
    (key, started), (same_key, done) = events
    assert (started.patient_id, started.patient_name, started.modality) == (
        "TRAUMA-1", "EMERGENCY^PATIENT", "CT")
    assert started.accession_number == "" and done.order_status == "CM"
    # Its own ordering key: an unscheduled step never queues behind another one.
    assert key == same_key and key.startswith("~") and len(key) == 16


def test_order_status_changes_are_queued_only_when_switched_on(store):
    on = StatusMessagesConfig(order_status=True)
    _order(store, "ACC1")  # default: off
    _order(store, "ACC2", policy=on)
    _order(store, "ACC2", OrderControl.CHANGE, policy=on)  # no status change, no message
    _order(store, "ACC2", OrderControl.CANCEL, policy=on)
    events = _events(store)
    assert [(key, event.order_status, event.kind) for key, event in events] == [
        ("ACC2", "SC", StatusKind.ORDER_STATUS), ("ACC2", "CA", StatusKind.ORDER_STATUS)]


def test_each_kind_goes_out_in_its_configured_message_type(store):
    _performed(store, "1.7.1", "COMPLETED", COMPLETED_JSON)
    ris = FakeRis()
    messages = StatusMessagesConfig(
        completed={"message_type": "ORU^R01", "version": "2.5"},
        field_templates={"ORU^R01": {"OBX-3": "IMG_COUNT^Images^L"}})
    sender = OutboundSender(store, RisConfig(enabled=True, host="127.0.0.1", port=ris.port,
                                             status_messages=messages),
                            Hl7Config(), batch_size=10)
    try:
        assert sender.run_once().sent == 2
        started, done = ris.wait_for_messages(2)
        assert field_of(started, "MSH", 9) == "ORM^O01" and field_of(started, "MSH", 12) == "2.3.1"
        assert field_of(done, "MSH", 9) == "ORU^R01^ORU_R01" and field_of(done, "MSH", 12) == "2.5"
        assert field_of(done, "OBX", 3) == "IMG_COUNT^Images^L"
        assert field_of(done, "OBX", 5) == "6" and field_of(done, "OBR", 25) == "R"
    finally:
        sender.close()
        ris.close()


def test_outbox_rows_from_an_older_version_still_decode():
    old = ('{"accession_number": "A1", "event_time": "2026-11-29T10:00:00", '
           '"order_status": "CM", "some_future_field": 1}')
    event = outbox.decode_event(old)
    assert event.status_kind is StatusKind.COMPLETED and event.number_of_images is None
