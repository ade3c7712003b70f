"""import-db: the old companion worklist server's SQLite database, built here from its users'
description (patients, worklist_items, mpps_tracking), imported by the real command, then
queried with DCMTK's findscu from the real broker."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from broker.cli import main
from broker.legacy_import import parse_date, parse_datetime, parse_time
from broker.models import MPPSTracking, OutboxMessage, WorklistItem
from broker.store import Store
from tests.e2e.broker_process import launch, write_config
from tests.e2e.test_end_to_end import findscu, run_cli
from tests.support import free_port, wait_for

OLD_SCHEMA = """
CREATE TABLE patients (id INTEGER PRIMARY KEY, patient_id TEXT, patient_name TEXT,
                       birth_date TEXT, sex TEXT);
CREATE TABLE worklist_items (id INTEGER PRIMARY KEY, patient_id TEXT, accession_number TEXT,
                             appointment_date TEXT, appointment_time TEXT, modality TEXT,
                             study_instance_uid TEXT, status TEXT);
CREATE TABLE mpps_tracking (id INTEGER PRIMARY KEY, sop_instance_uid TEXT,
                            accession_number TEXT, study_instance_uid TEXT, modality TEXT,
                            status TEXT, start_time DATETIME, end_time DATETIME);
"""
PATIENTS = [
    (1, "PID-1", "MUELLER^ANNA", "19700102", "F"),
    (2, "PID-2", "ROSSI^MARIO", "1985-07-30", "M"),
    (3, "PID-3", "ODD^DATES", "30/07/1985", "O"),  # neither form: imported without it
    (4, "PID-4", "NO^ORDERS", "19990101", "F"),
]
ITEMS = [
    (1, "PID-1", "OLD-1", "20261130", "093000", "CT", "1.2.826.0.1.99.1", "SCHEDULED"),
    (2, "PID-2", "OLD-2", "2026-11-30", "09:30", "MR", None, "scheduled"),  # ISO, no UID
    (3, "PID-1", "OLD-3", "20261128", "1015", "US", "", "in_progress"),
    (4, "PID-3", "OLD-4", "20261127", "080000", "CR", "1.2.826.0.1.99.4", "COMPLETED"),
    (5, "PID-2", "OLD-5", "29.11.2026", "10:00", "CT", None, "SCHEDULED"),  # odd date
    (6, "PID-2", "OLD-6", "20261130", "25:99", "CT", None, "SCHEDULED"),  # odd time
    (7, "PID-1", "OLD-7", "20261130", "1100", "CT", None, "ARRIVED"),  # unknown status
    (8, "PID-2", "", "20261130", "1100", "CT", None, "SCHEDULED"),  # no accession
]
MPPS = [
    (1, "1.2.826.0.1.99.4.7", "OLD-4", "1.2.826.0.1.99.4", "CR", "COMPLETED",
     "2026-11-27 08:05:00", "2026-11-27 08:20:00"),
    (2, None, "OLD-3", None, "US", "IN PROGRESS", "2026-11-28 10:16:00", None),
]


def build_old_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)", PATIENTS)
    conn.executemany("INSERT INTO worklist_items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ITEMS)
    conn.executemany("INSERT INTO mpps_tracking VALUES (?, ?, ?, ?, ?, ?, ?, ?)", MPPS)
    conn.commit()
    conn.close()


def test_dates_and_times_in_both_forms():
    assert parse_date("20261129") == parse_date("2026-11-29") == parse_date(" 2026-11-29 ")
    assert parse_time("0930") == parse_time("09:30") == parse_time("093000.000")
    assert parse_datetime("2026-11-27 08:05:00") == parse_datetime("20261127080500")
    for bad_date in ("29.11.2026", "2026-13-01", "yesterday"):
        with pytest.raises(ValueError, match="neither YYYYMMDD nor YYYY-MM-DD"):
            parse_date(bad_date)
    with pytest.raises(ValueError, match="neither HHMMSS nor HH:MM"):
        parse_time("25:99")


def test_import_db_then_findscu_sees_the_old_worklist(tmp_path):
    old = tmp_path / "worklist.db"
    build_old_database(old)
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    config_path, *_ = write_config(broker_dir)

    dry = run_cli("import-db", str(old), "--dry-run", "--config", str(config_path))
    assert dry.returncode == 0, dry.stderr
    assert "would import from" in dry.stdout
    assert "3 patients, 4 worklist items, 2 MPPS; 0 already in the broker; 4 skipped" \
        in dry.stdout
    store = Store(f"sqlite:///{broker_dir / 'worklist.db'}", pool_size=1)
    try:
        with store.reading() as s:
            assert s.scalars(select(WorklistItem.id)).all() == []  # the dry run wrote nothing

        done = run_cli("import-db", str(old), "--config", str(config_path))
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "imported from" in out and "3 patients, 4 worklist items, 2 MPPS" in out
        assert "note: 1 patients without any worklist item" in out
        # One summary line for the log, not a line per imported MPPS.
        assert "MPPS created" not in done.stderr and "MPPS set" not in done.stderr
        assert "import-db" in done.stderr and "mpps=2" in done.stderr
        assert "warning: patients id 3 (PID-3): birth_date '30/07/1985' is neither" in out
        for expected in ("worklist_items id 5 (accession OLD-5): appointment_date "
                         "'29.11.2026' is neither YYYYMMDD nor YYYY-MM-DD",
                         "worklist_items id 6 (accession OLD-6): appointment_time '25:99'",
                         "worklist_items id 7 (accession OLD-7): status 'ARRIVED'",
                         "worklist_items id 8 (accession -): no accession number"):
            assert f"skipped: {expected}" in out

        with store.reading() as s:
            items = {i.accession_number: i for i in s.scalars(select(WorklistItem))}
            assert {a: i.status for a, i in items.items()} == {
                "OLD-1": "SCHEDULED", "OLD-2": "SCHEDULED", "OLD-3": "IN PROGRESS",
                "OLD-4": "COMPLETED"}
            assert items["OLD-2"].study_instance_uid.startswith("1.2.826.0.1.3680043.10.1491.")
            mpps = {m.sop_instance_uid: m for m in s.scalars(select(MPPSTracking))}
            assert [i.accession_number for i in mpps["1.2.826.0.1.99.4.7"].items] == ["OLD-4"]
            assert mpps["1.2.826.0.1.99.4.7"].status == "COMPLETED"
            [generated] = [m for uid, m in mpps.items() if uid != "1.2.826.0.1.99.4.7"]
            assert [i.accession_number for i in generated.items] == ["OLD-3"]
            # Imported history is not news for the RIS.
            assert s.scalars(select(OutboxMessage.id)).all() == []

        again = run_cli("import-db", str(old), "--config", str(config_path))
        assert again.returncode == 0, again.stderr
        assert "0 patients, 0 worklist items, 0 MPPS; 6 already in the broker" in again.stdout
        with store.reading() as s:
            assert len(s.scalars(select(MPPSTracking.id)).all()) == 2
    finally:
        store.dispose()

    # The third command of the migration: serve, AE title and port from orthanc.json.
    port = free_port()
    (tmp_path / "orthanc.json").write_text(
        '{ // as the old server had it\n  "MPPSAet" : "OLDWL", "DicomPortMPPS" : PORT,\n'
        '  "HttpServerEnabled" : false /* no REST link in this test */ }'.replace(
            "PORT", str(port)))
    config = yaml.safe_load(config_path.read_text())
    del config["dicom"]["ae_title"], config["dicom"]["port"]
    config["orthanc"] = {"config_file": str(tmp_path / "orthanc.json")}
    config_path.write_text(yaml.safe_dump(config))
    broker = launch(broker_dir, config_path, port, config["hl7"]["port"])
    try:
        # Logged once the scheduler is up, a moment after the ports listen.
        wait_for(lambda: f"DICOM OLDWL on 127.0.0.1:{port}" in broker.log(), 15,
                 what="the start-up line")
        rows = findscu(broker.dicom_port, "PatientID", "PatientName", "PatientBirthDate",
                       "AccessionNumber", "StudyInstanceUID", "(0040,0100)[0].Modality",
                       "(0040,0100)[0].ScheduledProcedureStepStartDate",
                       "(0040,0100)[0].ScheduledProcedureStepStartTime",
                       out_dir=tmp_path / "q")
        found = {str(r.AccessionNumber): r for r in rows}
        assert set(found) == {"OLD-1", "OLD-2", "OLD-3"}  # OLD-4 is COMPLETED
        old2 = found["OLD-2"]
        assert (str(old2.PatientID), str(old2.PatientName), old2.PatientBirthDate) == (
            "PID-2", "ROSSI^MARIO", "19850730")
        step = old2.ScheduledProcedureStepSequence[0]
        assert (step.Modality, step.ScheduledProcedureStepStartDate) == ("MR", "20261130")
        assert step.ScheduledProcedureStepStartTime.startswith("0930")
        assert found["OLD-1"].StudyInstanceUID == "1.2.826.0.1.99.1"
    finally:
        broker.stop()


@pytest.mark.parametrize("schema, missing", [
    ("CREATE TABLE patients (id INTEGER);", "no table worklist_items, mpps_tracking"),
    (OLD_SCHEMA.replace("modality TEXT,\n                             study", "study"),
     "table worklist_items has no column modality"),
    (None, "is not an SQLite database"),
])
def test_a_file_that_is_not_such_a_database_is_refused_with_exit_2(tmp_path, schema, missing,
                                                                   capsys):
    old = tmp_path / "other.db"
    if schema is None:
        old.write_text("not a database at all, just some text" * 50)
    else:
        conn = sqlite3.connect(old)
        conn.executescript(schema)
        conn.close()
    config_path, *_ = write_config(tmp_path)
    # In-process (the subprocess path is the test above): the command's exit status and lines.
    assert main(["import-db", str(old), "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err
