"""Schema creation and upgrade (Alembic): a database from before a change keeps its data."""

from __future__ import annotations

from sqlalchemy import inspect, text

from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.orders import apply_order
from broker.schema import head
from broker.store import Store

NEW_COLUMNS = ("scheduled_performing_physician_name", "scheduled_station_name",
               "requested_procedure_priority")


def _version(store: Store) -> str | None:
    with store.write_engine.connect() as conn:
        if "alembic_version" not in inspect(conn).get_table_names():
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _columns(store: Store) -> set[str]:
    with store.write_engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("worklist_item")}


def test_a_new_database_is_created_at_the_latest_revision(store):
    assert _version(store) == head()
    assert set(NEW_COLUMNS) <= _columns(store)
    store.create_schema()  # every start runs it: a no-op when current
    assert _version(store) == head()


def test_a_database_from_before_migrations_is_upgraded_keeping_its_rows(store):
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="DOE^JANE"),
                             ProcedureData("ACC1", modality="CT")), uid_root="1.2.3")
    # Turn it into what create_all made before revision 0002: no version table, no columns.
    with store.write_engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        for column in NEW_COLUMNS:
            conn.execute(text(f"ALTER TABLE worklist_item DROP COLUMN {column}"))
    assert not set(NEW_COLUMNS) & _columns(store)

    store.create_schema()

    assert set(NEW_COLUMNS) <= _columns(store)
    assert _version(store) == head()
    with store.reading() as s:
        rows = s.execute(text("SELECT accession_number, modality, scheduled_station_name "
                              "FROM worklist_item")).all()
    assert [tuple(r) for r in rows] == [("ACC1", "CT", None)]


def test_brokers_starting_together_migrate_one_after_the_other(store):
    """Each start's schema step runs alone; none fails on tables another one just made."""
    import threading

    from broker.models import Base

    with store.write_engine.begin() as conn:  # an empty database, as on a first start
        conn.execute(text("DROP TABLE alembic_version"))
        Base.metadata.drop_all(conn)
    assert _version(store) is None
    errors: list[BaseException] = []
    others = [Store(store.url, pool_size=1) for _ in range(4)]

    def start(other: Store) -> None:
        try:
            other.create_schema()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(other,)) for other in others]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        assert _version(store) == head()
    finally:
        for other in others:
            other.dispose()


def test_a_database_at_0002_gets_item_datasets_and_wide_station_titles(store):
    """Revision 0006_item_dataset from the shape 0002_step_keys left, rows kept."""
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="DOE^JANE"),
                             ProcedureData("ACC1", modality="CT",
                                           scheduled_station_ae_title="CT01")),
                    uid_root="1.2.3")
    with store.write_engine.begin() as conn:
        conn.execute(text("ALTER TABLE worklist_item DROP COLUMN item_dataset"))
        if store.backend == "postgresql":
            conn.execute(text("ALTER TABLE worklist_item ALTER COLUMN "
                              "scheduled_station_ae_title TYPE VARCHAR(16)"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))
    assert "item_dataset" not in _columns(store)

    store.create_schema()

    assert "item_dataset" in _columns(store)
    assert _version(store) == head()
    two = "CT_ROOM_NUMBER01\\CT_ROOM_NUMBER02"  # longer than the 16 characters of 0002
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData(
            "ACC2", scheduled_station_ae_title=two, item_dataset='{"00102110":{"vr":"LO",'
            '"Value":["LATEX"]}}')), uid_root="1.2.3")
    with store.reading() as s:
        rows = s.execute(text("SELECT accession_number, scheduled_station_ae_title, "
                              "item_dataset FROM worklist_item ORDER BY accession_number")).all()
    assert [tuple(r) for r in rows] == [
        ("ACC1", "CT01", None), ("ACC2", two, '{"00102110":{"vr":"LO","Value":["LATEX"]}}')]
    store.create_schema()  # idempotent
