"""DICOM over TLS: DCMTK's echoscu / findscu +tls against the SCP's TLS port, certificate
subjects per calling AE title, and MPPS forwarding to a TLS downstream."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import DicomConfig, DicomTlsConfig, MppsDestination, TlsClientConfig
from broker.dicom.mpps_forwarder import MppsForwarder
from broker.dicom.mpps_scu import send_mpps
from broker.dicom.scp import DicomServer
from broker.store import Store
from broker.tls import ContextSource, client_context, listener_source, server_context
from tests.dicom.downstream import DownstreamMpps
from tests.dicom.scu import findscu
from tests.support import dcmtk, free_port, wait_for
from tests.tls_certs import Pki, shared_pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


def _tls_config(pki: Pki, **extra: object) -> DicomTlsConfig:
    settings: dict[str, object] = {
        "port": free_port(), "certificate": pki.cert("server"), "private_key": pki.key("server"),
        "ca_certificates": pki.ca, "require_client_certificate": True,
        "handshake_timeout_seconds": 2, **extra}
    return DicomTlsConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
def tls_server(worklist_store: Store, pki: Pki) -> Iterator[DicomServer]:
    tls = _tls_config(pki, allowed_subjects={"CT1_AE": ["CT1"]})
    config = DicomConfig(host="127.0.0.1", port=free_port(), network_timeout_seconds=10,
                         tls=tls)
    server = DicomServer(config, worklist_store,
                         tls=listener_source(tls, base_dir=REPO, where="dicom.tls"))
    server.start()
    yield server
    server.stop()


def _tls_args(pki: Pki, client: str | None = "client") -> list[str]:
    if client is None:  # TLS, but no certificate of its own
        return ["+tla", "+cf", str(pki.ca)]
    return ["+tls", str(pki.key(client)), str(pki.cert(client)), "+cf", str(pki.ca)]


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-to", "10", "-aec", "WORKLISTS", *options,
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def test_findscu_and_echoscu_over_tls(tls_server: DicomServer, pki: Pki,
                                      tmp_path: Path) -> None:
    assert tls_server.tls_port is not None
    rows = findscu(tls_server.tls_port, "AccessionNumber=ACC-MR-1", "PatientName",
                   out_dir=tmp_path, options=tuple(_tls_args(pki)))
    assert [row.AccessionNumber for row in rows] == ["ACC-MR-1"]
    assert echoscu(tls_server.tls_port, *_tls_args(pki)).returncode == 0
    # The plain port serves beside it.
    assert echoscu(tls_server.port).returncode == 0


@pytest.mark.parametrize("client", [None, "expired", "rogue"])
def test_bad_client_certificates_are_refused_and_the_port_keeps_serving(
        tls_server: DicomServer, pki: Pki, client: str | None) -> None:
    assert tls_server.tls_port is not None
    refused = echoscu(tls_server.tls_port, *_tls_args(pki, client))
    assert refused.returncode != 0
    assert "Association Accepted" not in refused.stdout + refused.stderr
    assert echoscu(tls_server.tls_port, *_tls_args(pki)).returncode == 0


def test_plain_dicom_on_the_tls_port_is_refused(tls_server: DicomServer, pki: Pki) -> None:
    assert tls_server.tls_port is not None
    assert echoscu(tls_server.tls_port).returncode != 0
    assert echoscu(tls_server.tls_port, *_tls_args(pki)).returncode == 0


def test_a_silent_client_does_not_stop_the_tls_port(tls_server: DicomServer, pki: Pki) -> None:
    """pynetdicom would run the handshake in its accepting thread; ours runs per connection."""
    assert tls_server.tls_port is not None
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as silent:
        assert echoscu(tls_server.tls_port, *_tls_args(pki)).returncode == 0
        assert silent.recv(100) == b""  # closed at the 2 s handshake timeout


def test_certificate_subjects_per_calling_ae_title(tls_server: DicomServer, pki: Pki) -> None:
    assert tls_server.tls_port is not None
    tls_port = tls_server.tls_port
    assert echoscu(tls_port, "-aet", "CT1_AE", *_tls_args(pki, "client")).returncode == 0
    wrong = echoscu(tls_port, "-aet", "CT1_AE", *_tls_args(pki, "other-client"))
    assert wrong.returncode != 0
    assert "Association Rejected" in wrong.stdout + wrong.stderr
    # Over the plain port there is no certificate at all: that AE title cannot use it.
    assert echoscu(tls_server.port, "-aet", "CT1_AE").returncode != 0
    # AE titles that are not listed are not held to a subject.
    assert echoscu(tls_port, "-aet", "OTHER", *_tls_args(pki, "other-client")).returncode == 0


def test_tls_only(worklist_store: Store, pki: Pki) -> None:
    tls = _tls_config(pki, plain_port=False, require_client_certificate=False)
    plain_port = free_port()
    config = DicomConfig(host="127.0.0.1", port=plain_port, tls=tls)
    server = DicomServer(config, worklist_store,
                         tls=listener_source(tls, base_dir=REPO, where="dicom.tls"))
    server.start()
    try:
        assert server.tls_port is not None
        # No client certificate needed now; the server's is still verified by echoscu.
        assert echoscu(server.tls_port, *_tls_args(pki, None)).returncode == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=2).close()
    finally:
        server.stop()


def test_mpps_forwarded_over_tls_with_a_client_certificate(worklist_store: Store,
                                                           pki: Pki) -> None:
    downstream_tls = _tls_config(pki)
    downstream = DownstreamMpps(ssl_context=server_context(
        downstream_tls, base_dir=REPO, where="downstream"))
    good = TlsClientConfig(enabled=True, ca_certificates=pki.ca,
                           certificate=pki.cert("client"), private_key=pki.key("client"))
    no_certificate = TlsClientConfig(enabled=True, ca_certificates=pki.ca)
    destinations = [MppsDestination(ae_title="PACS", host="127.0.0.1", port=downstream.port,
                                    tls=tls) for tls in (good,)]
    config = DicomConfig(host="127.0.0.1", port=free_port(), network_timeout_seconds=10,
                         mpps_forward=destinations, mpps_forward_timeout_seconds=5,
                         mpps_forward_retry_initial_seconds=0.02,
                         mpps_forward_retry_max_seconds=0.1)
    server = DicomServer(config, worklist_store)
    server.start()
    try:
        def forwarder(tls: TlsClientConfig) -> MppsForwarder:
            source = ContextSource(lambda: client_context(
                tls, host="127.0.0.1", base_dir=REPO, where="t"), "t")
            return MppsForwarder(worklist_store, config, batch_size=10,
                                 tls={destinations[0].key: source})

        status = send_mpps("in-progress", accession="ACC-CT-1", host="127.0.0.1",
                           port=server.port, modality="CT", timeout=10).status
        assert status == 0
        # Without the client certificate the downstream refuses the handshake: delayed.
        refused = forwarder(no_certificate).run_once()
        assert (refused.sent, refused.failed) == (0, 1)
        assert downstream.received == []
        sent = forwarder(good)
        wait_for(lambda: sent.run_once().sent == 1, timeout=15, what="the forward over TLS")
        assert [r.operation for r in downstream.wait_for(1)] == ["create"]
    finally:
        server.stop()
        downstream.close()


def test_unreachable_reason_names_the_tls_failure(worklist_store: Store, pki: Pki,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from broker.dicom.mpps_scu import MppsScuError, associate

    downstream = DownstreamMpps(ssl_context=server_context(
        _tls_config(pki, require_client_certificate=False), base_dir=REPO, where="d"))
    try:
        foreign = client_context(TlsClientConfig(enabled=True,
                                                 ca_certificates=pki.cert("rogue-ca")),
                                 host="127.0.0.1", base_dir=REPO, where="t")
        with pytest.raises(MppsScuError, match="TLS handshake failed: CERTIFICATE_VERIFY"):
            associate("127.0.0.1", downstream.port, called_aet="PACS", calling_aet="WLB",
                      timeout=5, tls=(foreign, None))
        # pynetdicom's own traceback for it is kept out of the log.
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        downstream.close()


def test_tls_sockets_acknowledge_at_once(tls_server: DicomServer, pki: Pki) -> None:
    """TCP_NODELAY and quick ACKs on TLS connections too (else ~40 ms per poll)."""
    from pynetdicom import evt

    from broker.dicom.scp import _QuickAckSSLSocket

    seen: list[tuple[type, int]] = []

    def check(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append((type(sock), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    listener = tls_server._tls_server
    assert listener is not None and tls_server.tls_port is not None
    listener.bind(evt.EVT_ACCEPTED, check)
    assert echoscu(tls_server.tls_port, *_tls_args(pki)).returncode == 0
    assert seen and seen[0][0] is _QuickAckSSLSocket and seen[0][1] != 0
