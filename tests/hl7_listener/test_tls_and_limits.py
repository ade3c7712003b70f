"""The MLLP listener with TLS and under hostile load, over real sockets against a real store.

The misbehaving clients connect from 127.0.0.2 and the RIS from 127.0.0.1 (Linux routes the
whole 127/8 to loopback), so the per-source limit can tell them apart as it would two hosts.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select as sql_select

from broker.config import TlsClientConfig, TlsListenerConfig
from broker.models import WorklistItem
from broker.store import Store
from broker.tls import ContextSource, client_context, server_context
from hl7_listener.handler import OrderMessageHandler
from hl7_listener.mapping import load_mapping
from hl7_listener.mllp import END_BLOCK, START_BLOCK, MllpClient, MllpError, frame
from hl7_listener.server import MllpServer
from tests import tls_certs
from tests.fake_ris import FakeRis, field_of
from tests.messages import orm
from tests.support import free_port, listening, wait_for
from tests.tls_certs import Pki, shared_pki

REPO = Path(__file__).resolve().parents[2]
ATTACKER = "127.0.0.2"
FRAME_TIMEOUT = 1.0
PER_SOURCE = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


@pytest.fixture
def server(sqlite_store: Store, pki: Pki) -> Iterator[MllpServer]:
    handler = OrderMessageHandler(sqlite_store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    tls = TlsListenerConfig(port=0, certificate=pki.cert("server"),
                            private_key=pki.key("server"), ca_certificates=pki.ca,
                            require_client_certificate=True)
    source = ContextSource(lambda: server_context(tls, base_dir=REPO, where="hl7.tls"),
                           "hl7.tls")
    listener = MllpServer(handler, host="127.0.0.1", port=0, max_connections=16,
                          max_waiting=16, wait_timeout=2, idle_timeout=30,
                          max_message_bytes=64 * 1024, frame_timeout=FRAME_TIMEOUT,
                          max_per_source=PER_SOURCE, tls=source, tls_port=0,
                          handshake_timeout=2)
    listener.start()
    yield listener
    listener.stop()


def _items(store: Store) -> dict[str, str]:
    with store.reading() as s:
        return dict(s.execute(sql_select(WorklistItem.accession_number,
                                         WorklistItem.status)).all())


def _tls_ack(server: MllpServer, pki: Pki, accession: str, client: str | None = "client",
             ca: Path | None = None) -> str:
    context = tls_certs.client_context(pki, client, ca=ca)
    assert server.tls_port is not None
    with MllpClient("127.0.0.1", server.tls_port, read_timeout=5, connect_timeout=5,
                    tls=lambda: context, server_name="localhost") as mllp:
        return mllp.send(orm(control_id=f"M-{accession}", accession=accession).encode()
                         ).decode()


def _plain_ack(server: MllpServer, accession: str) -> str:
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as mllp:
        return mllp.send(orm(control_id=f"M-{accession}", accession=accession).encode()
                         ).decode()


# --- TLS ----------------------------------------------------------------------------


def test_order_over_mutual_tls_is_acked(server: MllpServer, pki: Pki,
                                        sqlite_store: Store) -> None:
    reply = _tls_ack(server, pki, "TLS-1")
    assert (field_of(reply, "MSA", 1), field_of(reply, "MSA", 2)) == ("AA", "M-TLS-1")
    # The plain port still serves beside the TLS one.
    assert field_of(_plain_ack(server, "PLAIN-1"), "MSA", 1) == "AA"
    assert _items(sqlite_store) == {"TLS-1": "SCHEDULED", "PLAIN-1": "SCHEDULED"}


@pytest.mark.parametrize("client, ca", [
    (None, None),         # no client certificate, one is required
    ("expired", None),    # expired in 2021
    ("rogue", None),      # issued by another CA
])
def test_bad_client_certificates_are_refused_and_the_listener_keeps_serving(
        server: MllpServer, pki: Pki, sqlite_store: Store, client: str | None,
        ca: Path | None, caplog: pytest.LogCaptureFixture) -> None:
    # TLS 1.3 checks the client certificate after the client thinks it is connected: the
    # refusal shows on the first read, either way no ACK comes back.
    with pytest.raises(MllpError):
        _tls_ack(server, pki, "REFUSED", client=client, ca=ca)
    # The log says why, in one line.
    wait_for(lambda: "HL7 TLS handshake with" in caplog.text, what="the refusal logged")
    reason = {None: "PEER_DID_NOT_RETURN_A_CERTIFICATE",
              "expired": "CERTIFICATE_VERIFY_FAILED: certificate has expired",
              "rogue": "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"}
    assert reason[client] in caplog.text
    assert _items(sqlite_store) == {}
    assert field_of(_tls_ack(server, pki, "AFTER"), "MSA", 1) == "AA"


def test_weak_ciphers_and_plain_mllp_are_refused_on_the_tls_port(server: MllpServer,
                                                                  pki: Pki) -> None:
    assert server.tls_port is not None
    old = tls_certs.client_context(pki)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("AES128-SHA:@SECLEVEL=0")  # no forward secrecy, CBC: outside BCP 195
    with (socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw,
          pytest.raises(ssl.SSLError)):
        old.wrap_socket(raw, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw:
        raw.sendall(frame(orm(accession="CLEAR").encode()))
        # Plain HL7 is no ClientHello: the server hangs up (after an alert), never ACKs.
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
        assert b"MSA" not in reply
    assert field_of(_tls_ack(server, pki, "STILL"), "MSA", 1) == "AA"


def test_client_verifies_the_server_certificate(pki: Pki) -> None:
    ris = FakeRis(ssl_context=server_context(
        TlsListenerConfig(port=0, certificate=pki.cert("server"),
                          private_key=pki.key("server")), base_dir=REPO, where="test"))
    try:
        def send(config: TlsClientConfig, host: str = "127.0.0.1") -> str:
            context = client_context(config, host=host, base_dir=REPO, where="ris.tls")
            from broker.tls import expected_server_name

            with MllpClient(host, ris.port, connect_timeout=5, read_timeout=5,
                            tls=lambda: context,
                            server_name=expected_server_name(config, host)) as mllp:
                return mllp.send(orm(control_id="OUT-1").encode()).decode()

        trusted = TlsClientConfig(enabled=True, ca_certificates=pki.ca)
        assert field_of(send(trusted), "MSA", 2) == "OUT-1"
        assert field_of(send(trusted, host="localhost"), "MSA", 2) == "OUT-1"
        with pytest.raises(MllpError, match="TLS handshake failed: CERTIFICATE_VERIFY_FAILED: "
                                            "unable to get local issuer certificate"):
            send(TlsClientConfig(enabled=True, ca_certificates=pki.cert("rogue-ca")))
        with pytest.raises(MllpError, match="CERTIFICATE_VERIFY_FAILED"):
            send(trusted.model_copy(update={"server_name": "ris.elsewhere.org"}))
    finally:
        ris.close()


# --- hostile load ---------------------------------------------------------------------


def _attacker(server: MllpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                    source_address=(ATTACKER, 0))


def _readable(sock: socket.socket, timeout: float = 0) -> bool:
    # poll, not select: a thousand connections take descriptors past select's 1024.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (EOF or reset), without waiting."""
    try:
        if not _readable(sock):
            return False
        return sock.recv(65536) == b""  # a reply (a NAK) is read past; EOF follows
    except OSError:
        return True


