"""A real browser (Debian's headless Chromium through selenium) drives the console of the
real ``worklist-broker serve``: log in, search a patient, open the order, read its
timeline, ask why a modality did not get it, replay a refused message, retry a dead letter.
Screenshots are saved under the test's tmp dir (and copied to $WLB_SCREENSHOTS if set)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.dicom.mpps_scu import send_mpps
from broker.web.security import hash_password
from hl7_listener.mllp import MllpClient
from tests.e2e.broker_process import REPO, start_broker
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import dcmtk, wait_for

CHROMEDRIVER = Path("/usr/bin/chromedriver")
TODAY_START = "{date}101500"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def browser(tmp_path):
    if not CHROMEDRIVER.exists():
        raise AssertionError("the browser test needs Debian's chromium and chromium-driver: "
                             "apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1366,768", "--disable-gpu"):
        options.add_argument(argument)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    # Clicks return before the next page is in: every look-up waits for its element.
    driver.implicitly_wait(10)
    driver.set_window_size(1366, 768)
    yield driver
    driver.quit()


class Shots:
    def __init__(self, driver, directory: Path) -> None:
        self.driver, self.directory, self.count = driver, directory, 0
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"screenshot {name} not saved"
        copy_to = os.environ.get("WLB_SCREENSHOTS")
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)


def _findscu(port: int, calling_ae: str, *keys: str) -> None:
    args = [dcmtk("findscu"), "-W", "-aet", calling_ae, "-aec", "WORKLISTS", "-to", "10"]
    for key in keys:
        args += ["-k", key]
    done = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, timeout=30,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_operator_answers_the_support_calls_in_a_browser(tmp_path, browser):
    import datetime as dt

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    today = dt.date.today().strftime("%Y%m%d")
    ris = FakeRis(ack_code="AR")  # the RIS refuses every status message: a dead letter
    mapping = tmp_path / "mapping.yaml"
    original = (REPO / "config" / "mapping.yaml").read_text()
    mapping.write_text(original)
    users = [{"name": "olga", "role": "operator", "password_hash": hash_password("pw-olga")}]
    broker = start_broker(tmp_path / "broker", ris_port=ris.port, mapping=str(mapping),
                          web={"users": users, "refresh_seconds": 0},
                          dicom={"record_flush_seconds": 0.2})
    shots = Shots(browser, tmp_path / "screens")
    try:
        with MllpClient("127.0.0.1", broker.hl7_port) as client:
            ack = client.send(orm(control_id="BR-1", accession="ACC-BR-1", modality="CT",
                                  patient_name="BROWSER^BETTY", patient_id="PAT-BR",
                                  start=TODAY_START.format(date=today)).encode()).decode()
            assert field_of(ack, "MSA", 1) == "AA"
            for n in range(2, 5):
                client.send(orm(control_id=f"BR-{n}", accession=f"ACC-BR-{n}",
                                patient_name=f"OTHER^PATIENT{n}", patient_id=f"PAT-O{n}",
                                modality="MR", start=TODAY_START.format(date=today)).encode())
            # The RIS puts the accession in OBR-20: refused under the shipped mapping.
            refused = client.send(orm(control_id="BR-BAD", accession="", patient_id="PAT-FIX",
                                      patient_name="FIXME^FRED").replace(
                "|SPS-1|", "|ACC-FIXED|").encode()).decode()
            assert field_of(refused, "MSA", 1) == "AE"
        # CT_ROOM1 is given the order; CT_ROOM2 asks for MR only: not on its worklist.
        _findscu(broker.dicom_port, "CT_ROOM1", "(0040,0100)[0].Modality=CT",
                 "AccessionNumber")
        _findscu(broker.dicom_port, "CT_ROOM2", "(0040,0100)[0].Modality=MR",
                 "AccessionNumber")
        # The exam starts: IN PROGRESS goes to the outbox, the RIS refuses it (AR).
        outcome = send_mpps("in-progress", accession="ACC-BR-1", host="127.0.0.1",
                            port=broker.dicom_port, calling_aet="CT_ROOM1", modality="CT")
        assert outcome.status == 0
        wait_for(lambda: "dead-lettered" in broker.log(), timeout=20, what="the dead letter")

        # Log in (a wrong password first).
        browser.get(f"{broker.url}/worklist")
        assert "/login" in browser.current_url
        shots("login")
        browser.find_element(By.ID, "name").send_keys("olga")
        browser.find_element(By.ID, "password").send_keys("wrong")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: "Wrong user name or password" in browser.page_source, timeout=10,
                 what="the refused login")
        browser.find_element(By.ID, "name").send_keys("olga")
        browser.find_element(By.ID, "password").send_keys("pw-olga")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(lambda: browser.current_url.endswith("/worklist"), timeout=10,
                 what="the worklist after logging in")
        assert "ACC-BR-1" in browser.page_source
        shots("worklist-today")

        # Search a patient.
        box = browser.find_element(By.ID, "search")
        box.clear()
        box.send_keys("browser")
        box.submit()
        wait_for(lambda: "search=browser" in browser.current_url, timeout=10,
                 what="the search results")
        rows = browser.find_elements(By.CSS_SELECTOR, "table.grid tbody tr")
        assert len(rows) == 1 and "BROWSER, BETTY" in rows[0].text
        shots("worklist-search")

        # Open the order; read its timeline.
        rows[0].find_element(By.LINK_TEXT, "ACC-BR-1").click()
        assert "/orders/ACC-BR-1" in browser.current_url
        timeline = browser.find_element(By.CSS_SELECTOR, "ol.timeline").text
        assert "ORM^O01" in timeline or "HL7" in timeline.upper()
        assert "MPPS" in timeline
        assert "CT_ROOM1" in timeline
        shots("order")

        # Why is it not on CT_ROOM2's worklist?
        def picker_lists_ct_room2() -> bool:
            browser.refresh()
            return "CT_ROOM2" in browser.find_element(By.ID, "calling_ae").text

        wait_for(picker_lists_ct_room2, timeout=10, interval=0.3,
                 what="CT_ROOM2's query, recorded")
        Select(browser.find_element(By.ID, "calling_ae")).select_by_visible_text("CT_ROOM2")
        browser.find_element(By.ID, "ask-why-not").click()
        explanation = browser.find_element(By.CSS_SELECTOR, ".explain").text
        assert "excluded" in explanation
        assert "MR" in explanation and "CT" in explanation
        browser.execute_script(
            "document.getElementById('why-not').scrollIntoView()")
        shots("why-not")

        # Fix the mapping, then replay the refused message from its page.
        mapping.write_text(original.replace(
            "AccessionNumber: {from: OBR-18, required: true}",
            "AccessionNumber: {from: [OBR-18, OBR-20], required: true}"))
        wait_for(lambda: "mapping reloaded" in broker.log(), timeout=15, what="the reload")
        browser.find_element(By.LINK_TEXT, "Messages").click()
        refused_row = browser.find_element(By.CSS_SELECTOR, "tr.refused")
        assert "BR-BAD" in refused_row.text and "OBR-18" in refused_row.text
        shots("messages")
        refused_row.find_element(By.CSS_SELECTOR, "td a").click()
        marked = browser.find_element(By.CSS_SELECTOR, "pre.hl7 mark")
        assert marked.get_attribute("title") == "OBR-18" and "empty" in marked.text
        shots("message-refused")
        browser.find_element(By.ID, "replay").click()
        assert "Replayed: AA" in browser.find_element(By.CSS_SELECTOR, ".note").text
        shots("message-replayed")

        # Retry the dead letter once the RIS accepts again.
        ris.ack_code = "AA"
        browser.find_element(By.LINK_TEXT, "Queues").click()
        retry = browser.find_element(By.CSS_SELECTOR, "button[id^=retry-outbox-]")
        shots("queues-dead-letter")
        retry.click()
        assert "will be sent again" in browser.find_element(By.CSS_SELECTOR, ".note").text
        wait_for(lambda: any("ACC-BR-1" in m for m in ris.received) and
                 "IP" in ris.received[-1], timeout=20, what="the retried status message")

        # The timeline, as JSON too: the HL7 message, the C-FIND that gave it to CT_ROOM1,
        # the MPPS, the status message ACKed by the RIS after the operator's retry.
        import httpx

        def timeline_kinds() -> list[dict]:
            events = httpx.get(f"{broker.url}/api/worklist/ACC-BR-1/timeline",
                               auth=("olga", "pw-olga")).json()["timeline"]
            return events if any("ACK" in e["title"] for e in events) else []

        events = wait_for(timeline_kinds, timeout=15, interval=0.3,
                          what="the ACK in the timeline")
        kinds = {e["kind"] for e in events}
        assert {"hl7", "cfind", "mpps", "status_message", "operator"} <= kinds, kinds
        assert any(e["kind"] == "cfind" and "CT_ROOM1" in e["title"] + e["detail"]
                   for e in events)
        assert not any(e["kind"] == "cfind" and "CT_ROOM2" in e["title"] + e["detail"]
                       for e in events)
        metrics = httpx.get(f"{broker.url}/metrics").text
        assert ('worklist_broker_mpps_events_total{operation="create",outcome="success",'
                'status="IN PROGRESS"} 1.0') in metrics
        assert 'worklist_broker_hl7_messages_total{ack_code="AE",message_type="ORM^O01"}' in (
            metrics)
        assert 'worklist_broker_cfind_matches_total{calling_ae="CT_ROOM1"}' in metrics
        browser.get(f"{broker.url}/orders/ACC-BR-1")
        timeline = browser.find_element(By.CSS_SELECTOR, "ol.timeline").text
        assert "olga" in timeline
        shots("order-after-retry")
        browser.get(f"{broker.url}/status")
        assert "RIS^HOSP" in browser.page_source
        shots("status")
        browser.get(f"{broker.url}/mapping")
        browser.find_element(By.ID, "message").send_keys(
            orm(control_id="MT-1", accession="ACC-MT").replace("\r", "\n"))
        browser.find_element(By.CSS_SELECTOR, "form button.primary").click()
        mapped = browser.find_element(By.CSS_SELECTOR, "table.grid").text
        assert "AccessionNumber ACC-MT OBR-18" in mapped
        shots("mapping")
    finally:
        assert broker.stop() == 0
        ris.close()
