"""Schema creation and upgrade (Alembic): a database from before a change keeps its data."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.orders import apply_order
from broker.schema import head
from broker.store import Store

REPO = Path(__file__).resolve().parents[1]
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


def test_0003_keeps_the_inbound_log_and_old_messages_are_still_recognised_as_resends(store):
    from hl7_listener.handler import OrderMessageHandler
    from hl7_listener.mapping import load_mapping
    from hl7_listener.status_message import parse_ack
    from tests.messages import orm

    handler = OrderMessageHandler(
        store, load_mapping(REPO / "config" / "mapping.yaml"), uid_root="1.2.3",
        sending_application="WLB", sending_facility="")
    message = orm(control_id="OLD-1", accession="OLD-ACC").encode()
    first = handler.handle(message)
    # Back to the shape of revision 0002: no digest, no warnings, the old unique index.
    with store.write_engine.begin() as conn:
        conn.execute(text("DROP INDEX ux_inbound_accepted_content"))
        conn.execute(text("DROP INDEX ix_inbound_sender_control"))
        for column in ("content_digest", "warnings"):
            conn.execute(text(f"ALTER TABLE inbound_message DROP COLUMN {column}"))
        conn.execute(text("CREATE UNIQUE INDEX ux_inbound_accepted ON inbound_message "
                          "(sender, control_id) WHERE outcome = 'accepted'"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))

    store.create_schema()

    assert _version(store) == head()
    with store.write_engine.connect() as conn:
        inspector = inspect(conn)
        assert {"content_digest", "warnings"} <= {
            c["name"] for c in inspector.get_columns("inbound_message")}
        indexes = {i["name"] for i in inspector.get_indexes("inbound_message")}
        assert "ux_inbound_accepted" not in indexes
        assert {"ux_inbound_accepted_content", "ix_inbound_sender_control"} <= indexes
        rows = conn.execute(text("SELECT control_id, content_digest FROM inbound_message"))
        assert [tuple(r) for r in rows] == [("OLD-1", None)]
    # The message kept before the upgrade is still known: a resend changes nothing, and a
    # different message under its control ID is taken as new.
    assert handler.handle(message) == first
    other = handler.handle(orm(control_id="OLD-1", accession="NEW-ACC").encode())
    assert other is not None and "reused" in parse_ack(other).text
    with store.reading() as s:
        assert s.execute(text("SELECT count(*) FROM worklist_item")).scalar() == 2


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


def test_a_database_at_0002_gets_the_orthanc_tables_keeping_its_rows(store):
    """Revision 0005_orthanc from the shape 0002_step_keys left (its tables absent)."""
    from broker.domain import StudyArrival
    from broker.studies import record_study_arrival

    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1"),
                             ProcedureData("ACC1", study_instance_uid="1.2.3.9")),
                    uid_root="1.2.3")
    with store.write_engine.begin() as conn:
        conn.execute(text("DROP TABLE study_arrival"))
        conn.execute(text("DROP TABLE feed_cursor"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))

    store.create_schema()

    assert _version(store) == head()
    with store.write_engine.connect() as conn:
        assert {"study_arrival", "feed_cursor"} <= set(inspect(conn).get_table_names())
    with store.writing() as s:
        result = record_study_arrival(s, StudyArrival("http://o", "x",
                                                      study_instance_uid="1.2.3.9"))
    assert result.matched_accessions == ("ACC1",)


@pytest.mark.parametrize("tables_present", [True, False])
def test_the_orthanc_revision_creates_its_tables_or_finds_them(sqlite_store, tables_present):
    """broker.schema creates missing tables before upgrading (0005 finds them there); run by
    Alembic alone, 0005 creates them as the models declare them."""
    from alembic import command

    from broker.models import Base
    from broker.schema import _alembic_config

    with sqlite_store.write_engine.begin() as conn:
        if not tables_present:
            conn.execute(text("DROP TABLE study_arrival"))
            conn.execute(text("DROP TABLE feed_cursor"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_step_keys'"))
        config = _alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    assert _version(sqlite_store) == head()
    with sqlite_store.write_engine.connect() as conn:
        for table in ("study_arrival", "feed_cursor"):
            columns = {c["name"] for c in inspect(conn).get_columns(table)}
            assert columns == set(Base.metadata.tables[table].columns.keys())
            indexes = {i["name"] for i in inspect(conn).get_indexes(table)}
            assert indexes >= {i.name for i in Base.metadata.tables[table].indexes}


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
