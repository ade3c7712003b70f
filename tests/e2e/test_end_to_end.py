"""The whole loop with real peers: RIS order over MLLP -> findscu -> MPPS -> RIS status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from broker.dicom.mpps_scu import mpps_uid_for
from hl7_listener.mllp import MllpClient
from tests.dicom.downstream import DownstreamMpps
from tests.e2e.broker_process import REPO, BrokerProcess, start_broker
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import dcmtk, free_port, wait_for

ORDER = orm(control_id="MSG-E2E-1", accession="ACC-E2E-1", placer="PLC-E2E", filler="FIL-E2E",
            start="{date}093000", code="CT-HEAD^CT Head without contrast^LOCAL")


def findscu(port: int, *keys: str, out_dir: Path) -> list[pydicom.Dataset]:
    """Run DCMTK's findscu as a modality would and return the responses it received."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-W", "-aec", "WORKLISTS", "-to", "10", "-X", "-od", str(out_dir)]
    for key in keys:
        args += ["-k", key]
    done = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, timeout=30,
                          text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def fake_ris():
    ris = FakeRis()
    yield ris
    ris.close()


@pytest.fixture
def broker(tmp_path, fake_ris):
    process = start_broker(tmp_path, ris_port=fake_ris.port)
    yield process
    process.stop()


def test_order_to_worklist_to_mpps_to_ris(broker: BrokerProcess, fake_ris: FakeRis, tmp_path):
    today = "20261129"
    with MllpClient("127.0.0.1", broker.hl7_port) as client:
        ack = client.send(ORDER.format(date=today).encode())
    assert field_of(ack.decode(), "MSA", 1) == "AA"
    assert field_of(ack.decode(), "MSA", 2) == "MSG-E2E-1"

    rows = findscu(broker.dicom_port, "AccessionNumber=ACC-E2E-1", "PatientName",
                   "(0040,0100)[0].Modality", "(0040,0100)[0].ScheduledProcedureStepStartDate",
                   "StudyInstanceUID", out_dir=tmp_path / "q1")
    assert len(rows) == 1
    row = rows[0]
    assert row.AccessionNumber == "ACC-E2E-1"
    assert str(row.PatientName) == "MUSTERMANN^ERIKA"
    assert row.ScheduledProcedureStepSequence[0].Modality == "CT"
    assert row.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == today
    assert "PatientID" not in row  # only the keys asked for come back
    study_uid = row.StudyInstanceUID

    by_modality = findscu(broker.dicom_port, "(0040,0100)[0].Modality=CT", "AccessionNumber",
                          out_dir=tmp_path / "q2")
    assert [r.AccessionNumber for r in by_modality] == ["ACC-E2E-1"]
    assert findscu(broker.dicom_port, "(0040,0100)[0].Modality=MR", "AccessionNumber",
                   out_dir=tmp_path / "q3") == []

    started = run_cli("mpps", "in-progress", "--accession", "ACC-E2E-1", "--port",
                      str(broker.dicom_port), "--study-uid", study_uid, "--modality", "CT")
    assert started.returncode == 0, started.stderr
    messages = fake_ris.wait_for_messages(1)
    completed = run_cli("mpps", "completed", "--accession", "ACC-E2E-1", "--port",
                        str(broker.dicom_port))
    assert completed.returncode == 0, completed.stderr
    messages = fake_ris.wait_for_messages(2)

    assert [field_of(m, "ORC", 5) for m in messages] == ["IP", "CM"]
    for message in messages:
        assert field_of(message, "MSH", 9).startswith("ORM^O01")
        assert field_of(message, "ORC", 1) == "SC"
        assert field_of(message, "ORC", 2).split("^")[0] == "PLC-E2E"
        assert field_of(message, "ORC", 3).split("^")[0] == "FIL-E2E"
        assert field_of(message, "OBR", 18) == "ACC-E2E-1"
    # A completed step leaves the worklist.
    assert findscu(broker.dicom_port, "AccessionNumber=ACC-E2E-1", out_dir=tmp_path / "q4") == []

    assert broker.stop() == 0
    log = broker.log()
    assert "Traceback" not in log
    assert "broker stopped" in log


