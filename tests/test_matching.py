"""Worklist matching against both backends: every rule is a SQL filter that must agree."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from broker.domain import ItemStatus, Order, OrderControl, PatientData, ProcedureData
from broker.matching import InvalidQuery, WorklistQuery, find_worklist, start_interval
from broker.models import WorklistItem
from broker.orders import apply_order
from broker.store import Store

UID_ROOT = "1.2.826.0.1.3680043.10.1491"

ITEMS = [
    # accession, patient id, name, modality, station, start, study uid
    ("ACC-1", "P1", "DOE^JOHN", "CT", "CT01", dt.datetime(2026, 3, 2, 8, 0), "1.2.3.1"),
    ("ACC-2", "P2", "DOE^JANE", "MR", "MR01", dt.datetime(2026, 3, 2, 9, 30), "1.2.3.2"),
    ("ACC-3", "P3", "Müller^Hans", "MR", "MR02", dt.datetime(2026, 3, 3, 10, 0), "1.2.3.3"),
    ("ACC-4", "P4", "DOEX^MAX", "US", "US01", dt.datetime(2026, 3, 4, 18, 0), "1.2.3.4"),
    ("50%_OFF", "P5", "PERCENT^PAT", "CR", "CR01", dt.datetime(2026, 3, 5, 7, 0), "1.2.3.5"),
    ("500OFFX", "P6", "LOOKALIKE^PAT", "CR", "CR01", dt.datetime(2026, 3, 5, 7, 30), "1.2.3.6"),
]


def _order(accession: str, patient_id: str, name: str, modality: str, station: str,
           start: dt.datetime, study_uid: str) -> Order:
    return Order(
        control=OrderControl.NEW,
        patient=PatientData(patient_id=patient_id, patient_name=name),
        procedure=ProcedureData(accession_number=accession, study_instance_uid=study_uid,
                                modality=modality, scheduled_station_ae_title=station,
                                scheduled_start=start, sps_id=f"SPS-{accession}",
                                requested_procedure_id=f"RP-{accession}"),
    )


@pytest.fixture
def worklist(store: Store) -> Store:
    with store.writing() as session:
        for item in ITEMS:
            apply_order(session, _order(*item), uid_root=UID_ROOT)
    return store


def accessions(store: Store, **keys: object) -> list[str]:
    with store.reading() as session:
        return [row.procedure.accession_number
                for row in find_worklist(session, WorklistQuery(**keys))]  # type: ignore[arg-type]


def set_status(store: Store, accession: str, status: ItemStatus) -> None:
    with store.writing() as session:
        item = session.query(WorklistItem).filter_by(accession_number=accession).one()
        item.status = status


def test_universal_query_returns_everything_by_scheduled_start(worklist):
    assert accessions(worklist) == [item[0] for item in ITEMS]
    assert accessions(worklist, accession_number="*") == [item[0] for item in ITEMS]


def test_single_value_is_exact(worklist):
    assert accessions(worklist, accession_number="ACC-2") == ["ACC-2"]
    assert accessions(worklist, accession_number="ACC") == []
    assert accessions(worklist, accession_number="acc-2") == []  # not PN: case matters
    assert accessions(worklist, patient_id="P3") == ["ACC-3"]
    assert accessions(worklist, sps_id="SPS-ACC-4") == ["ACC-4"]
    assert accessions(worklist, requested_procedure_id="RP-ACC-1") == ["ACC-1"]


def test_patient_name_wildcards_ignore_case(worklist):
    assert accessions(worklist, patient_name="DOE*") == ["ACC-1", "ACC-2", "ACC-4"]
    assert accessions(worklist, patient_name="DOE^*") == ["ACC-1", "ACC-2"]
    assert accessions(worklist, patient_name="doe^ja?e") == ["ACC-2"]
    assert accessions(worklist, patient_name="DOE^JOHN") == ["ACC-1"]
    assert accessions(worklist, patient_name="doe^john") == ["ACC-1"]
    assert accessions(worklist, patient_name="DOE") == []
    assert accessions(worklist, patient_name="Müller^Hans") == ["ACC-3"]
    assert accessions(worklist, patient_name="M?ller*") == ["ACC-3"]
    assert accessions(worklist, patient_name="doe^john", names_case_sensitive=True) == []


def test_wildcards_on_other_keys_are_case_sensitive(worklist):
    assert accessions(worklist, accession_number="ACC-?") == ["ACC-1", "ACC-2", "ACC-3",
                                                              "ACC-4"]
    assert accessions(worklist, accession_number="acc-*") == []
    assert accessions(worklist, scheduled_station_ae_title="MR*") == ["ACC-2", "ACC-3"]


def test_like_characters_in_values_are_literal(worklist):
    # "%" and "_" are SQL wildcards, not DICOM ones: 50%_OFF must not match 500OFFX.
    assert accessions(worklist, accession_number="50%_OFF") == ["50%_OFF"]
    assert accessions(worklist, accession_number="50%_*") == ["50%_OFF"]
    assert accessions(worklist, accession_number="50?_OFF") == ["50%_OFF"]
    assert accessions(worklist, accession_number="*_*") == ["50%_OFF"]
    assert accessions(worklist, accession_number="50_*") == []


def test_modality_and_station(worklist):
    assert accessions(worklist, modality="MR") == ["ACC-2", "ACC-3"]
    assert accessions(worklist, modality="CT\\US") == ["ACC-1", "ACC-4"]
    assert accessions(worklist, modality="MR", scheduled_station_ae_title="MR02") == ["ACC-3"]
    assert accessions(worklist, scheduled_station_ae_title="CT01") == ["ACC-1"]


def test_study_instance_uid_list(worklist):
    assert accessions(worklist, study_instance_uid="1.2.3.2") == ["ACC-2"]
    assert accessions(worklist, study_instance_uid="1.2.3.1\\1.2.3.4\\9.9") == ["ACC-1", "ACC-4"]
    assert accessions(worklist, study_instance_uid="1.2.3") == []


def test_date_single_and_ranges(worklist):
    assert accessions(worklist, scheduled_start_date="20260302") == ["ACC-1", "ACC-2"]
    assert accessions(worklist, scheduled_start_date="20260303-20260304") == ["ACC-3", "ACC-4"]
    assert accessions(worklist, scheduled_start_date="-20260302") == ["ACC-1", "ACC-2"]
    assert accessions(worklist, scheduled_start_date="20260304-") == ["ACC-4", "50%_OFF",
                                                                      "500OFFX"]
    assert accessions(worklist, scheduled_start_date="2026.03.03") == ["ACC-3"]
    assert accessions(worklist, scheduled_start_date="20260301") == []


def test_date_and_time_form_one_combined_range(worklist):
    # PS3.4 C.2.2.2.5: 2 March 09:00 up to 4 March 10:00, not 09:00-10:00 on each day.
    assert accessions(worklist, scheduled_start_date="20260302-20260304",
                      scheduled_start_time="0900-1000") == ["ACC-2", "ACC-3"]
    assert accessions(worklist, scheduled_start_date="20260302",
                      scheduled_start_time="0930") == ["ACC-2"]
    assert accessions(worklist, scheduled_start_date="20260302",
                      scheduled_start_time="-0800") == ["ACC-1"]
    assert accessions(worklist, scheduled_start_date="20260305",
                      scheduled_start_time="0715-") == ["500OFFX"]


def test_time_alone_is_a_time_of_day_on_any_date(worklist):
    assert accessions(worklist, scheduled_start_time="0700-0800") == ["ACC-1", "50%_OFF",
                                                                      "500OFFX"]
    assert accessions(worklist, scheduled_start_time="1000") == ["ACC-3"]
    assert accessions(worklist, scheduled_start_time="1700-") == ["ACC-4"]


def test_statuses_hide_finished_and_cancelled_items(worklist):
    set_status(worklist, "ACC-1", ItemStatus.IN_PROGRESS)
    set_status(worklist, "ACC-2", ItemStatus.COMPLETED)
    set_status(worklist, "ACC-3", ItemStatus.CANCELLED)
    set_status(worklist, "ACC-4", ItemStatus.DISCONTINUED)
    assert accessions(worklist, modality="CT\\MR\\US") == ["ACC-1"]
    assert accessions(worklist, accession_number="ACC-2") == []
    assert accessions(worklist, accession_number="ACC-*",
                      statuses=tuple(ItemStatus)) == ["ACC-1", "ACC-2", "ACC-3", "ACC-4"]
    assert accessions(worklist, statuses=(ItemStatus.CANCELLED,)) == ["ACC-3"]
    assert accessions(worklist, statuses=()) == []


def test_limit_caps_the_answer(worklist):
    assert accessions(worklist, limit=2) == ["ACC-1", "ACC-2"]


@pytest.mark.parametrize("date, time", [
    ("2026-03-02", None), ("20261302", None), ("-", None), ("20260305-20260301", None),
    ("20260302", "25"), ("20260302", "0900-1000-1100"), ("20260302", "1800-0900"),
])
def test_malformed_dates_and_ranges_are_invalid_queries(worklist, date, time):
    with pytest.raises(InvalidQuery):
        accessions(worklist, scheduled_start_date=date, scheduled_start_time=time)


def test_start_interval_rules():
    assert start_interval("20260302", None) == (dt.datetime(2026, 3, 2),
                                                dt.datetime(2026, 3, 3))
    assert start_interval("20260302-20260304", "1000-1800") == (
        dt.datetime(2026, 3, 2, 10), dt.datetime(2026, 3, 4, 18, 1))
    assert start_interval("-20260302", "1000-") == (None, dt.datetime(2026, 3, 3))
    assert start_interval(None, "1000") == (None, None)


def test_query_is_a_plain_value_object():
    query = WorklistQuery(accession_number="X")
    assert dataclasses.replace(query, limit=5).limit == 5
    assert query.statuses == (ItemStatus.SCHEDULED, ItemStatus.IN_PROGRESS)


# --- every stored attribute is a matching key ----------------------------------------------

RICH = [
    Order(OrderControl.NEW,
          PatientData(patient_id="R1", patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
                      birth_date=dt.date(1970, 5, 17), sex="M"),
          ProcedureData(accession_number="R-1", study_instance_uid="1.2.9.1",
                        modality="CT", scheduled_start=dt.datetime(2026, 3, 2, 8, 0),
                        requesting_physician="WILSON^JAMES", placer_order_number="PL-1",
                        filler_order_number="FI-1", requested_procedure_description="CT HEAD",
                        requested_procedure_code_value="CTHEAD",
                        requested_procedure_code_scheme="LOCAL",
                        requested_procedure_code_meaning="CT head plain",
                        sps_description="Head without contrast")),
    Order(OrderControl.NEW,
          PatientData(patient_id="R2", patient_name="Müller^Hans", birth_date=dt.date(1955, 1, 2),
                      sex="F"),
          ProcedureData(accession_number="R-2", study_instance_uid="1.2.9.2",
                        modality="MR", scheduled_start=dt.datetime(2026, 3, 2, 9, 0),
                        requesting_physician="CUDDY^LISA", referring_physician_name="HOUSE^G",
                        requested_procedure_code_value="MRKNEE",
                        requested_procedure_code_scheme="LOCAL",
                        requested_procedure_description="MR knee")),
    Order(OrderControl.NEW,
          PatientData(patient_id="R3", patient_name="SMITH^ANNA^^"),
          ProcedureData(accession_number="R-3", study_instance_uid="1.2.9.3", modality="US",
                        scheduled_start=dt.datetime(2026, 3, 2, 10, 0))),
]


@pytest.fixture
def rich(store: Store) -> Store:
    with store.writing() as session:
        for order in RICH:
            apply_order(session, order, uid_root=UID_ROOT)
    return store


def test_patient_demographics_are_matching_keys(rich):
    assert accessions(rich, patient_sex="F") == ["R-2"]
    assert accessions(rich, patient_sex="M\\F") == ["R-1", "R-2"]
    assert accessions(rich, patient_birth_date="19700517") == ["R-1"]
    assert accessions(rich, patient_birth_date="19500101-19601231") == ["R-2"]
    assert accessions(rich, patient_birth_date="-19700517") == ["R-1", "R-2"]
    assert accessions(rich, patient_birth_date="19600101-") == ["R-1"]
    # An unknown birth date fails any key (PS3.4 K.2.2.1.1.1): R-3 has none.
    assert "R-3" not in accessions(rich, patient_birth_date="-20991231")
    with pytest.raises(InvalidQuery):
        accessions(rich, patient_birth_date="19700517-19600101")


def test_order_and_procedure_attributes_are_matching_keys(rich):
    assert accessions(rich, requesting_physician="wilson^*") == ["R-1"]
    assert accessions(rich, referring_physician_name="HOUSE^G") == ["R-2"]
    assert accessions(rich, placer_order_number="PL-1") == ["R-1"]
    assert accessions(rich, filler_order_number="FI-?") == ["R-1"]
    assert accessions(rich, requested_procedure_description="MR*") == ["R-2"]
    assert accessions(rich, sps_description="*contrast") == ["R-1"]
    assert accessions(rich, sps_description="*CONTRAST") == []  # LO: case matters


def test_requested_procedure_code_sequence_item_keys(rich):
    assert accessions(rich, requested_procedure_code_value="MRKNEE") == ["R-2"]
    assert accessions(rich, requested_procedure_code_scheme="LOCAL") == ["R-1", "R-2"]
    assert accessions(rich, requested_procedure_code_value="CT*",
                      requested_procedure_code_scheme="LOCAL") == ["R-1"]
    # All keys of the item must match the same (here: the only) stored item.
    assert accessions(rich, requested_procedure_code_value="CTHEAD",
                      requested_procedure_code_meaning="MR*") == []


# --- person names: component groups, case -------------------------------------------------

@pytest.mark.parametrize("key", [
    "Yamada^Tarou", "yamada^tarou", "YAMADA*", "山田^太郎", "山田*", "やまだ^たろう", "*たろう",
    "Yamada^Tarou=山田^太郎", "=山田^太郎", "==やまだ^たろう", "*=山田^太郎=*", "Y*=山田*",
    "Yamada^Tarou^^=山田^太郎", "Yamada^Tarou\\NOBODY",
])
def test_a_name_key_matches_any_group_or_group_by_group(rich, key):
    assert accessions(rich, patient_name=key) == ["R-1"]


@pytest.mark.parametrize("key", [
    "Yamada",  # one component of a group is not the group
    "Yamada*太郎",  # a wild card never reaches across "="
    "Yamada^Tarou=山田^花子",  # the ideographic group differs
    "=Yamada^Tarou",  # the alphabetic name is not the ideographic group
    "===x",  # a fourth group nobody has
])
def test_a_name_key_does_not_match_across_or_into_the_wrong_group(rich, key):
    assert accessions(rich, patient_name=key) == []


def test_a_group_the_stored_name_lacks_fails_the_key(rich):
    assert accessions(rich, patient_name="=?*") == ["R-1"]  # any non-empty ideographic group
    assert accessions(rich, patient_name="=*") == ["R-1", "R-2", "R-3"]  # "*" asks nothing
    assert accessions(rich, patient_name="Müller^Hans=ミュラー") == []


def test_name_case_folds_beyond_ascii_and_can_be_made_strict(rich):
    assert accessions(rich, patient_name="MÜLLER^HANS") == ["R-2"]
    assert accessions(rich, patient_name="mü*") == ["R-2"]
    assert accessions(rich, patient_name="müller^hans", names_case_sensitive=True) == []
    assert accessions(rich, patient_name="Müller^Hans", names_case_sensitive=True) == ["R-2"]
    assert accessions(rich, patient_name="yamada^tarou", names_case_sensitive=True) == []


def test_stored_trailing_empty_components_do_not_hide_a_name(rich):
    assert accessions(rich, patient_name="SMITH^ANNA") == ["R-3"]
    assert accessions(rich, patient_name="smith^*") == ["R-3"]


def test_regex_characters_in_a_name_key_are_literal(rich):
    assert accessions(rich, patient_name="Yamada.Tarou") == []
    assert accessions(rich, patient_name="(Yamada)^Tarou") == []
    assert accessions(rich, patient_name="Yamada^Tarou|.*") == []
