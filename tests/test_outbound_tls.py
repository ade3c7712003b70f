"""Status messages to a RIS that listens with TLS: certificate checked, connection kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from broker.config import Hl7Config, RisConfig, TlsClientConfig, TlsListenerConfig
from broker.domain import MppsCreate, ScheduledStepRef
from broker.models import OutboxMessage, OutboxState
from broker.mpps import record_mpps_create
from broker.store import Store
from broker.tls import client_source, server_context
from hl7_listener.outbound import OutboundSender
from tests.fake_ris import FakeRis, field_of
from tests.test_outbound import _order_with_mpps
from tests.tls_certs import Pki, shared_pki

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


def _sender(store: Store, port: int, tls: TlsClientConfig, host: str) -> OutboundSender:
    ris = RisConfig(enabled=True, host=host, port=port, connect_timeout_seconds=2,
                    ack_timeout_seconds=2, retry_initial_seconds=0.01, tls=tls)
    return OutboundSender(store, ris, Hl7Config(), batch_size=10,
                          tls=client_source(tls, host=host, base_dir=REPO, where="ris.tls"))


def test_status_messages_over_tls(sqlite_store: Store, pki: Pki) -> None:
    _order_with_mpps(sqlite_store)
    ris = FakeRis(ssl_context=server_context(
        TlsListenerConfig(port=0, certificate=pki.cert("server"), private_key=pki.key("server"),
                          ca_certificates=pki.ca, require_client_certificate=True),
        base_dir=REPO, where="ris"))
    try:
        # A RIS whose certificate does not verify is unreachable: the messages wait.
        foreign = TlsClientConfig(enabled=True, ca_certificates=pki.cert("rogue-ca"),
                                  certificate=pki.cert("client"), private_key=pki.key("client"))
        refused = _sender(sqlite_store, ris.port, foreign, "localhost")
        assert refused.run_once().sent == 0
        with sqlite_store.reading() as s:
            rows = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
            assert [r.state for r in rows] == [OutboxState.PENDING, OutboxState.PENDING]
            assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in (rows[0].last_error
                                                                         or "")
        assert ris.received == []

        trusted = foreign.model_copy(update={"ca_certificates": pki.ca})
        sender = _sender(sqlite_store, ris.port, trusted, "localhost")
        with sqlite_store.writing() as s:  # no backoff wait in the test
            for row in s.scalars(select(OutboxMessage)):
                row.next_attempt_at = None
        assert sender.run_once().sent == 2
        messages = ris.wait_for_messages(2)
        assert [field_of(m, "ORC", 5) for m in messages] == ["IP", "CM"]
        connections = ris.connections
        # The TLS connection is kept between runs (TLS 1.3 session tickets are no close).
        with sqlite_store.writing() as s:
            record_mpps_create(s, MppsCreate("1.2.3.10", "IN PROGRESS",
                                             (ScheduledStepRef(accession_number="ACC1"),)))
        assert sender.run_once().sent == 1
        assert ris.connections == connections
        sender.close()
    finally:
        ris.close()