def test_cancel_removes_the_item_and_bad_message_gets_a_reason(broker: BrokerProcess, tmp_path):
    with MllpClient("127.0.0.1", broker.hl7_port) as client:
        assert field_of(client.send(ORDER.format(date="20261130").encode()).decode(),
                        "MSA", 1) == "AA"
        nak = client.send(ORDER.replace("ACC-E2E-1", "").replace("MSG-E2E-1", "MSG-E2E-BAD")
                          .format(date="20261130").encode())
        cancel = ORDER.replace("ORC|NW", "ORC|CA").replace("MSG-E2E-1", "MSG-E2E-2")
        cancel_ack = client.send(cancel.format(date="20261130").encode())
    assert field_of(nak.decode(), "MSA", 1) == "AE"
    assert "OBR-18" in nak.decode()
    assert field_of(cancel_ack.decode(), "MSA", 1) == "AA"
    assert findscu(broker.dicom_port, "AccessionNumber=ACC-E2E-1", out_dir=tmp_path / "q") == []


def test_samples_load_and_answer_the_companion_queries(tmp_path):
    broker = start_broker(tmp_path, "--load-samples")
    try:
        wait_for(lambda: "loaded" in broker.log(), timeout=30, what="samples to load")
        assert "loaded 8 of the sample messages" in broker.log()
        # (A second -k naming the same key would reset its value: findscu keeps the last.)
        mr = findscu(broker.dicom_port, "(0040,0100)[0].Modality=MR", "AccessionNumber",
                     out_dir=tmp_path / "mr")
        assert mr and all(r.ScheduledProcedureStepSequence[0].Modality == "MR" for r in mr)
        # The companion's query by accession, exactly as its users typed it.
        accession = mr[0].AccessionNumber
        done = subprocess.run([dcmtk("findscu"), "-v", "-W", "-k", f"AccessionNumber={accession}",
                               "127.0.0.1", str(broker.dicom_port)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert accession in done.stdout + done.stderr
        modalities = {r.ScheduledProcedureStepSequence[0].Modality for r in findscu(
            broker.dicom_port, "(0040,0100)[0].Modality", "AccessionNumber",
            out_dir=tmp_path / "all")}
        assert {"CT", "MR", "US", "CR"} <= modalities
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "WORKLISTS", "127.0.0.1",
                               str(broker.dicom_port)], capture_output=True, timeout=30)
        assert echo.returncode == 0
    finally:
        assert broker.stop() == 0
    assert "Traceback" not in broker.log()