def test_a_trickling_client_is_cut_at_the_frame_timeout(server: MllpServer,
                                                        sqlite_store: Store) -> None:
    cut_after: list[float] = []

    def trickle() -> None:
        with _attacker(server) as sock:
            started = time.monotonic()
            sock.sendall(START_BLOCK)
            for byte in orm(accession="SLOW").encode()[:100]:  # 10 s at most
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                if _closed(sock):
                    break
                time.sleep(0.1)  # the attacker's pace, not a synchronisation
            cut_after.append(time.monotonic() - started)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        # Meanwhile the RIS is served on its own connection.
        assert field_of(_plain_ack(server, "RIS-1"), "MSA", 1) == "AA"
    finally:
        thread.join(15)
    assert cut_after and FRAME_TIMEOUT * 0.9 <= cut_after[0] < FRAME_TIMEOUT + 2
    assert _items(sqlite_store) == {"RIS-1": "SCHEDULED"}


def test_a_thousand_idle_connections_from_one_address_leave_room_for_the_ris(
        server: MllpServer, sqlite_store: Store) -> None:
    flood: list[socket.socket] = []
    try:
        for _ in range(1000):
            flood.append(_attacker(server))
        # PER_SOURCE are served (and idle), as many again wait for them; the rest are closed
        # at once.
        closed: set[int] = set()

        def count_closed() -> bool:
            closed.update(n for n, sock in enumerate(flood)
                          if n not in closed and _closed(sock))
            return len(closed) >= 1000 - 2 * PER_SOURCE

        wait_for(count_closed, timeout=20,
                 what="the connections past the per-source limit to be closed")
        assert len(closed) == 1000 - 2 * PER_SOURCE
        assert len(server._writers) == 2 * PER_SOURCE
        # The RIS, from another address, is served at once.
        started = time.monotonic()
        assert field_of(_plain_ack(server, "RIS-2"), "MSA", 1) == "AA"
        assert time.monotonic() - started < 2
        # The waiting ones give up after connection_wait_seconds (2 s here); the served ones
        # stay until their idle timeout (30 s here).
        wait_for(lambda: len(server._writers) == PER_SOURCE, timeout=10,
                 what="the waiting connections to be closed")
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: not server._writers, what="the flood's connections to be dropped")
    assert _items(sqlite_store) == {"RIS-2": "SCHEDULED"}


