"""The sample orders stay current: loading them again on a later day moves them to that day."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml
from sqlalchemy import select

from broker.app import Broker
from broker.config import load_config
from broker.models import WorklistItem

REPO = Path(__file__).resolve().parent.parent


def test_samples_follow_the_day_they_are_loaded_on(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'w.db'}"},
                                    "dicom": {"port": 0}, "hl7": {"port": 0},
                                    "mapping": str(REPO / "config" / "mapping.yaml")}))
    broker = Broker(load_config(path, environ={}))
    try:
        samples = REPO / "sample_messages"
        assert broker.load_samples(samples, dt.date(2026, 11, 29)) == 8
        assert broker.load_samples(samples, dt.date(2026, 11, 29)) == 8  # resend: same ACKs
        assert broker.load_samples(samples, dt.date(2026, 12, 1)) == 8
        with broker.store.reading() as s:
            starts = dict(s.execute(select(WorklistItem.accession_number,
                                           WorklistItem.scheduled_start)).all())
            statuses = dict(s.execute(select(WorklistItem.accession_number,
                                             WorklistItem.status)).all())
        assert starts["ACC-CT-0001"] == dt.datetime(2026, 12, 1, 9, 30)
        assert starts["ACC-US-0003"] == dt.datetime(2026, 12, 2, 8, 15)  # {TOMORROW}
        assert starts["ACC-MR-0007"] == dt.datetime(2026, 12, 1, 15, 30)  # from ORC-7.4
        assert starts["ACC-CT-0008"] == dt.datetime(2026, 12, 2, 13, 0)  # BOM, 3-char MSH-2
        assert statuses["ACC-DX-0005"] == "CANCELLED"
    finally:
        broker.stop()  # never started: closes what it opened
