"""MPPS forwarding over real sockets: a modality -> the broker's SCP -> the forward queue ->
MppsForwarder -> a downstream MPPS SCP (a pynetdicom AE standing in for a PACS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select

from broker import mpps_forward
from broker.config import DicomConfig, MppsDestination
from broker.dicom.mpps_forwarder import ForwardReport, MppsForwarder
from broker.dicom.mpps_scu import mpps_uid_for, send_mpps
from broker.dicom.scp import DicomServer
from broker.models import MppsForward
from broker.store import Store
from tests.dicom.downstream import DownstreamMpps
from tests.support import free_port, wait_for

MR, CT = mpps_uid_for("ACC-MR-1"), mpps_uid_for("ACC-CT-1")


class Broker:
    """The broker's SCP and forwarder, configured alike, as serve builds them."""

    def __init__(self, store: Store, *ports: int, **settings: object) -> None:
        settings = {"host": "127.0.0.1", "port": free_port(), "network_timeout_seconds": 10,
                    "mpps_forward": [MppsDestination(ae_title=f"PACS{n}", host="127.0.0.1",
                                                     port=port)
                                     for n, port in enumerate(ports, start=1)],
                    "mpps_forward_timeout_seconds": 5,
                    "mpps_forward_retry_initial_seconds": 0.02,
                    "mpps_forward_retry_max_seconds": 0.1, **settings}
        config = DicomConfig(**settings)  # type: ignore[arg-type]
        self.store = store
        self.server = DicomServer(config, store)
        self.server.start()
        self.forwarder = MppsForwarder(store, config, batch_size=10)

    def mpps(self, action: str, accession: str) -> int:
        return send_mpps(action, accession=accession, host="127.0.0.1",  # type: ignore[arg-type]
                         port=self.server.port, modality=accession.split("-")[1],
                         timeout=10).status

    def rows(self) -> list[tuple[str, str, str]]:
        with self.store.reading() as session:
            return [tuple(r) for r in session.execute(
                select(MppsForward.sop_instance_uid, MppsForward.operation, MppsForward.state)
                .order_by(MppsForward.id))]

    def states(self) -> list[str]:
        return [state for _, _, state in self.rows()]

    def run_until(self, done: Callable[[], bool], what: str) -> None:
        """Run the job as the scheduler would until ``done()``; backoffs are short here."""
        wait_for(lambda: (self.forwarder.run_once(), done())[1], timeout=15, what=what)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def pacs() -> Iterator[DownstreamMpps]:
    downstream = DownstreamMpps()
    yield downstream
    downstream.close()


@pytest.fixture
def stop() -> Iterator[list[Callable[[], None]]]:
    """Things to stop after the test, in reverse order."""
    stoppers: list[Callable[[], None]] = []
    yield stoppers
    for stopper in reversed(stoppers):
        stopper()


def test_create_then_set_reach_the_downstream_with_their_datasets(worklist_store, pacs, stop):
    broker = Broker(worklist_store, pacs.port)
    stop.append(broker.stop)
    assert broker.mpps("in-progress", "ACC-MR-1") == 0
    assert broker.mpps("in-progress", "ACC-MR-1") == 0x0111  # refused: nothing to forward
    assert broker.mpps("completed", "ACC-MR-1") == 0

    assert broker.forwarder.run_once() == ForwardReport(sent=2)
    create, update = pacs.wait_for(2)
    assert [(r.operation, r.sop_instance_uid) for r in (create, update)] == [
        ("create", MR), ("set", MR)]
    assert create.calling_ae_title == "WORKLISTS"  # the broker's own AE title
    assert create.dataset.PerformedProcedureStepStatus == "IN PROGRESS"
    assert create.dataset.Modality == "MR"
    assert create.dataset.PerformedStationAETitle == "MPPS_SCU"  # the modality's, untouched
    assert create.dataset.ScheduledStepAttributesSequence[0].AccessionNumber == "ACC-MR-1"
    assert update.dataset.PerformedProcedureStepStatus == "COMPLETED"
    assert update.dataset.PerformedProcedureStepEndDate
    assert "Modality" not in update.dataset  # an N-SET carries the modification list only
    assert broker.states() == ["sent", "sent"]
    assert broker.forwarder.run_once() == ForwardReport()  # nothing sent twice
    assert len(pacs.received) == 2


