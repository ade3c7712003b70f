"""The order timeline and "why is it not on the worklist?" against the real broker: an order
over MLLP, C-FINDs by DCMTK's findscu as two modalities, MPPS, status messages ACKed by the
fake RIS; then the ``timeline`` and ``why-not`` commands read what the broker recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hl7_listener.mllp import MllpClient
from tests.dicom.scu import findscu
from tests.e2e.broker_process import start_broker
from tests.e2e.test_end_to_end import run_cli
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import fresh_pg_store, wait_for

DAY = "20261129"


# Once, on PostgreSQL (several brokers on one database): the SQL behind it runs on both
# backends in its unit tests, and this end-to-end run costs 14-18 s on a 2-core machine.
@pytest.fixture(params=["postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worklist.db'}"
        return
    with fresh_pg_store() as store:
        yield store.url


def test_timeline_and_why_not_of_an_order(tmp_path: Path, database_url: str):
    ris = FakeRis()
    broker = start_broker(tmp_path, database_url=database_url, ris_port=ris.port, dicom={
        "record_flush_seconds": 0.2,
        "modalities": {"CT_ROOM1": {"only_own_items": True, "modality": "CT"}}})
    config = str(broker.config_path)
    try:
        with MllpClient("127.0.0.1", broker.hl7_port) as client:
            ack = client.send(orm(control_id="TL-1", accession="ACC-TL-1", modality="MR",
                                  start=f"{DAY}093000").encode()).decode()
        assert field_of(ack, "MSA", 1) == "AA"

        given = findscu(broker.dicom_port, "AccessionNumber", "(0040,0100)[0].Modality=MR",
                        f"(0040,0100)[0].ScheduledProcedureStepStartDate={DAY}",
                        out_dir=tmp_path / "mr", options=("-aet", "MR_ROOM1"))
        assert [r.AccessionNumber for r in given] == ["ACC-TL-1"]
        missed = findscu(broker.dicom_port, "AccessionNumber", "(0040,0100)[0].Modality=CT",
                         out_dir=tmp_path / "ct", options=("-aet", "CT_ROOM1"))
        assert missed == []

        for action in ("in-progress", "completed"):
            done = run_cli("mpps", action, "--accession", "ACC-TL-1", "--port",
                           str(broker.dicom_port), "--calling-aet", "MR_ROOM1")
            assert done.returncode == 0, done.stderr
        ris.wait_for_messages(2)

        def timeline() -> list[str] | None:
            done = run_cli("timeline", "ACC-TL-1", "--config", config)
            assert done.returncode == 0, done.stderr
            lines = done.stdout.splitlines()
            acked = sum("ACKed by the RIS" in line for line in lines)
            return lines if acked == 2 and any("\tcfind\t" in line for line in lines) else None

        lines = wait_for(timeline, timeout=20, interval=0.3, what="the full timeline")
        kinds = [line.split("\t")[1] for line in lines]
        assert kinds[0] == "hl7"
        assert "HL7 ORM^O01 received, answered AA" in lines[0]
        assert "MSH-10 TL-1" in lines[0]
        cfind = [line for line in lines if "\tcfind\t" in line]
        assert len(cfind) == 1 and "Given to MR_ROOM1 in C-FIND answers\tonce" in cfind[0]
        assert not any("CT_ROOM1" in line for line in lines)
        mpps = [line.split("\t")[2] for line in lines if "\tmpps\t" in line]
        assert mpps == ["MPPS N-CREATE: IN PROGRESS", "MPPS N-SET: COMPLETED"]
        status = [line.split("\t")[2] for line in lines if "\tstatus_message\t" in line]
        assert status == ["status message ORC-5 IP queued for the RIS",
                          "status message ORC-5 IP sent, ACKed by the RIS",
                          "status message ORC-5 CM queued for the RIS",
                          "status message ORC-5 CM sent, ACKed by the RIS"]
        assert kinds.index("hl7") < kinds.index("cfind") < kinds.index("mpps")

        # CT_ROOM1 asked for CT and sees only its own station: both keys excluded the item;
        # by now the step is also COMPLETED, which the site does not show.
        why = run_cli("why-not", "ACC-TL-1", "--aet", "CT_ROOM1", "--config", config)
        assert why.returncode == 0, why.stderr
        assert "not matched" in why.stdout.splitlines()[0]
        assert "NO\tModality: asked CT, item MR" in why.stdout
        assert "NO\tstatus COMPLETED is not visible" in why.stdout
        assert "NO\tonly_own_items: station CT_ROOM1" in why.stdout

        unknown = run_cli("why-not", "NOPE", "--aet", "CT_ROOM1", "--config", config)
        assert unknown.returncode == 1
        assert unknown.stderr.strip().splitlines() == [
            "worklist-broker: error: no worklist item with accession number NOPE"]
        nobody = run_cli("timeline", "NOPE", "--config", config)
        assert nobody.returncode == 1
        assert len(nobody.stderr.strip().splitlines()) == 1 and "NOPE" in nobody.stderr
        assert run_cli("why-not", "ACC-TL-1", "--aet", "NEVER", "--config", config
                       ).returncode == 1
    finally:
        assert broker.stop() == 0
        ris.close()
    assert "Traceback" not in broker.log()