def test_invalid_config_stops_startup_with_one_line(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text(f"dicom: {{port: not-a-port}}\nmapping: {REPO / 'config' / 'mapping.yaml'}\n")
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "dicom.port" in lines[0]


def test_ctrl_c_stops_cleanly(tmp_path):
    import signal

    broker = start_broker(tmp_path)
    broker.process.send_signal(signal.SIGINT)
    assert broker.process.wait(timeout=20) == 0
    log = broker.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert "broker stopped" in log


def test_unreachable_database_is_one_line_error(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text("database: {url: 'postgresql+psycopg://nobody@127.0.0.1:1/none'}\n"
                    f"mapping: {REPO / 'config' / 'mapping.yaml'}\n")
    done = run_cli("serve", "--config", str(path))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("worklist-broker: error: database:")


def test_mapping_reloads_on_sighup_and_a_bad_edit_keeps_the_old_one(tmp_path):
    import signal

    mapping = tmp_path / "mapping.yaml"
    original = (REPO / "config" / "mapping.yaml").read_text()
    mapping.write_text(original)
    broker = start_broker(tmp_path, mapping=str(mapping))
    try:
        mapping.write_text("attributes: {PatientNme: PID-5}\n")
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "mapping not reloaded" in broker.log(), what="the refused reload")
        with MllpClient("127.0.0.1", broker.hl7_port) as client:
            assert field_of(client.send(orm(accession="R-1").encode()).decode(), "MSA", 1) == (
                "AA")
            # A valid edit: the accession now comes from OBR-20 (SPS-1 in the test order).
            mapping.write_text(original.replace("AccessionNumber: {from: OBR-18",
                                                "AccessionNumber: {from: OBR-20"))
            broker.process.send_signal(signal.SIGHUP)
            wait_for(lambda: "mapping reloaded" in broker.log(), what="the reload")
            client.send(orm(accession="R-2", control_id="MSG-R2").encode())
        rows = findscu(broker.dicom_port, "AccessionNumber", out_dir=tmp_path / "q")
        assert sorted(r.AccessionNumber for r in rows) == ["R-1", "SPS-1"]
        # No signal: the periodic check notices the edit by itself.
        mapping.write_text(original + "\n# edited\n")
        wait_for(lambda: broker.log().count("mapping reloaded") == 2, timeout=15,
                 what="the reload after a file change")
    finally:
        assert broker.stop() == 0


def test_status_messages_survive_sigkill_and_arrive_in_order_after_restart(tmp_path):
    import signal

    database = f"sqlite:///{tmp_path / 'worklist.db'}"
    down_ris = FakeRis(ack_code="AE")  # answers, but refuses everything: messages stay
    first = start_broker(tmp_path / "one", database_url=database, ris_port=down_ris.port)
    try:
        with MllpClient("127.0.0.1", first.hl7_port) as client:
            for n in (1, 2):
                client.send(orm(accession=f"K{n}", control_id=f"K{n}").encode())
        for n in (1, 2):
            for action in ("in-progress", "completed"):
                done = run_cli("mpps", action, "--accession", f"K{n}", "--port",
                               str(first.dicom_port))
                assert done.returncode == 0, done.stderr
        down_ris.wait_for_messages(1)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        down_ris.close()
    ris = FakeRis()
    second = start_broker(tmp_path / "two", database_url=database, ris_port=ris.port)
    try:
        messages = ris.wait_for_messages(4, timeout=30)
        by_order = {a: [field_of(m, "ORC", 5) for m in messages if field_of(m, "OBR", 18) == a]
                    for a in ("K1", "K2")}
        assert by_order == {"K1": ["IP", "CM"], "K2": ["IP", "CM"]}
    finally:
        second.stop()
        ris.close()


def test_mpps_reaches_a_downstream_scp_that_comes_up_late_in_order(tmp_path):
    pacs_port = free_port()
    broker = start_broker(tmp_path, dicom={
        "mpps_forward": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "mpps_forward_retry_initial_seconds": 0.2, "mpps_forward_retry_max_seconds": 0.5})
    pacs: DownstreamMpps | None = None

    def forwards() -> list[list[str]]:
        done = run_cli("mpps-forward", "list", "--config", str(broker.config_path))
        assert done.returncode == 0, done.stderr
        return [line.split("\t") for line in done.stdout.splitlines()[1:]]

    try:
        with MllpClient("127.0.0.1", broker.hl7_port) as client:
            assert field_of(client.send(orm(accession="FWD-1", control_id="FWD-1").encode())
                            .decode(), "MSA", 1) == "AA"
        for action in ("in-progress", "completed"):
            done = run_cli("mpps", action, "--accession", "FWD-1", "--port",
                           str(broker.dicom_port))
            assert done.returncode == 0, done.stderr  # the modality never waits for the PACS
        wait_for(lambda: (rows := forwards()) and all("cannot reach PACS" in row[-1]
                                                      for row in rows),
                 timeout=20, what="a failed attempt at the PACS")

        pacs = DownstreamMpps(port=pacs_port)
        create, update = pacs.wait_for(2, timeout=30)
        uid = mpps_uid_for("FWD-1")
        assert [(r.operation, r.sop_instance_uid) for r in (create, update)] == [
            ("create", uid), ("set", uid)]
        assert create.dataset.ScheduledStepAttributesSequence[0].AccessionNumber == "FWD-1"
        assert create.calling_ae_title == "WORKLISTS"
        assert update.dataset.PerformedProcedureStepStatus == "COMPLETED"
        wait_for(lambda: [row[1:3] for row in forwards()] == [["sent", "set"],
                                                              ["sent", "create"]],
                 timeout=20, what="both forwards marked sent")
    finally:
        assert broker.stop() == 0
        if pacs is not None:
            pacs.close()
    assert len(pacs.received) == 2  # nothing sent twice
    assert "Traceback" not in broker.log()
    assert "MPPS forwarded to PACS@127.0.0.1" in broker.log()
