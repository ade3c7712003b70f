"""Answers encoded once per query shape (broker.dicom.worklist.answer_encoder): the same bytes
as a fresh rendering in every transfer syntax, and never a stale answer once an item changed."""

from __future__ import annotations

from dataclasses import replace
from io import BytesIO

import pytest
from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

from broker.dicom.worklist import answer_encoder, render_response
from broker.domain import ItemStatus, OrderControl, PatientData, ProcedureData, WorklistRow
from tests.dicom.conftest import ORDERS, Running, load
from tests.dicom.scu import find

ROW = WorklistRow(
    PatientData("P1", None, "Müller^Hans=山田^太郎"),
    ProcedureData("A1", requested_procedure_code_value="X", requested_procedure_code_scheme="L",
                  requested_procedure_code_meaning="MR Schädel", modality="CT",
                  scheduled_station_ae_title="CT1\\CT2",
                  item_dataset='{"00101030":{"vr":"DS","Value":["70"]},'
                               '"001021C0":{"vr":"US","Value":[3]}}'),
    ItemStatus.SCHEDULED)


def _query() -> Dataset:
    query = Dataset()
    query.PatientName = query.PatientWeight = ""
    query.PregnancyStatus = None
    code = Dataset()
    code.CodeMeaning = ""
    query.RequestedProcedureCodeSequence = [code]
    query.ScheduledProcedureStepSequence = []
    return query


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
def test_a_kept_answer_is_the_fresh_one_byte_for_byte(implicit, little):
    answer = answer_encoder(_query(), implicit_vr=implicit, little_endian=little)
    for _ in range(2):  # the second is served from the cache
        encoded = encode(answer(ROW), implicit, little)
        assert encoded == encode(render_response(_query(), ROW), implicit, little)
    back = decode(BytesIO(encoded), implicit, little)
    assert back.RequestedProcedureCodeSequence[0].CodeMeaning == "MR Schädel"
    assert (str(back.PatientName), back.PregnancyStatus) == ("Müller^Hans=山田^太郎", 3)


def test_a_kept_answer_in_a_modalitys_character_set():
    answer = answer_encoder(_query(), character_set="ISO_IR 100")
    back = decode(BytesIO(encode(answer(ROW), True, True)), True, True)
    assert back.SpecificCharacterSet == "ISO_IR 100"
    assert back.RequestedProcedureCodeSequence[0].CodeMeaning == "MR Schädel"
    # Latin-1 holds ü; the ideographic group cannot be held (nor transliterated).
    assert str(back.PatientName) == "Müller^Hans=??^??"


def test_an_item_that_changes_is_answered_anew(running: Running):
    query = Dataset()
    query.AccessionNumber = "ACC-CT-1"
    query.ScheduledProcedureStepSequence = []
    first = find(running.port, query).identifiers
    assert first[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription == ""
    changed = replace(ORDERS[0], control=OrderControl.CHANGE,
                      procedure=replace(ORDERS[0].procedure, sps_description="CT Thorax"))
    load(running.store, [changed])
    again = find(running.port, query).identifiers
    assert again[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription == (
        "CT Thorax")


def test_kept_answers_are_out_of_the_garbage_collectors_sight():
    """Kept as Datasets, 20,000 answers were a million objects for every full collection to
    walk, over 100 ms with every thread stopped: kept answers and their keys hold only
    atomic values, which the collector stops tracking."""
    import gc

    from broker.dicom import worklist

    answer_encoder(_query(), implicit_vr=False)(ROW)
    gc.collect()
    gc.collect()  # tuples are let go of inside out, one level per collection
    kept = [(key, value) for key, value in list(worklist._answers.items())
            if key[1] == worklist._row_key(ROW)]
    assert kept
    assert not any(gc.is_tracked(key) or gc.is_tracked(value) for key, value in kept)
