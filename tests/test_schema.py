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


CONSOLE_TABLES = ("cfind_exposure", "cfind_query", "operator_action")


def test_the_console_revision_adds_its_tables_to_a_0002_database_keeping_rows(store):
    """Revision 0004_console on its own (not helped by create_all), then again as a no-op."""
    from alembic import command

    from broker.schema import _alembic_config

    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="DOE^JANE"),
                             ProcedureData("ACC1", modality="CT")), uid_root="1.2.3")
    with store.write_engine.begin() as conn:
        for table in CONSOLE_TABLES:
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))
    config = _alembic_config()
    for _ in range(2):
        with store.write_engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0004_console")
        with store.write_engine.connect() as conn:
            inspector = inspect(conn)
            assert set(CONSOLE_TABLES) <= set(inspector.get_table_names())
            indexes = {i["name"] for i in inspector.get_indexes("cfind_exposure")}
            assert "ux_cfind_exposure_ae_accession" in indexes
        with store.write_engine.begin() as conn:  # the second round starts from 0002 again
            conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))
    store.create_schema()
    assert _version(store) == head()
    with store.reading() as s:
        rows = s.execute(text("SELECT accession_number FROM worklist_item")).all()
    assert [tuple(r) for r in rows] == [("ACC1",)]
    from broker.operator_actions import list_actions, record_action

    with store.writing() as s:
        record_action(s, user="u", action="replay", accession_number="ACC1", target="t",
                      detail="d")
    with store.reading() as s:
        assert [a.user for a in list_actions(s)] == ["u"]
