"""The SCP's audit events over TLS: DCMTK's echoscu / findscu with client certificates, the
certificate subject recorded with each accepted and rejected association."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import AuditEvent, Kind, list_events
from broker.audit_trail import AuditTrail
from broker.config import DicomConfig
from broker.dicom.scp import DicomServer
from broker.store import Store
from broker.tls import listener_source
from tests.dicom.scu import findscu
from tests.dicom.test_tls import _tls_args, _tls_config, echoscu
from tests.support import free_port, wait_for
from tests.tls_certs import Pki, shared_pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


@pytest.fixture
def audited(worklist_store: Store, pki: Pki) -> Iterator[tuple[DicomServer, AuditTrail]]:
    tls = _tls_config(pki, allowed_subjects={"CT1_AE": ["CT1"]})
    config = DicomConfig(host="127.0.0.1", port=free_port(), network_timeout_seconds=10,
                         tls=tls, allowed_calling_ae_titles=["CT1_AE", "FINDSCU", "ECHOSCU"])
    trail = AuditTrail(worklist_store, flush_seconds=3600)
    server = DicomServer(config, worklist_store, audit=trail,
                         tls=listener_source(tls, base_dir=REPO, where="dicom.tls"))
    server.start()
    yield server, trail
    server.stop()


def test_associations_and_cfind_over_tls_are_audited_with_the_certificate_subject(
        audited: tuple[DicomServer, AuditTrail], worklist_store: Store, pki: Pki,
        tmp_path: Path) -> None:
    server, trail = audited
    assert server.tls_port is not None
    rows = findscu(server.tls_port, "AccessionNumber=ACC-MR-1", "PatientName",
                   out_dir=tmp_path, options=("-aet", "CT1_AE", *_tls_args(pki)))
    assert [row.AccessionNumber for row in rows] == ["ACC-MR-1"]
    wrong = echoscu(server.tls_port, "-aet", "CT1_AE", *_tls_args(pki, "other-client"))
    assert wrong.returncode != 0
    assert echoscu(server.port, "-aet", "UNKNOWN").returncode != 0  # not an allowed AE
    assert echoscu(server.port).returncode == 0  # plain: no subject
    trail.flush()
    with worklist_store.reading() as session:
        ct1 = list_events(session, actor="CT1_AE")
        unknown = list_events(session, actor="UNKNOWN")
        echo = list_events(session, actor="ECHOSCU")
    assert [(e.kind, e.outcome, e.tls_subject) for e in ct1] == [
        (Kind.ASSOCIATION_ACCEPTED, "accepted", "O=Test Hospital,CN=CT1"),
        (Kind.CFIND, "success", None),
        (Kind.ASSOCIATION_REJECTED, "rejected", "O=Test Hospital,CN=CT2")]
    assert ct1[1].accessions == ("ACC-MR-1",) and ct1[1].detail == {"matches": 1, "sent": 1}
    assert all(e.address and e.address.startswith("127.0.0.1:") for e in ct1)
    assert [(e.kind, e.tls_subject) for e in unknown] == [(Kind.ASSOCIATION_REJECTED, None)]
    assert [(e.kind, e.tls_subject) for e in echo] == [(Kind.ASSOCIATION_ACCEPTED, None)]


def test_mpps_requests_are_audited_with_their_status_and_accessions(
        audited: tuple[DicomServer, AuditTrail], worklist_store: Store) -> None:
    from broker.dicom.mpps_scu import mpps_uid_for, send_mpps

    server, trail = audited
    unknown = send_mpps("completed", accession="ACC-NONE", host="127.0.0.1", port=server.port,
                        calling_aet="FINDSCU")
    assert unknown.status != 0
    started = send_mpps("in-progress", accession="ACC-MR-1", host="127.0.0.1",
                        port=server.port, calling_aet="FINDSCU", modality="MR")
    assert started.status == 0
    done = send_mpps("completed", accession="ACC-MR-1", host="127.0.0.1", port=server.port,
                     calling_aet="FINDSCU")
    assert done.status == 0
    trail.flush()
    with worklist_store.reading() as session:
        events = list_events(session, actor="FINDSCU",
                             kinds=[Kind.MPPS_CREATE, Kind.MPPS_SET])
    assert [(e.kind, e.outcome, e.accessions, e.detail["status"]) for e in events] == [
        (Kind.MPPS_SET, f"0x{unknown.status:04X}", (), None),
        (Kind.MPPS_CREATE, "success", ("ACC-MR-1",), "IN PROGRESS"),
        (Kind.MPPS_SET, "success", ("ACC-MR-1",), "COMPLETED")]
    assert events[0].detail["sop_instance_uid"] == mpps_uid_for("ACC-NONE")
    assert events[1].detail["sop_instance_uid"] == mpps_uid_for("ACC-MR-1")


def test_failed_tls_handshakes_are_audited(audited: tuple[DicomServer, AuditTrail],
                                           worklist_store: Store, pki: Pki) -> None:
    server, trail = audited
    assert server.tls_port is not None
    assert echoscu(server.tls_port, *_tls_args(pki, "rogue")).returncode != 0

    def refused() -> list[AuditEvent]:
        trail.flush()  # the server notes the failure in the connection's own thread
        with worklist_store.reading() as session:
            return list_events(session, actor="", kinds=[Kind.TLS_FAILED])

    events = wait_for(refused, what="the failed handshake audited")
    assert len(events) == 1 and events[0].outcome == "refused"
    assert events[0].detail["link"] == "dicom" and events[0].detail["reason"]
    assert events[0].address and events[0].address.startswith("127.0.0.1:")
