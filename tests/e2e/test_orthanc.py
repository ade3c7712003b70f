"""The Orthanc link with real peers: a real Orthanc (Debian's 1.10), studies sent to it with
DCMTK's storescu, the real broker following its change feed, findscu as the modality and the
fake RIS receiving the completions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from hl7_listener.mllp import MllpClient
from tests.e2e.broker_process import BrokerProcess, start_broker
from tests.e2e.test_end_to_end import findscu, run_cli
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.orthanc_process import PASSWORD, USER, OrthancProcess
from tests.support import wait_for

OUTAGE = "Orthanc change feed not read"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    process = OrthancProcess(tmp_path_factory.mktemp("orthanc"))
    process.start()
    yield process
    process.stop()


def _broker(directory: Path, orthanc: OrthancProcess, ris: FakeRis) -> BrokerProcess:
    return start_broker(directory, ris_port=ris.port, sections={"orthanc": {
        "url": orthanc.url, "username": USER, "password": PASSWORD, "poll_seconds": 0.2,
        "timeout_seconds": 2}})


def _order(broker: BrokerProcess, accession: str, patient_id: str,
           study_uid: str | None = None) -> None:
    message = orm(control_id=f"MSG-{accession}", accession=accession, patient_id=patient_id,
                  placer=f"PL-{accession}", study_uid=study_uid)
    with MllpClient("127.0.0.1", broker.hl7_port) as client:
        assert field_of(client.send(message.encode()).decode(), "MSA", 1) == "AA"


def _study_uid(broker: BrokerProcess, accession: str, out: Path) -> str:
    [row] = findscu(broker.dicom_port, f"AccessionNumber={accession}", "StudyInstanceUID",
                    out_dir=out)
    return str(row.StudyInstanceUID)


def _completions(ris: FakeRis, count: int) -> list[tuple[str, str]]:
    return [(field_of(m, "OBR", 18), field_of(m, "ORC", 5))
            for m in ris.wait_for_messages(count, timeout=40)]


def test_stable_studies_complete_their_orders_once_across_restarts_and_outages(
        orthanc: OrthancProcess, tmp_path: Path):
    ris = FakeRis()
    broker: BrokerProcess | None = None
    try:
        # Orthanc's history: a study it held before the broker first followed it.
        history_uid = generate_uid()
        orthanc.send_study(tmp_path / "h", study_uid=history_uid, accession="ACC-OR-H",
                           patient_id="PAT-H")
        wait_for(lambda: history_uid in orthanc.stable_studies(), 20, interval=0.2,
                 what="the history study to be stable")
        broker = _broker(tmp_path / "broker", orthanc, ris)
        wait_for(lambda: "following the change feed" in broker.log(), 15,
                 what="the broker to follow Orthanc")
        _order(broker, "ACC-OR-H", "PAT-H", study_uid=history_uid)
        _order(broker, "ACC-OR-1", "PAT-1")
        _order(broker, "ACC-OR-2", "PAT-2")
        _order(broker, "ACC-OR-3", "PAT-3")

        # The modality took the Study Instance UID from the worklist.
        uid1 = _study_uid(broker, "ACC-OR-1", tmp_path / "q1")
        orthanc.send_study(tmp_path / "s1", study_uid=uid1, accession="ACC-OR-1",
                           patient_id="PAT-1")
        orthanc.send_study(tmp_path / "sx", study_uid=generate_uid(), accession="NO-ORDER",
                           patient_id="PAT-X")
        assert _completions(ris, 1) == [("ACC-OR-1", "CM")]
        assert findscu(broker.dicom_port, "AccessionNumber=ACC-OR-1",
                       out_dir=tmp_path / "q2") == []

        def unmatched_listed() -> bool:
            done = run_cli("studies", "list", "--unmatched", "--config",
                           str(broker.config_path))
            assert done.returncode == 0, done.stderr
            return "NO-ORDER" in done.stdout and "ACC-OR-1" not in done.stdout

        wait_for(unmatched_listed, 20, interval=0.3, what="the unmatched study to be listed")
        # What Orthanc held before is history: not recorded, its order stays on the worklist.
        listed = run_cli("studies", "list", "--config", str(broker.config_path)).stdout
        assert "ACC-OR-1" in listed and "ACC-OR-H" not in listed
        assert len(findscu(broker.dicom_port, "AccessionNumber=ACC-OR-H",
                           out_dir=tmp_path / "q3")) == 1
        assert broker.stop() == 0

        # Broker down: the images of ACC-OR-2 arrive (the modality made its own Study
        # Instance UID, so accession and patient ID match). Then Orthanc goes down too.
        uid2 = generate_uid()
        orthanc.send_study(tmp_path / "s2", study_uid=uid2, accession="ACC-OR-2",
                           patient_id="PAT-2")
        wait_for(lambda: uid2 in orthanc.stable_studies(), 20, interval=0.2,
                 what="the ACC-OR-2 study to be stable")
        orthanc.stop()
        broker = _broker(tmp_path / "broker", orthanc, ris)
        wait_for(lambda: OUTAGE in broker.log(), 15, what="the outage to be logged")
        assert len(findscu(broker.dicom_port, "AccessionNumber=ACC-OR-2",
                           out_dir=tmp_path / "q4")) == 1  # the broker keeps serving
        orthanc.start()
        assert _completions(ris, 2)[1] == ("ACC-OR-2", "CM")

        # A last study: its completion comes after any repeat of the earlier ones would have.
        uid3 = _study_uid(broker, "ACC-OR-3", tmp_path / "q5")
        orthanc.send_study(tmp_path / "s3", study_uid=uid3, accession="ACC-OR-3",
                           patient_id="PAT-3")
        assert _completions(ris, 3) == [("ACC-OR-1", "CM"), ("ACC-OR-2", "CM"),
                                        ("ACC-OR-3", "CM")]
        log = broker.log()
        assert log.count(OUTAGE) == 1  # once per outage
        assert "answers again" in log
        assert broker.stop() == 0
        assert "Traceback" not in broker.log()
        assert len(ris.received) == 3
    finally:
        if broker is not None:
            broker.stop()
        ris.close()


def test_the_follower_job_step_by_step(orthanc: OrthancProcess, tmp_path: Path, sqlite_store,
                                       caplog: pytest.LogCaptureFixture):
    """The follower job itself, run step by step: history skipped, one follower at a time,
    an error logged once, a feed that restarts below the cursor (a replaced Orthanc
    database) followed from its start."""
    import logging

    from broker.config import OrthancConfig
    from broker.domain import DEFAULT_REPORTING
    from broker.orthanc.follower import OrthancFollower
    from broker.studies import advance_feed, feed_position
    from tests.test_studies import _order, _status

    caplog.set_level(logging.INFO, logger="broker.orthanc.follower")
    # Studies stored before the first follow are history.
    old_uid = generate_uid()
    _order(sqlite_store, "F-OLD", uid=old_uid)
    orthanc.send_study(tmp_path / "s0", study_uid=old_uid, accession="F-OLD", patient_id="P1")
    wait_for(lambda: old_uid in orthanc.stable_studies(), 20, interval=0.2)
    config = OrthancConfig(url=orthanc.url, username=USER, password=PASSWORD,
                           poll_seconds=0.05, timeout_seconds=2)
    follower = OrthancFollower(sqlite_store, config, DEFAULT_REPORTING)
    assert follower.run_once() == 0
    assert _status(sqlite_store, "F-OLD") == "SCHEDULED"

    uid = generate_uid()
    _order(sqlite_store, "F-1", uid=uid)
    orthanc.send_study(tmp_path / "s1", study_uid=uid, accession="F-1", patient_id="P1")
    wait_for(lambda: uid in orthanc.stable_studies(), 20, interval=0.2)
    # Another broker follows this database's feeds: this one leaves it alone.
    with sqlite_store.exclusive(follower.lock_name):
        assert follower.run_once() == 0
    assert follower.run_once() == 1 and _status(sqlite_store, "F-1") == "COMPLETED"
    assert follower.run_once() == 0  # nothing new

    wrong = OrthancFollower(sqlite_store, config.model_copy(update={"password": "x"}),
                            DEFAULT_REPORTING)
    for _ in range(3):  # a failure, then the backoff or failures again: one line
        assert wrong.run_once() == 0
    assert caplog.text.count("change feed not read") == 1 and "HTTP 401" in caplog.text

    # A replaced Orthanc database: its feed is far below the stored position.
    with sqlite_store.writing() as s:
        position = feed_position(s, follower.source)
        advance_feed(s, follower.source, position, position + 1_000_000)
    uid2 = generate_uid()
    _order(sqlite_store, "F-2", uid=uid2)
    orthanc.send_study(tmp_path / "s2", study_uid=uid2, accession="F-2", patient_id="P1")
    wait_for(lambda: uid2 in orthanc.stable_studies(), 20, interval=0.2)
    assert follower.run_once() >= 1
    assert _status(sqlite_store, "F-2") == "COMPLETED"
    assert "restarted its change feed" in caplog.text
