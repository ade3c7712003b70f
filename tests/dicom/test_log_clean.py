"""The broker's log stays clean of pynetdicom's own tracebacks (issue 13, part 3)."""

from __future__ import annotations

import logging

import pytest
from pynetdicom import _config

from broker.store import Store
from tests.dicom.conftest import start_server
from tests.dicom.scu import n_get
from tests.dicom.test_mpps import mpps_uid_for, send_mpps


def test_n_get_with_zero_or_one_attribute_logs_no_traceback(
        worklist_store: Store, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom's default, as a process that never built a DicomServer has it: the server
    # must switch its standard DIMSE logging handlers off itself.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    server = start_server(worklist_store)
    try:
        assert send_mpps("in-progress", accession="ACC-CT-1", host="127.0.0.1",
                         port=server.port, timeout=10).status == 0
        uid = mpps_uid_for("ACC-CT-1")
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for tags in ([], [0x00400252]):
                status, attributes = n_get(server.port, uid, tags)
                assert status.Status == 0
                assert attributes is not None
                assert attributes.PerformedProcedureStepStatus == "IN PROGRESS"
    finally:
        server.stop()
    broken = [record for record in caplog.records
              if record.exc_info is not None or "Traceback" in record.getMessage()
              or record.levelno >= logging.ERROR]
    assert broken == [], [record.getMessage() for record in broken]
    assert any("MPPS N-GET" in record.getMessage() for record in caplog.records)
