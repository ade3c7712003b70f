"""The administrator's commands: one-line errors, exit statuses. Through ``main()`` as the
console script calls it, in this process (a real process costs ~1.4 s of start-up per call on
a 2-core machine, and these tests make thirty); tests/e2e runs them as real processes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
from pathlib import Path

import yaml

from broker.cli import main
from broker.domain import (
    MppsCreate,
    Order,
    OrderControl,
    PatientData,
    ProcedureData,
    ScheduledStepRef,
)
from broker.mpps import record_mpps_create
from broker.orders import apply_order
from tests.messages import orm

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)  # paths given relative to the repository, as a shell in it would
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
        logging.getLogger().handlers.clear()  # configure_logging's handler wrote to err
    return subprocess.CompletedProcess(["worklist-broker", *args], code, out.getvalue(),
                                       err.getvalue())


def test_mapping_test_shows_each_attribute_and_its_source():
    done = cli("mapping-test", "sample_messages/02_mr_order.hl7")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "item 1: ORC-1 NW, ORC-5 SC"
    accession = next(line for line in lines if line.strip().startswith("AccessionNumber"))
    assert "ACC-MR-0002" in accession and accession.endswith("<- OBR-18")
    assert any("1.2.826.0.1.3680043.10.1491.1.2" in line for line in lines)


def test_mapping_test_reports_a_bad_message_in_one_line(tmp_path):
    path = tmp_path / "bad.hl7"
    path.write_text(orm(accession=""))
    done = cli("mapping-test", str(path))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "worklist-broker: error: OBR-18 AccessionNumber is required")


def test_outbox_list_retry_drop(tmp_path, sqlite_store):
    with sqlite_store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData("A1")),
                    uid_root="1.2.3")
    with sqlite_store.writing() as s:
        record_mpps_create(s, MppsCreate("1.2.3.4", "IN PROGRESS",
                                         (ScheduledStepRef(accession_number="A1"),)))
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))
    listed = cli("outbox", "list", "--config", str(config), "--state", "pending")
    assert listed.returncode == 0 and "\tpending\tIP\tA1\t" in listed.stdout
    assert cli("outbox", "retry", "--config", str(config)).returncode == 1  # needs ID or --all
    nothing = cli("outbox", "retry", "1", "--config", str(config))
    assert nothing.returncode == 1 and "not in the failed state" in nothing.stderr
    dropped = cli("outbox", "drop", "1", "--config", str(config))
    assert dropped.returncode == 0 and "dropped message 1 (IP for A1)" in dropped.stdout
    assert "A1" not in cli("outbox", "list", "--config", str(config)).stdout


def test_mpps_show_prints_the_stored_step(tmp_path, sqlite_store):
    import json

    with sqlite_store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData("A1")),
                    uid_root="1.2.3")
    with sqlite_store.writing() as s:
        record_mpps_create(s, MppsCreate(
            "1.2.3.4", "IN PROGRESS", (ScheduledStepRef(accession_number="A1"),),
            attributes_json=json.dumps({"00080060": {"vr": "CS", "Value": ["CT"]}})))
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))
    shown = cli("mpps", "show", "1.2.3.4", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "MPPS 1.2.3.4: IN PROGRESS" in shown.stdout and "orders: A1" in shown.stdout
    assert "(0008,0060) Modality" in shown.stdout and "CT" in shown.stdout
    missing = cli("mpps", "show", "9.9.9", "--config", str(config))
    assert missing.returncode == 1
    assert missing.stderr.strip() == "worklist-broker: error: no MPPS 9.9.9"


def test_mpps_forward_list_retry_drop(tmp_path, sqlite_store):
    from broker import mpps_forward
    from broker.config import MppsDestination
    from broker.delivery import Outcome, RetryPolicy
    from tests.test_mpps_forward import forwarded_step

    forwarded_step(sqlite_store, "1.2.3.4", MppsDestination(ae_title="PACS", host="10.0.0.5",
                                                            port=104))
    with sqlite_store.writing() as s:
        mpps_forward.record_failure(s, 1, "PACS answered the N-CREATE with 0x0110",
                                    outcome=Outcome.REJECTED, policy=RetryPolicy())
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))

    def forwards(*args: str) -> subprocess.CompletedProcess[str]:
        return cli("mpps-forward", *args, "--config", str(config))

    failed = forwards("list", "--state", "failed")
    assert failed.returncode == 0, failed.stderr
    header, *rows = failed.stdout.splitlines()
    assert header.startswith("ID\tSTATE\tOPERATION\tDESTINATION\tMPPS UID")
    assert len(rows) == 1
    assert rows[0].startswith("1\tfailed\tcreate\tPACS@10.0.0.5:104\t1.2.3.4\t1\t")
    assert rows[0].endswith("\tPACS answered the N-CREATE with 0x0110")

    assert forwards("retry").returncode == 1  # needs an ID or --all-failed
    not_failed = forwards("retry", "2")
    assert not_failed.returncode == 1
    assert not_failed.stderr.strip() == (
        "worklist-broker: error: MPPS forward 2 is not in the failed state")
    retried = forwards("retry", "--all-failed")
    assert retried.returncode == 0 and retried.stdout.strip() == "1 forward(s) will be sent again"
    assert [line.split("\t")[:3] for line in forwards("list").stdout.splitlines()[1:]] == [
        ["2", "pending", "set"], ["1", "pending", "create"]]  # newest first

    dropped = forwards("drop", "1")
    assert dropped.returncode == 0
    assert dropped.stdout.strip() == "dropped forward 1 (N-CREATE of 1.2.3.4 to PACS@10.0.0.5:104)"
    again = forwards("drop", "1")
    assert again.returncode == 1 and "does not exist or was already sent" in again.stderr


def test_mapping_test_warns_of_an_order_without_a_start(tmp_path):
    path = tmp_path / "nostart.hl7"
    path.write_text(orm(accession="NOSTART", start_in=None))
    done = cli("mapping-test", str(path))
    assert done.returncode == 0, done.stderr
    assert ("  warning: accession NOSTART: no scheduled start (TQ1-7.1, ORC-7.4, OBR-27.4 "
            "empty); a modality polling by date will not find it") in done.stdout.splitlines()
    # The same finding is not repeated as two "is empty" warnings.
    assert "ScheduledProcedureStepStartDate is empty" not in done.stdout


def test_messages_list_marks_a_reused_control_id_and_a_missing_start(tmp_path, sqlite_store):
    from hl7_listener.handler import OrderMessageHandler
    from hl7_listener.mapping import load_mapping

    handler = OrderMessageHandler(sqlite_store, load_mapping(REPO / "config" / "mapping.yaml"),
                                  uid_root="1.2.3", sending_application="WLB",
                                  sending_facility="")
    handler.handle(orm(control_id="CTRL-1", accession="DUPA1").encode())
    handler.handle(orm(control_id="CTRL-1", accession="DUPB2", start_in=None).encode())
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))
    listed = cli("messages", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    newest = listed.stdout.splitlines()[1].split("\t")
    assert newest[2] == "AA" and newest[6] == "DUPB2"
    assert "warning: control ID CTRL-1 reused with different content" in newest[7]
    assert "warning: accession DUPB2: no scheduled start" in newest[7]
    oldest = listed.stdout.splitlines()[2].split("\t")
    assert (oldest[6], oldest[7]) == ("DUPA1", "")
