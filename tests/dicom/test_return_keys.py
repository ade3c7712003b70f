"""Return keys and sequence matching over the network (PS3.4 K.2.2.1.2, C.2.2.2.6, K.6-1)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from broker.store import Store
from tests.dicom.conftest import DAY, Running, load, order, start_server
from tests.dicom.scu import find


def _item(*keywords: str, **sequences: Dataset) -> Dataset:
    item = Dataset()
    for keyword in keywords:
        setattr(item, keyword, None)
    for keyword, nested in sequences.items():
        setattr(item, keyword, Sequence([nested]))
    return item


def _code() -> Dataset:
    return _item("CodeValue", "CodingSchemeDesignator", "CodeMeaning")


def _reference() -> Dataset:
    return _item("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")


def type_1_and_2_keys() -> Dataset:
    """Every Type 1, 1C, 2 and 2C return key of PS3.4 table K.6-1, zero-length, nested."""
    step = _item("ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                 "ScheduledProcedureStepStartTime", "Modality", "ScheduledPerformingPhysicianName",
                 "ScheduledProcedureStepDescription", "ScheduledStationName",
                 "ScheduledProcedureStepLocation", "PreMedication", "ScheduledProcedureStepID",
                 "RequestedContrastAgent", ScheduledProtocolCodeSequence=_code())
    return _item(
        # Requested Procedure
        "RequestedProcedureID", "RequestedProcedureDescription", "StudyInstanceUID",
        "RequestedProcedurePriority", "PatientTransportArrangements",
        # Imaging Service Request, Visit
        "AccessionNumber", "RequestingPhysician", "ReferringPhysicianName", "AdmissionID",
        "CurrentPatientLocation",
        # Patient
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientWeight",
        "ConfidentialityConstraintOnPatientDataDescription", "PatientState",
        "PregnancyStatus", "MedicalAlerts", "Allergies", "SpecialNeeds",
        ScheduledProcedureStepSequence=step, RequestedProcedureCodeSequence=_code(),
        ReferencedStudySequence=_reference(), ReferencedPatientSequence=_reference())


def assert_same_shape(asked: Dataset, answer: Dataset, where: str = "") -> None:
    """Every key asked is in the answer, at the same place, and nothing else is."""
    keys = {e.keyword for e in asked} - {"SpecificCharacterSet"}
    got = {e.keyword for e in answer} - {"SpecificCharacterSet"}
    assert got == keys, f"{where or 'top level'}: missing {keys - got}, extra {got - keys}"
    for element in asked:
        if element.VR != "SQ":
            continue
        for index, item in enumerate(answer[element.tag].value):
            assert_same_shape(element.value[0], item, f"{where}{element.keyword}[{index}].")


def test_every_type_1_and_2_key_is_returned_nested_as_asked(running: Running):
    asked = type_1_and_2_keys()
    asked.AccessionNumber = "ACC-MR-1"
    result = find(running.port, asked)
    assert result.final_status == 0x0000
    [answer] = result.identifiers
    assert_same_shape(asked, answer)
    # What the broker stores comes back filled in...
    assert str(answer.PatientName) == "Müller^Hans"
    assert (answer.PatientID, answer.PatientBirthDate, answer.PatientSex) == (
        "12", "19700517", "F")
    assert answer.StudyInstanceUID == "1.2.3.12"
    assert answer.RequestedProcedureID == "RP-ACC-MR-1"
    assert str(answer.ReferringPhysicianName) == "HOUSE^GREGORY"
    [code] = answer.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "MRHEAD", "LOCAL", "MR Schädel")
    [step] = answer.ScheduledProcedureStepSequence
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepID) == (
        "MR", "MR01", "SPS-ACC-MR-1")
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20260302", "093000")
    assert step.ScheduledProcedureStepDescription == "MR Kopf nativ"
    # ...and what it does not store (or the RIS did not send) is present and empty (Type 2),
    # sequences without items.
    for keyword in ("RequestedProcedurePriority", "AdmissionID", "MedicalAlerts", "Allergies",
                    "PatientWeight", "PregnancyStatus"):
        assert answer[keyword].value in (None, ""), keyword
    for keyword in ("ScheduledPerformingPhysicianName", "ScheduledStationName",
                    "ScheduledProcedureStepLocation", "PreMedication"):
        assert step[keyword].value in (None, ""), keyword
    assert len(step.ScheduledProtocolCodeSequence) == 0
    assert len(answer.ReferencedStudySequence) == 0
    assert len(answer.ReferencedPatientSequence) == 0


def test_a_zero_length_step_sequence_returns_the_whole_step(running: Running):
    asked = Dataset()
    asked.AccessionNumber = "ACC-CT-1"
    asked.ScheduledProcedureStepSequence = []
    [answer] = find(running.port, asked).identifiers
    [step] = answer.ScheduledProcedureStepSequence
    type_1_and_2 = {"ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "Modality",
                    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
                    "ScheduledStationName", "ScheduledProcedureStepLocation", "PreMedication",
                    "ScheduledProcedureStepID", "RequestedContrastAgent"}
    assert type_1_and_2 <= {e.keyword for e in step}
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT01")


# --- sequence matching ---------------------------------------------------------------------

def _accessions(port: int, identifier: Dataset) -> list[str]:
    identifier.AccessionNumber = ""
    result = find(port, identifier)
    assert result.final_status == 0x0000
    return [str(ds.AccessionNumber) for ds in result.identifiers]


def test_requested_procedure_code_sequence_item_is_matched(running: Running):
    def by_code(**keys: str) -> list[str]:
        item = Dataset()
        for keyword, value in keys.items():
            setattr(item, keyword, value)
        identifier = Dataset()
        identifier.RequestedProcedureCodeSequence = [item]
        return _accessions(running.port, identifier)

    assert by_code(CodeValue="MRHEAD") == ["ACC-MR-1"]
    assert by_code(CodeValue="MR*", CodingSchemeDesignator="LOCAL") == ["ACC-MR-1"]
    assert by_code(CodeValue="MRHEAD", CodingSchemeDesignator="SNM3") == []
    assert by_code(CodeValue="CTHEAD") == []
    # Items without a code have an unknown code value: it fails the key (K.2.2.1.1.1)...
    assert by_code(CodeValue="*?") == ["ACC-MR-1"]
    # ...while an empty request item is universal matching.
    assert by_code(CodeValue="") == ["ACC-CT-1", "ACC-MR-1", "ACC-MR-2"]


def test_keys_of_sequences_the_broker_does_not_keep_are_universal(running: Running):
    step = Dataset()
    step.Modality = "MR"
    protocol = Dataset()
    protocol.CodeValue = "PROTO-7"
    step.ScheduledProtocolCodeSequence = [protocol]
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5"
    identifier = Dataset()
    identifier.ScheduledProcedureStepSequence = [step]
    identifier.ReferencedStudySequence = [reference]
    identifier.MedicalAlerts = "LATEX"  # an attribute the broker does not keep
    identifier.AccessionNumber = ""
    result = find(running.port, identifier)
    assert [str(ds.AccessionNumber) for ds in result.identifiers] == ["ACC-MR-1", "ACC-MR-2"]
    for answer in result.identifiers:
        assert len(answer.ReferencedStudySequence) == 0
        assert not answer.MedicalAlerts
        assert len(answer.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence) == 0


# --- person names with component groups, in a Japanese modality's character set -----------

YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.fixture
def japanese(worklist_store: Store) -> Iterator[Running]:
    load(worklist_store, [order("ACC-JP-1", "21", YAMADA, "CT",
                                dt.datetime.combine(DAY, dt.time(12, 0)))])
    server = start_server(worklist_store)
    yield Running(server, worklist_store)
    server.stop()


@pytest.mark.parametrize("key", ["Yamada^Tarou", "YAMADA^*", "山田^太郎", "=山田^太郎",
                                 "やまだ^たろう", "Yamada^Tarou=山田^太郎", "*=山田*"])
def test_a_name_key_in_iso_2022_finds_any_component_group(japanese: Running, key: str):
    identifier = Dataset()
    identifier.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    identifier.PatientName = key
    identifier.AccessionNumber = ""
    result = find(japanese.port, identifier)
    assert [str(ds.AccessionNumber) for ds in result.identifiers] == ["ACC-JP-1"]
    answer = result.identifiers[0]
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == YAMADA


def test_a_name_key_for_another_group_finds_nothing(japanese: Running):
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.PatientName = "山田^花子"
    identifier.AccessionNumber = ""
    assert find(japanese.port, identifier).identifiers == []