def test_an_engine_reconnecting_its_channels_is_served_past_the_per_source_limit(
        server: MllpServer, sqlite_store: Store) -> None:
    """Twice PER_SOURCE connections at once from one address: half served, half waiting
    their turn, every one ACKed."""
    count = 2 * PER_SOURCE
    barrier = threading.Barrier(count, timeout=30)
    acks: dict[int, str] = {}
    errors: list[BaseException] = []

    def channel(n: int) -> None:
        try:
            with MllpClient("127.0.0.1", server.port, read_timeout=20) as mllp:
                barrier.wait()
                acks[n] = mllp.send(orm(control_id=f"CH-{n}", accession=f"CH-{n}",
                                        patient_id=f"P-{n}").encode()).decode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=channel, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert {field_of(ack, "MSA", 1) for ack in acks.values()} == {"AA"} and len(acks) == count
    assert len(_items(sqlite_store)) == count


@pytest.mark.parametrize("opening", [START_BLOCK, b""], ids=["in-a-frame", "outside-frames"])
def test_endless_bytes_are_bounded(server: MllpServer, sqlite_store: Store,
                                   opening: bytes) -> None:
    """Inside a frame: AR past max_message_bytes, then closed; without a start block:
    closed past max_message_bytes of junk. Either way the server stops reading."""
    sent = 0
    limit = 256 * 1024 * 1024
    chunk = b"A" * 65536
    outcome: list[str] = []

    def stream() -> None:
        nonlocal sent
        with _attacker(server) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            while sent < limit and time.monotonic() - started < 20:
                try:
                    sock.sendall(chunk)
                except OSError:
                    outcome.append("reset")
                    return
                sent += len(chunk)
                if _closed(sock):
                    outcome.append("closed")
                    return
            outcome.append("still open")

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert field_of(_plain_ack(server, "RIS-3"), "MSA", 1) == "AA"
    finally:
        thread.join(30)
    assert outcome and outcome[0] in ("reset", "closed")
    # What was sent is what the server read plus what the kernels buffer: far from the limit.
    assert sent < 32 * 1024 * 1024
    assert _items(sqlite_store) == {"RIS-3": "SCHEDULED"}


