"""matching.explain agrees with find_worklist, key for key, on both backends: for every query
below and every item, the item is explained as matched exactly when C-FIND returns it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from broker.domain import ItemStatus
from broker.matching import WorklistQuery, explain, find_worklist
from broker.models import WorklistItem
from broker.store import Store
from tests.test_matching import set_status
from tests.test_matching import worklist as worklist  # the fixture, re-exported

QUERIES = [
    {},
    {"modality": "MR"},
    {"modality": "CT\\US"},
    {"patient_name": "doe*"},
    {"patient_name": "MÜLLER^HANS"},
    {"accession_number": "50%_OFF"},
    {"accession_number": "50%*"},
    {"scheduled_start_date": "20260302"},
    {"scheduled_start_date": "20260302-20260303", "scheduled_start_time": "0900-1000"},
    {"scheduled_start_time": "0700-0800"},
    {"scheduled_station_ae_title": "MR0?"},
    {"study_instance_uid": "1.2.3.1\\1.2.3.4"},
    {"statuses": (ItemStatus.COMPLETED,)},
    {"statuses": ()},
    {"scope_station": "CR01", "scope_modality": "MR"},
    {"modality": "MR", "scheduled_start_date": "20260303", "patient_name": "Mü*"},
    {"limit": 2},
]


@pytest.mark.parametrize("keys", QUERIES, ids=[str(q) for q in QUERIES])
def test_explain_says_matched_exactly_for_the_items_c_find_returns(worklist: Store,
                                                                   keys: dict[str, object]):
    set_status(worklist, "ACC-4", ItemStatus.COMPLETED)
    query = WorklistQuery(**keys)  # type: ignore[arg-type]
    with worklist.reading() as session:
        returned = {row.procedure.accession_number for row in find_worklist(session, query)}
        items = session.execute(select(WorklistItem.id, WorklistItem.accession_number)).all()
        for item_id, accession in items:
            verdicts = explain(session, query, item_id)
            assert all(v.matched for v in verdicts) == (accession in returned), (
                accession, [v.reason for v in verdicts])
            for verdict in verdicts:
                assert verdict.reason  # every key says why


def test_the_site_policy_names_its_rule_in_the_reason(worklist: Store):
    import datetime as dt

    from broker.config import DicomConfig, ModalityConfig
    from broker.site_policy import apply_site_policy

    dicom = DicomConfig(universal_query_days=1, visible_statuses=["SCHEDULED"],
                        modalities={"CR01": ModalityConfig(only_own_items=True)})
    policy = apply_site_policy(WorklistQuery(), dicom, "CR01", today=dt.date(2026, 3, 2))
    assert policy.applied == {"statuses", "scheduled_start_date", "scope_station"}
    assert apply_site_policy(WorklistQuery(accession_number="ACC-4"), DicomConfig(), "X"
                             ).applied == {"statuses"}
    with worklist.reading() as session:
        item_id = session.scalar(select(WorklistItem.id).where(
            WorklistItem.accession_number == "ACC-4"))
        verdicts = explain(session, policy.query, item_id, policy=policy.applied)
    assert [v.reason for v in verdicts if not v.matched] == [
        "only_own_items: station CR01, item US01",
        "universal_query_days: a query with no date and no identifying key gets "
        "20260301-20260303, item 20260304"]
    assert [v.reason for v in verdicts if v.matched] == ["status SCHEDULED is visible"]