def test_a_downstream_down_at_first_gets_everything_in_order_once_up(worklist_store, stop):
    port = free_port()
    # One failure status would dead-letter; being unreachable never does.
    broker = Broker(worklist_store, port, mpps_forward_max_attempts=1)
    stop.append(broker.stop)
    for action, accession in (("in-progress", "ACC-MR-1"), ("in-progress", "ACC-CT-1"),
                              ("completed", "ACC-MR-1"), ("discontinued", "ACC-CT-1")):
        assert broker.mpps(action, accession) == 0

    assert broker.forwarder.run_once() == ForwardReport(failed=4)

    def forwards() -> list[MppsForward]:
        with worklist_store.reading() as session:
            return mpps_forward.list_forwards(session)

    broker.run_until(lambda: min(row.attempts for row in forwards()) >= 2, "a second try")
    assert {(row.state, row.refusals) for row in forwards()} == {("pending", 0)}
    assert all("cannot reach" in row.last_error for row in forwards())

    pacs = DownstreamMpps(port=port)
    stop.append(pacs.close)
    broker.run_until(lambda: broker.states() == ["sent"] * 4, "every forward sent")
    # In order per step; the two steps' backoffs may interleave them either way.
    by_step = {uid: [(r.operation, r.dataset.PerformedProcedureStepStatus)
                     for r in pacs.received if r.sop_instance_uid == uid] for uid in (MR, CT)}
    assert by_step == {MR: [("create", "IN PROGRESS"), ("set", "COMPLETED")],
                       CT: [("create", "IN PROGRESS"), ("set", "DISCONTINUED")]}
    assert len(pacs.received) == 4


def test_a_failure_status_is_retried_then_dead_lettered_and_its_set_waits(worklist_store,
                                                                         stop):
    pacs = DownstreamMpps(status=0x0110)
    stop.append(pacs.close)
    broker = Broker(worklist_store, pacs.port, mpps_forward_max_attempts=3)
    stop.append(broker.stop)
    assert broker.mpps("in-progress", "ACC-MR-1") == 0
    assert broker.mpps("completed", "ACC-MR-1") == 0

    broker.run_until(lambda: broker.states() == ["failed", "pending"], "the dead letter")
    assert pacs.operations() == [("create", MR)] * 3  # never the N-SET before its N-CREATE
    with worklist_store.reading() as session:
        dead = mpps_forward.list_forwards(session, "failed")[0]
    assert (dead.attempts, dead.refusals) == (3, 3)
    assert dead.last_error == "PACS1 answered the N-CREATE with 0x0110"
    assert broker.forwarder.run_once() == ForwardReport()  # dead letters wait for an admin

    pacs.status = 0
    with worklist_store.writing() as session:
        assert mpps_forward.retry(session, dead.id) == 1
    broker.run_until(lambda: broker.states() == ["sent", "sent"], "the retried forwards")
    assert pacs.operations() == [("create", MR)] * 4 + [("set", MR)]


def test_a_lost_response_then_0111_on_the_resent_create_counts_as_delivered(worklist_store,
                                                                           pacs, stop):
    broker = Broker(worklist_store, pacs.port)
    stop.append(broker.stop)
    assert broker.mpps("in-progress", "ACC-CT-1") == 0
    assert broker.mpps("completed", "ACC-CT-1") == 0
    pacs.lose_responses = 1

    report = broker.forwarder.run_once()
    assert report == ForwardReport(failed=1)  # the N-SET waits behind the unanswered N-CREATE
    assert broker.states() == ["pending", "pending"]
    broker.run_until(lambda: broker.states() == ["sent", "sent"], "both forwards sent")
    assert pacs.operations() == [("create", CT), ("create", CT), ("set", CT)]


def test_permanent_refusals_dead_letter_at_once_per_destination(worklist_store, stop):
    picky = DownstreamMpps(allowed_calling_ae_titles=["SOMEONE_ELSE"])
    no_mpps = DownstreamMpps(mpps_supported=False)
    stop.extend([picky.close, no_mpps.close])
    broker = Broker(worklist_store, picky.port, no_mpps.port)
    stop.append(broker.stop)
    assert broker.mpps("in-progress", "ACC-MR-1") == 0

    assert broker.forwarder.run_once() == ForwardReport(failed=2)
    with worklist_store.reading() as session:
        errors = {row.destination: row.last_error
                  for row in mpps_forward.list_forwards(session, "failed")}
    assert errors[f"PACS1@127.0.0.1:{picky.port}"].startswith(
        f"PACS1 at 127.0.0.1:{picky.port} rejected the association (permanent")
    assert errors[f"PACS2@127.0.0.1:{no_mpps.port}"] == (
        f"PACS2 at 127.0.0.1:{no_mpps.port} accepted no MPPS presentation context")
    assert picky.received == [] and no_mpps.received == []