def test_an_unfinished_tls_handshake_is_bounded(server: MllpServer, pki: Pki) -> None:
    assert server.tls_port is not None
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as silent:
        # Meanwhile others complete theirs.
        assert field_of(_tls_ack(server, pki, "BUSY"), "MSA", 1) == "AA"
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed after the 2 s handshake timeout
        assert time.monotonic() - started < 5


def test_ris_connections_end_with_the_frame_not_between_frames(server: MllpServer) -> None:
    """The frame clock starts at a start block: a RIS keeping its connection open between
    messages (longer than the frame timeout) is not cut."""
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as mllp:
        first = mllp.send(orm(control_id="K1", accession="KEEP-1").encode()).decode()
        sock = mllp._sock
        assert sock is not None
        # Nothing from the server for longer than the frame timeout.
        assert not _readable(sock, FRAME_TIMEOUT * 1.5)
        second = mllp.send(orm(control_id="K2", accession="KEEP-2").encode()).decode()
        assert mllp._sock is sock  # the same connection
    assert field_of(first, "MSA", 1) == field_of(second, "MSA", 1) == "AA"
    assert END_BLOCK not in first.encode()


def test_tls_only_listener(sqlite_store: Store, pki: Pki) -> None:
    handler = OrderMessageHandler(sqlite_store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    tls = TlsListenerConfig(port=0, plain_port=False, certificate=pki.cert("server"),
                            private_key=pki.key("server"))
    plain_port = free_port()
    listener = MllpServer(handler, host="127.0.0.1", port=plain_port, max_connections=4,
                          idle_timeout=5, max_message_bytes=64 * 1024, plain=False,
                          tls=ContextSource(lambda: server_context(tls, base_dir=REPO,
                                                                   where="hl7.tls"), "hl7.tls"))
    listener.start()
    try:
        # No client certificate asked for; the server's is verified by the client.
        assert field_of(_tls_ack(listener, pki, "ONLY", client=None), "MSA", 1) == "AA"
        assert not listening(plain_port)
    finally:
        listener.stop()
    with pytest.raises(ValueError, match="a plain port, a TLS port or both"):
        MllpServer(handler, host="127.0.0.1", port=0, max_connections=1, idle_timeout=1,
                   max_message_bytes=4096, plain=False)


def test_received_messages_are_audited_with_address_and_certificate_subject(
        server: MllpServer, sqlite_store: Store, pki: Pki) -> None:
    from broker.audit import Kind, list_events
    from broker.audit_trail import AuditTrail

    trail = AuditTrail(sqlite_store, flush_seconds=3600)
    server._handler.audit = trail  # type: ignore[attr-defined]
    server._audit = trail
    assert field_of(_tls_ack(server, pki, "ACC-AUD-1"), "MSA", 1) == "AA"
    with pytest.raises((MllpError, OSError)):
        _tls_ack(server, pki, "ACC-AUD-X", client="rogue")
    with MllpClient("127.0.0.1", server.port, read_timeout=5) as mllp:
        ack = mllp.send(orm(control_id="M-PLAIN", accession="").encode()).decode()
    assert field_of(ack, "MSA", 1) == "AE"
    trail.flush()
    with sqlite_store.reading() as s:
        events = list_events(s, actor="RIS^HOSP", kinds=[Kind.HL7_RECEIVED])
    assert [(e.outcome, e.accessions, e.tls_subject, e.detail["control_id"]) for e in events] == [
        ("AA", ("ACC-AUD-1",), "O=Test Hospital,CN=CT1", "M-ACC-AUD-1"),
        ("AE", (), None, "M-PLAIN")]
    assert all(e.address and e.address.startswith("127.0.0.1:") for e in events)

    def refused() -> list[tuple[str, str]]:
        trail.flush()  # the server notes the failure after the client has given up
        with sqlite_store.reading() as s:
            return [(e.outcome, e.detail["link"])
                    for e in list_events(s, actor="", kinds=[Kind.TLS_FAILED])]

    assert wait_for(refused, what="the failed handshake audited") == [("refused", "hl7")]
