"""The console of the real ``worklist-broker serve``, over HTTP (httpx), with real DICOM
(findscu) and a real MLLP RIS where the flow needs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broker.config import BrokerConfig
from broker.web.app import create_app
from broker.web.security import hash_password
from broker.web.services import ConsoleServices
from hl7_listener.mllp import MllpClient
from tests.e2e.broker_process import REPO, BrokerProcess, start_broker
from tests.e2e.test_end_to_end import findscu
from tests.fake_ris import field_of
from tests.messages import orm
from tests.support import free_port, wait_for

PASSWORDS = {"olga": "operator-pw", "victor": "viewer-pw"}
OPERATOR = ("olga", PASSWORDS["olga"])
VIEWER = ("victor", PASSWORDS["victor"])
TODAY = "20261129"


@pytest.fixture(scope="module")
def users() -> list[dict[str, str]]:
    return [{"name": "olga", "role": "operator", "password_hash": hash_password("operator-pw")},
            {"name": "victor", "role": "viewer", "password_hash": hash_password("viewer-pw")}]


@pytest.fixture(scope="module")
def mapping(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mapping") / "mapping.yaml"
    path.write_text((REPO / "config" / "mapping.yaml").read_text())
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory, users, mapping):
    process = start_broker(tmp_path_factory.mktemp("console"), mapping=str(mapping),
                           web={"users": users, "login_failures_before_delay": 3})
    yield process
    assert process.stop() == 0


def _routes() -> list[tuple[str, str]]:
    """Every route of the console as (method, path), path parameters filled in."""
    from broker.web import api, health, pages, worklists_api

    app = create_app(None, BrokerConfig(), ConsoleServices(  # type: ignore[arg-type]
        replay=lambda _id: None, mapping_report=lambda _raw: None))
    routes = [r for r in app.routes if hasattr(r, "methods")]  # the app's own (OpenAPI)
    for module in (api, health, pages, worklists_api):
        routes += module.router.routes
    found = []
    for route in routes:
        methods = getattr(route, "methods", None) or {"GET"}
        path = re.sub(r"\{[^}]+\}", "1", route.path)  # type: ignore[attr-defined]
        for method in sorted(methods - {"HEAD"}):
            found.append((method, path))
    return found


PUBLIC = {"/health", "/metrics", "/login", "/static"}
API = ("/api/", "/worklists", "/openapi.json", "/docs")


def test_every_route_but_health_and_metrics_needs_credentials(broker: BrokerProcess):
    routes = _routes()
    assert len(routes) > 25
    with httpx.Client(base_url=broker.url, follow_redirects=False) as http:
        for method, path in routes:
            if path in PUBLIC:
                continue
            response = http.request(method, path)
            if path.startswith(API):
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.headers["www-authenticate"].startswith("Basic")
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login?next=")
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        # Wrong credentials are no credentials.
        assert http.get("/api/worklist", auth=("olga", "nope")).status_code == 401


def test_viewer_reads_but_cannot_replay_retry_drop_or_create(broker: BrokerProcess):
    with httpx.Client(base_url=broker.url, auth=VIEWER) as http:
        assert http.get("/api/worklist").status_code == 200
        for path in ("/api/messages/1/replay", "/api/queues/outbox/1/retry",
                     "/api/queues/outbox/1/drop", "/api/queues/mpps-forward/1/retry",
                     "/api/queues/outbox/retry-failed"):
            response = http.post(path)
            assert response.status_code == 403, path
            assert "operator" in response.json()["error"]
        assert http.post("/worklists/create", json={"Tags": {}}).status_code == 403
        assert http.delete("/worklists/X").status_code == 403
    # The same through the pages, logged in, with a valid CSRF token.
    with httpx.Client(base_url=broker.url) as page:
        _login(page, *VIEWER)
        token = _csrf(page, "/mapping")
        response = page.post("/queues/outbox/1/retry", data={"csrf": token})
        assert response.status_code == 403


def _login(http: httpx.Client, name: str, password: str) -> None:
    response = http.post("/login", data={"name": name, "password": password,
                                         "next": "/worklist"})
    assert response.status_code == 303, response.text
    assert "httponly" in response.headers["set-cookie"].lower()
    assert "samesite=lax" in response.headers["set-cookie"].lower()


def _csrf(http: httpx.Client, path: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', http.get(path).text)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def test_form_post_without_csrf_token_is_refused(broker: BrokerProcess):
    with httpx.Client(base_url=broker.url) as page:
        _login(page, *OPERATOR)
        message = "MSH|^~\\&|RIS|H|WLB|H|20261129||ORM^O01|C1|P|2.3.1\r"
        assert page.post("/mapping", data={"message": message}).status_code == 403
        assert page.post("/mapping", data={"message": message, "csrf": "forged"}
                         ).status_code == 403
        token = _csrf(page, "/mapping")
        assert page.post("/mapping", data={"message": orm(), "csrf": token}).status_code == 200


def test_repeated_failed_logins_are_slowed_down(broker: BrokerProcess):
    with httpx.Client(base_url=broker.url) as page:
        for _ in range(3):
            response = page.post("/login", data={"name": "victor", "password": "guess"})
            assert response.status_code == 401
        # Now even the right password waits: the attacker cannot tell.
        response = page.post("/login", data={"name": "victor", "password": "viewer-pw"})
        assert response.status_code == 429
        assert "wait" in response.text.lower()
    with httpx.Client(base_url=broker.url, auth=("victor", "viewer-pw")) as http:
        assert http.get("/api/worklist").status_code == 429


def test_order_created_over_orthanc_api_is_found_by_findscu(broker: BrokerProcess, tmp_path):
    body = {"Tags": {"PatientID": "PID-45", "PatientName": "TOTO^ANNA",
                     "AccessionNumber": "ORT-E2E-1",
                     "ScheduledProcedureStepSequence": [{
                         "Modality": "US", "ScheduledProcedureStepStartDate": TODAY,
                         "ScheduledProcedureStepStartTime": "101500",
                         "ScheduledStationAETitle": "US_ROOM1",
                         "ScheduledProcedureStepDescription": "Abdomen"}]}}
    with httpx.Client(base_url=broker.url, auth=OPERATOR) as http:
        created = http.post("/worklists/create", json=body)
        assert created.status_code == 200, created.text
        assert created.json() == {"ID": "ORT-E2E-1", "Path": "/worklists/ORT-E2E-1"}
        rows = findscu(broker.dicom_port, "AccessionNumber=ORT-E2E-1", "PatientName",
                       "(0040,0100)[0].Modality", "(0040,0100)[0].ScheduledStationAETitle",
                       out_dir=tmp_path / "q1")
        assert [(r.PatientName, r.ScheduledProcedureStepSequence[0].Modality,
                 r.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) for r in rows] == [
            ("TOTO^ANNA", "US", "US_ROOM1")]
        one = http.get("/worklists/ORT-E2E-1").json()
        assert one["ID"] == "ORT-E2E-1"
        assert one["Tags"]["ScheduledProcedureStepSequence"][0]["Modality"] == "US"
        assert any(w["ID"] == "ORT-E2E-1" for w in http.get("/worklists").json())
        # PUT replaces the attributes, the ID stays: what the new body leaves out is gone.
        body["Tags"]["PatientName"] = "TOTO^ANNE"
        body["Tags"]["ScheduledProcedureStepSequence"][0].pop("ScheduledStationAETitle")
        body["Tags"]["ScheduledProcedureStepSequence"][0]["Modality"] = "DX"
        assert http.put("/worklists/ORT-E2E-1", json=body).json()["ID"] == "ORT-E2E-1"
        replaced = http.get("/worklists/ORT-E2E-1?format=Short").json()["Tags"]
        assert replaced["0010,0010"] == "TOTO^ANNE"
        step = replaced["0040,0100"][0]
        assert step["0008,0060"] == "DX"
        assert not step.get("0040,0001")  # no station any more
        rows = findscu(broker.dicom_port, "AccessionNumber=ORT-E2E-1",
                       "(0040,0100)[0].ScheduledStationAETitle=US_ROOM1",
                       out_dir=tmp_path / "q1b")
        assert rows == []
        assert http.delete("/worklists/ORT-E2E-1").json() == {}
        assert http.get("/worklists/ORT-E2E-1").status_code == 404
        assert findscu(broker.dicom_port, "AccessionNumber=ORT-E2E-1",
                       out_dir=tmp_path / "q2") == []


@pytest.mark.parametrize(("body", "problem"), [
    (b"{not json", "not valid JSON"),
    (b'{"Tags": {"PatientID": "P", "AccessionNumber": "BAD-1", "PatientNme": "X"}}',
     "unknown DICOM keyword 'PatientNme'"),
    (b'{"Tags": {"PatientID": "P", "ScheduledProcedureStepSequence": [{"Modality": "CT", '
     b'"ScheduledProcedureStepStartDate": "20261129"}]}}', "AccessionNumber is missing"),
    (b'{"Tags": {"PatientID": "P", "AccessionNumber": "BAD-2"}}',
     "missing a 'ScheduledProcedureStepSequence'"),
    (b'{"Tags": {"PatientID": "P", "AccessionNumber": "BAD-3", "ScheduledProcedureStepSequence"'
     b': [{"Modality": "CT", "ScheduledProcedureStepStartDate": "2026-13-45"}]}}', "date"),
    (b'{"Tag": {}}', "'Tags' field is missing"),
])
def test_bad_worklist_bodies_get_400_naming_the_problem_and_store_nothing(
        broker: BrokerProcess, body: bytes, problem: str):
    with httpx.Client(base_url=broker.url, auth=OPERATOR) as http:
        before = len(http.get("/worklists").json())
        response = http.post("/worklists/create", content=body)
        assert response.status_code == 400
        assert problem in response.json()["error"]
        assert len(http.get("/worklists").json()) == before


def test_failed_message_fixed_in_the_mapping_and_replayed_from_the_api(
        broker: BrokerProcess, mapping: Path):
    # The RIS sends the accession in OBR-20: refused under the shipped mapping.
    message = orm(control_id="M-REPLAY", accession="").replace("|SPS-1|", "|ACC-REPLAY|")
    with MllpClient("127.0.0.1", broker.hl7_port) as client:
        ack = client.send(message.encode()).decode()
    assert field_of(ack, "MSA", 1) == "AE"
    with httpx.Client(base_url=broker.url, auth=OPERATOR) as http:
        failed = http.get("/api/messages", params={"failed": True}).json()["failed"]
        entry = next(m for m in failed if m["control_id"] == "M-REPLAY")
        shown = http.get(f"/api/messages/{entry['id']}").json()
        assert shown["refused_field"] == "OBR-18"
        assert "MSA|AE|M-REPLAY" in shown["ack"]
        original = mapping.read_text()
        mapping.write_text(original.replace(
            "AccessionNumber: {from: OBR-18, required: true}",
            "AccessionNumber: {from: [OBR-18, OBR-20], required: true}"))
        try:
            wait_for(lambda: "mapping reloaded" in broker.log(), timeout=15,
                     what="the mapping reload")
            replayed = http.post(f"/api/messages/{entry['id']}/replay")
            assert replayed.status_code == 200, replayed.text
            assert replayed.json()["ack_code"] == "AA"
            failed = http.get("/api/messages", params={"failed": True}).json()["failed"]
            again = next(m for m in failed if m["id"] == entry["id"])
            assert again["resolved_by"] is not None and again["resolved_by"] > entry["id"]
            item = http.get("/api/worklist/ACC-REPLAY")
            assert item.status_code == 200
            assert item.json()["item"]["patient_id"] == "PAT-1"
        finally:
            mapping.write_text(original)


def test_health_metrics_and_status(broker: BrokerProcess, tmp_path):
    findscu(broker.dicom_port, "AccessionNumber", out_dir=tmp_path / "q")
    with httpx.Client(base_url=broker.url) as http:
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "database": "ok", "dicom": "up", "hl7": "up",
                                 "scheduler": "up"}
        text = http.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert names and all(name.startswith("worklist_broker_") for name in names), names
    assert re.search(r'worklist_broker_cfind_queries_total\{calling_ae="FINDSCU",'
                     r'outcome="success"\} [1-9]', text)
    assert 'worklist_broker_queue_depth{queue="outbox",state="pending"}' in text
    assert "worklist_broker_hl7_ack_seconds_bucket" in text
    assert "MUSTERMANN" not in text and "PAT-1" not in text
    with httpx.Client(base_url=broker.url, auth=VIEWER) as http:
        status = http.get("/api/status").json()
        described = http.get("/openapi.json").json()["paths"]
    assert {"/worklists/create", "/worklists/{worklist_id}", "/api/worklist",
            "/api/messages/{message_id}/replay", "/api/mapping-test"} <= set(described)
    assert [li["name"] for li in status["listeners"]] == ["dicom", "hl7", "scheduler"]
    assert status["database"]["reachable"] is True


def test_serving_beyond_loopback_without_users_exits_2(tmp_path):
    from tests.e2e.broker_process import write_config

    config, *_ = write_config(tmp_path, web={"host": "0.0.0.0", "port": free_port()})
    done = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "web.users" in lines[0], done.stderr


def test_hash_password_prints_only_the_hash():
    from broker.web.security import verify_password

    done = subprocess.run([sys.executable, "-m", "broker.cli", "hash-password"], cwd=REPO,
                          input="s3cret\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scrypt$")
    assert verify_password("s3cret", lines[0]) and not verify_password("secret", lines[0])
