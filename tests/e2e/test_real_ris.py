"""HL7 as real RIS send it, against the real ``worklist-broker serve``: what the RIS sends is
on the worklist a modality queries (DCMTK findscu), and every connection gets its ACK."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from hl7_listener.mllp import MllpClient
from hl7_listener.status_message import parse_ack
from tests.e2e.broker_process import BrokerProcess, start_broker
from tests.e2e.test_end_to_end import findscu
from tests.fake_ris import field_of
from tests.messages import adt, orm
from tests.support import fresh_pg_store

TODAY = dt.date.today().strftime("%Y%m%d")


def _send(broker: BrokerProcess, message: str | bytes) -> str:
    payload = message.encode() if isinstance(message, str) else message
    with MllpClient("127.0.0.1", broker.hl7_port, read_timeout=30) as client:
        return client.send(payload).decode()


def _accessions(broker: BrokerProcess, out_dir, *keys: str) -> set[str]:
    return {r.AccessionNumber for r in findscu(broker.dicom_port, "AccessionNumber", *keys,
                                               out_dir=out_dir)}


@pytest.fixture(params=["sqlite", "postgresql"])
def broker(request, tmp_path):
    """The real broker, on each database, with the issue's connection limit of 32."""
    hl7 = {"max_connections": 32}
    if request.param == "sqlite":
        process = start_broker(tmp_path, hl7=hl7)
        yield process
        process.stop()
        return
    with fresh_pg_store() as store:
        process = start_broker(tmp_path, database_url=store.url, hl7=hl7)
        yield process
        process.stop()


def test_real_ris_traffic_reaches_the_worklist(broker: BrokerProcess, tmp_path):
    # Two different orders under one MSH-10: both on the worklist.
    assert field_of(_send(broker, orm(control_id="CTRL-1", accession="DUPA1",
                                      start=f"{TODAY}0900")), "MSA", 1) == "AA"
    second = _send(broker, orm(control_id="CTRL-1", accession="DUPB2", patient_id="PAT-2",
                               start=f"{TODAY}1000"))
    assert field_of(second, "MSA", 1) == "AA" and "reused" in parse_ack(second.encode()).text
    # v2.3 with the start only in ORC-7.4, and a header as a Windows tool saves it.
    assert field_of(_send(broker, orm(control_id="ORC7", version="2.3", accession="ORC7-1",
                                      patient_id="PAT-3", start=f"{TODAY}1100",
                                      start_in="ORC-7")), "MSA", 1) == "AA"
    odd = ("\ufeff" + orm(control_id="ODD-1", version="2.5.0", accession="ODD-1",
                          patient_id="PAT-4", start=f"{TODAY}1200")
           ).replace("MSH|^~\\&|", "MSH|^~\\|", 1)
    assert field_of(_send(broker, odd), "MSA", 1) == "AA"
    polled = _accessions(broker, tmp_path / "today",
                         f"(0040,0100)[0].ScheduledProcedureStepStartDate={TODAY}")
    assert {"DUPA1", "DUPB2", "ORC7-1", "ODD-1"} <= polled
    # An ADT reusing an MSH-10 is applied too.
    assert field_of(_send(broker, adt("A08", patient_id="PAT-2", patient_name="FIRST^NAME",
                                      control_id="ADT-1")), "MSA", 1) == "AA"
    assert field_of(_send(broker, adt("A31", patient_id="PAT-2", patient_name="SECOND^NAME",
                                      control_id="ADT-1")), "MSA", 1) == "AA"
    named = findscu(broker.dicom_port, "AccessionNumber=DUPB2", "PatientName",
                    out_dir=tmp_path / "named")
    assert [str(r.PatientName) for r in named] == ["SECOND^NAME"]
    # A message refused at the header is named in the NAK.
    nak = _send(broker, orm(control_id="BADVER-1", version="9.9"))
    assert (field_of(nak, "MSA", 1), field_of(nak, "MSA", 2)) == ("AR", "BADVER-1")


def test_fifty_connections_at_once_all_get_their_ack(broker: BrokerProcess, tmp_path):
    barrier = threading.Barrier(50, timeout=30)
    acks: dict[int, str] = {}
    errors: list[BaseException] = []

    def ris_channel(n: int) -> None:
        try:
            with MllpClient("127.0.0.1", broker.hl7_port, read_timeout=60) as client:
                barrier.wait()
                acks[n] = client.send(orm(control_id=f"BURST-{n}", accession=f"B-{n}",
                                          patient_id=f"P-{n}",
                                          start=f"{TODAY}0800").encode()).decode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ris_channel, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert {n: field_of(a, "MSA", 1) for n, a in acks.items()} == {n: "AA" for n in range(50)}
    assert {f"B-{n}" for n in range(50)} <= _accessions(broker, tmp_path / "burst")
