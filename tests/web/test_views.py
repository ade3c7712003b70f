"""The console's views on both databases (grouping, min() and the matching code run as SQL),
through the app in process: each page's JSON twin is the API's answer."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient

from broker import outbox
from broker.config import BrokerConfig
from broker.domain import Order, OrderControl, PatientData, ProcedureData, StatusEvent
from broker.orders import apply_order
from broker.web import views
from broker.web.app import create_app
from broker.web.services import ConsoleServices
from broker.web.worklists_api import TagsError, dataset_from_tags, tags_from_dataset

TODAY = dt.date.today()


def _order(accession: str, name: str, modality: str, day: dt.date = TODAY) -> Order:
    return Order(OrderControl.NEW, PatientData(f"PID-{accession}", patient_name=name),
                 ProcedureData(accession, modality=modality,
                               scheduled_start=dt.datetime.combine(day, dt.time(9, 30))))


@pytest.fixture
def client(store):
    with store.writing() as session:
        for accession, name, modality in (("A1", "DOE^JOHN", "CT"), ("A2", "ROE^JANE", "MR")):
            apply_order(session, _order(accession, name, modality), uid_root="1.2.3")
        apply_order(session, _order("OLD", "DOE^JOHN", "CT", TODAY - dt.timedelta(days=3)),
                    uid_root="1.2.3")
        apply_order(session, Order(OrderControl.CANCEL, PatientData("PID-A2"),
                                   ProcedureData("A2")), uid_root="1.2.3")
        outbox.enqueue(session, StatusEvent(order_status="IP", accession_number="A1"))
    app = create_app(store, BrokerConfig(), ConsoleServices(replay=None, mapping_report=None))
    return TestClient(app)


def test_worklist_today_with_counts_and_search(client, store):
    today = views.worklist(store)
    assert [i["accession_number"] for i in today["items"]] == ["A1", "A2"]
    assert today["counts"]["SCHEDULED"] == 1 and today["counts"]["CANCELLED"] == 1
    found = views.worklist(store, patient_name="doe")  # no date: every day
    assert sorted(i["accession_number"] for i in found["items"]) == ["A1", "OLD"]
    scheduled = views.worklist(store, status="SCHEDULED", modality="CT")
    assert [i["accession_number"] for i in scheduled["items"]] == ["A1"]
    with pytest.raises(views.BadRequest, match="status"):
        views.worklist(store, status="DONE")
    with pytest.raises(views.BadRequest):
        views.worklist(store, date="2026-13-45")
    # One view, two faces: the page's JSON twin is the API's answer.
    api = client.get("/api/worklist").json()
    page = client.get("/worklist?format=json").json()
    assert {k: v for k, v in page.items() if k not in ("search", "today")} == api
    assert client.get("/worklist?status=DONE&format=json").status_code == 400


def test_order_queues_and_metrics(client, store):
    order = views.order(store, "A1")
    keywords = {row["keyword"] for row in order["attributes"]}
    assert {"AccessionNumber", "PatientName", "ScheduledProcedureStepSequence"} <= keywords
    assert views.order(store, "NOPE") is None
    depths = views.queue_depths(store)
    assert depths["outbox"]["states"] == {"pending": 1, "sent": 0, "failed": 0}
    assert depths["outbox"]["oldest_pending_age_seconds"] >= 0
    text = client.get("/metrics").text
    assert 'worklist_broker_queue_depth{queue="outbox",state="pending"} 1.0' in text
    assert client.get("/orders/A1").status_code == 200
    assert "DOE, JOHN" in client.get("/orders/A1").text
    # Autoescape: what a RIS or a URL carries is shown, never run.
    page = client.get("/worklist", params={"search": "<script>alert(1)</script>"}).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page


def test_orthanc_tags_round_trip_and_refusals():
    ds = dataset_from_tags({"PatientName": "DOE^JANE", "0010,0020": "P1",
                            "ScheduledProcedureStepSequence": [{"Modality": "US"}]})
    assert tags_from_dataset(ds, "human") == {
        "PatientName": "DOE^JANE", "PatientID": "P1",
        "ScheduledProcedureStepSequence": [{"Modality": "US"}]}
    assert tags_from_dataset(ds, "short")["0010,0010"] == "DOE^JANE"
    assert tags_from_dataset(ds, "full")["0010,0010"] == {"Name": "PatientName",
                                                          "Type": "String",
                                                          "Value": "DOE^JANE"}
    for tags, problem in (({"PatientNme": "X"}, "unknown DICOM keyword"),
                          ({"ScheduledProcedureStepSequence": {"Modality": "US"}},
                           "list of objects"),
                          ({"PatientName": {"a": 1}}, "expected a string"),
                          ({"zz,01": "x"}, "not a DICOM tag")):
        with pytest.raises(TagsError, match=problem):
            dataset_from_tags(tags)


def test_cross_site_posts_are_refused_even_on_the_open_console(client):
    hostile = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    assert client.post("/api/queues/outbox/1/drop", headers=hostile).status_code == 403
    assert client.post("/worklists/create", headers=hostile,
                       content=b'{"Tags": {}}').status_code == 403
    same = {"Origin": "http://testserver"}
    assert client.post("/api/queues/outbox/999/drop", headers=same).status_code == 409


def test_messages_show_what_an_accepted_message_was_warned_of(client, store):
    from pathlib import Path

    from hl7_listener.handler import OrderMessageHandler
    from hl7_listener.mapping import load_mapping
    from tests.messages import orm

    handler = OrderMessageHandler(
        store, load_mapping(Path(__file__).resolve().parents[2] / "config" / "mapping.yaml"),
        uid_root="1.2.3", sending_application="WLB", sending_facility="")
    handler.handle(orm(control_id="CTRL-1", accession="DUPA1").encode())
    handler.handle(orm(control_id="CTRL-1", accession="DUPB2").encode())
    listed = client.get("/api/messages").json()
    newest = next(m for m in listed["recent"] if m["accession_number"] == "DUPB2")
    assert newest["ack_code"] == "AA"
    assert newest["warnings"] == ["control ID CTRL-1 reused with different content: "
                                  "processed as a new message"]
    page = client.get("/messages").text
    assert "warning: control ID CTRL-1 reused with different content" in page
    one = client.get(f"/messages/{newest['id']}").text
    assert "reused with different content" in one


def test_a_refused_message_is_resolved_only_by_the_same_order_accepted_later(store):
    from broker import inbound_log
    from broker.models import InboundOutcome

    def refused(control_id: str, accession: str | None) -> int:
        with store.writing() as session:
            entry = inbound_log.record(
                session, sender="RIS|HOSP", control_id=control_id, message_type="ORM^O01",
                accession_number=accession, outcome=InboundOutcome.REJECTED, ack_code="AE",
                reason="PID-3: no patient ID", raw=b"MSH|refused", ack=b"MSA|AE")
            session.flush()
            return entry.id

    def accepted(control_id: str, accession: str, message_type: str = "ORM^O01") -> None:
        with store.writing() as session:
            inbound_log.record_accepted(
                session, sender="RIS|HOSP", control_id=control_id, message_type=message_type,
                accession_number=accession, raw=f"MSH|{control_id}|{accession}".encode(),
                ack=b"MSA|AA", digest=f"{control_id}-{accession}-{message_type}", warnings=[])

    fixed = refused("C1", "ACC-1")
    no_accession = refused("C2", None)
    reused = refused("C3", "ACC-3")
    other_type = refused("C4", "ACC-4")
    accepted("C1", "ACC-1")  # the RIS resent it, corrected
    accepted("C2", "ACC-2")  # refused for want of what names the order: any order fixes it
    accepted("C3", "ACC-9")  # a RIS that reuses control IDs: another order
    accepted("C4", "ACC-4", "ADT^A08")
    resolved = {m["id"]: m["resolved_by"] for m in views.messages(store)["failed"]}
    assert resolved[fixed] is not None and resolved[fixed] > fixed
    assert resolved[no_accession] is not None
    assert resolved[reused] is None
    assert resolved[other_type] is None


def test_a_nul_character_is_a_400_naming_the_attribute_never_a_server_error(client, store):
    # PostgreSQL refused it as a database error (500), SQLite stored it inside the value.
    same = {"Origin": "http://testserver"}
    step = [{"Modality": "CT", "ScheduledProcedureStepStartDate": "20261130"}]
    for tags, named in (({"PatientID": "P\x001", "AccessionNumber": "N-1"},
                         "PatientID (0010,0020)"),
                        ({"PatientID": "P1", "AccessionNumber": "N\x00-2"},
                         "AccessionNumber (0008,0050)"),
                        ({"PatientID": "P1", "AccessionNumber": "N-3",
                          "Allergies": "LA\x00TEX"}, "Allergies (0010,2110)")):
        refused = client.post("/worklists/create", headers=same,
                              json={"Tags": {**tags, "ScheduledProcedureStepSequence": step}})
        assert refused.status_code == 400
        assert refused.json()["error"].startswith(f"{named} holds a NUL character")
    from sqlalchemy import select

    from broker.models import WorklistItem
    with store.reading() as session:
        stored = set(session.scalars(select(WorklistItem.accession_number)))
    assert stored == {"A1", "A2", "OLD"}
    for path in ("/worklists/N%00-2", "/orders/N%00-2"):
        answer = client.get(path)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)
    # A search: nothing found (SQLite) or refused (PostgreSQL), never a server error.
    search = client.get("/api/worklist?patient_name=A%00B")
    assert search.status_code == 400 or search.json()["items"] == []
    assert 400 <= client.delete("/worklists/N%00-2", headers=same).status_code < 500
