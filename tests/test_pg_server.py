"""The throwaway PostgreSQL a test run starts when the machine has no server of its own."""

from __future__ import annotations

from sqlalchemy import text

from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.orders import apply_order
from broker.store import Store
from tests.pg_server import start_throwaway


def test_a_throwaway_cluster_serves_the_store_and_is_removed_after():
    server = start_throwaway()
    try:
        assert server.port != 5432
        store = Store(server.url, pool_size=2)
        try:
            store.create_schema()
            with store.writing() as s:
                apply_order(s, Order(OrderControl.NEW, PatientData("P1"),
                                     ProcedureData("ACC-PG", modality="CT")), uid_root="1.2.3")
            with store.reading() as s:
                assert s.execute(text("SELECT accession_number FROM worklist_item")
                                 ).scalars().all() == ["ACC-PG"]
                assert s.execute(text("SELECT current_database()")).scalar() == "test"
        finally:
            store.dispose()
    finally:
        server.stop()
    assert not server.folder.exists()
