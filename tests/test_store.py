from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import select

from broker.domain import ItemStatus, Order, OrderControl, PatientData, ProcedureData
from broker.errors import InvalidOrder, UnknownOrder
from broker.models import Patient, WorklistItem
from broker.orders import apply_order
from broker.store import Store

ROOT = "1.2.826.0.1.3680043.10.1491"


def _order(control: OrderControl = OrderControl.NEW, accession: str = "A1",
           **procedure: object) -> Order:
    return Order(control, PatientData("P1", patient_name="DOE^JANE", sex="F",
                                      birth_date=dt.date(1980, 1, 2)),
                 ProcedureData(**{"accession_number": accession, "modality": "CT",
                                  "scheduled_start": dt.datetime(2026, 11, 29, 9, 30),
                                  **procedure}),
                 message_control_id="M1")


def test_new_order_creates_patient_and_item_with_generated_uid(store):
    with store.writing() as s:
        result = apply_order(s, _order(), uid_root=ROOT)
    assert result.created and result.status is ItemStatus.SCHEDULED
    with store.reading() as s:
        item = s.scalars(select(WorklistItem)).one()
        assert item.study_instance_uid.startswith(ROOT + ".")
        assert len(item.study_instance_uid) <= 64
        assert item.patient.patient_name == "DOE^JANE"
        assert item.scheduled_start == dt.datetime(2026, 11, 29, 9, 30)


def test_change_keeps_study_uid_and_cancel_hides(store):
    with store.writing() as s:
        apply_order(s, _order(study_instance_uid="1.2.3"), uid_root=ROOT)
    with store.writing() as s:
        apply_order(s, _order(OrderControl.CHANGE, modality="MR"), uid_root=ROOT)
    with store.writing() as s:
        apply_order(s, _order(OrderControl.CANCEL), uid_root=ROOT)
    with store.reading() as s:
        item = s.scalars(select(WorklistItem)).one()
        assert (item.study_instance_uid, item.modality, item.status) == (
            "1.2.3", "MR", ItemStatus.CANCELLED)


def test_unknown_order_and_missing_keys_are_refused_without_writing(store):
    with pytest.raises(UnknownOrder), store.writing() as s:
        apply_order(s, _order(OrderControl.CHANGE), uid_root=ROOT)
    with pytest.raises(InvalidOrder, match="AccessionNumber is required"), store.writing() as s:
        apply_order(s, _order(accession=""), uid_root=ROOT)
    with store.reading() as s:
        assert s.scalars(select(Patient)).all() == []


def test_a_nul_in_any_value_of_an_order_is_refused_naming_it_without_writing(store):
    kept = '{"00102110": {"vr": "LO", "Value": ["LA\\u0000TEX"]}}'
    typed = '{"00102110": {"vr": "LO", "Value": ["a backslash: \\\\u0000"]}}'
    for order, named in ((_order(sps_description="CT\x00HEAD"), "sps_description"),
                         (_order(item_dataset=kept), "Allergies (0010,2110)")):
        with pytest.raises(InvalidOrder, match=rf"^{re.escape(named)} holds a NUL") as refused:
            with store.writing() as s:
                apply_order(s, order, uid_root=ROOT)
        assert refused.value.code == "102"
    with store.reading() as s:
        assert s.scalars(select(WorklistItem)).all() == []
    with store.writing() as s:  # the text backslash-u0000 is no NUL
        apply_order(s, _order(item_dataset=typed), uid_root=ROOT)


def test_exclusive_lock_admits_one_holder_per_database_at_a_time(store):
    other = Store(store.url, pool_size=2)  # a second broker on the same database
    try:
        with store.exclusive("outbound") as first:
            assert first is True
            with other.exclusive("outbound") as second:
                assert second is False
            with other.exclusive("purge") as unrelated:
                assert unrelated is True  # locks are per job name
        with other.exclusive("outbound") as after_release:
            assert after_release is True
    finally:
        other.dispose()
