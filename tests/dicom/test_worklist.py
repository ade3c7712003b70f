"""The C-FIND edge without the network: identifiers into queries, rows into responses."""

from __future__ import annotations

import datetime as dt

from pydicom import Dataset

from broker.dicom.worklist import query_from_identifier, render_response
from broker.domain import ItemStatus, PatientData, ProcedureData, WorklistRow

ROW = WorklistRow(
    patient=PatientData("P1", issuer_of_patient_id="HOSP", patient_name="Müller^Hans",
                        birth_date=dt.date(1960, 1, 2), sex="M"),
    procedure=ProcedureData(
        accession_number="ACC1", study_instance_uid="1.2.3", requested_procedure_id="RP1",
        requested_procedure_description="MR head", requested_procedure_code_value="MRH",
        requested_procedure_code_scheme="LOCAL", requested_procedure_code_meaning="MR Schädel",
        sps_id="SPS1", sps_description="Kopf", modality="MR", scheduled_station_ae_title="MR01",
        scheduled_start=dt.datetime(2026, 3, 2, 9, 30), referring_physician_name="HOUSE^G",
        requesting_physician="WILSON^J", placer_order_number="PL1", filler_order_number="FI1"),
    status=ItemStatus.IN_PROGRESS,
)


def step(**keys: object) -> Dataset:
    item = Dataset()
    for keyword, value in keys.items():
        setattr(item, keyword, value)
    return item


def test_query_reads_top_level_keys_and_the_first_step_item():
    ds = Dataset()
    ds.AccessionNumber = "ACC*"
    ds.PatientName = "DOE^J*"
    ds.PatientID = ""
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    ds.ScheduledProcedureStepSequence = [
        step(Modality="MR", ScheduledStationAETitle="MR01",
             ScheduledProcedureStepStartDate="20260302-20260303",
             ScheduledProcedureStepStartTime="0800-", ScheduledProcedureStepID="S1"),
        step(Modality="CT"),
    ]
    query = query_from_identifier(ds, max_matches=50)
    assert query.accession_number == "ACC*"
    assert query.patient_name == "DOE^J*"
    assert query.patient_id is None  # zero length: universal
    assert query.study_instance_uid == "1.2.3\\1.2.4"
    assert query.modality == "MR"
    assert query.scheduled_station_ae_title == "MR01"
    assert query.scheduled_start_date == "20260302-20260303"
    assert query.scheduled_start_time == "0800-"
    assert query.sps_id == "S1"
    assert query.limit == 50
    assert query.statuses == (ItemStatus.SCHEDULED, ItemStatus.IN_PROGRESS)


def test_query_drops_empty_trailing_name_components():
    ds = Dataset()
    ds.PatientName = "DOE^JOHN^^^"
    ds.ReferringPhysicianName = "^^"
    query = query_from_identifier(ds, max_matches=10)
    assert query.patient_name == "DOE^JOHN"
    assert query.referring_physician_name is None


def test_query_ignores_unknown_keys_and_maps_step_status():
    ds = Dataset()
    ds.PatientWeight = None
    ds.add_new(0x00091010, "LO", "vendor")
    ds.ScheduledProcedureStepSequence = [step(ScheduledProcedureStepStatus="STARTED")]
    query = query_from_identifier(ds, max_matches=10)
    assert query.statuses == (ItemStatus.IN_PROGRESS,)
    assert query.accession_number is None and query.modality is None
    ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = "ARRIVED"
    assert query_from_identifier(ds, max_matches=10).statuses == ()


def test_response_holds_only_the_keys_asked_nested_as_asked():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = ""
    ds.PatientName = "M*"
    ds.PatientWeight = None  # not stored: returned empty
    ds.add_new(0x00091010, "LO", "vendor")  # private: not returned
    ds.ScheduledProcedureStepSequence = [step(Modality="", ScheduledProcedureStepStartDate="",
                                              ScheduledProcedureStepStatus="")]
    response = render_response(ds, ROW)
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert response.AccessionNumber == "ACC1"
    assert str(response.PatientName) == "Müller^Hans"
    assert "PatientWeight" in response and not response.PatientWeight
    assert 0x00091010 not in response
    assert "PatientID" not in response
    item = response.ScheduledProcedureStepSequence[0]
    assert item.Modality == "MR"
    assert item.ScheduledProcedureStepStartDate == "20260302"
    assert item.ScheduledProcedureStepStatus == "STARTED"
    assert "ScheduledStationAETitle" not in item
    assert sorted(e.keyword for e in response) == [
        "AccessionNumber", "PatientName", "PatientWeight", "ScheduledProcedureStepSequence",
        "SpecificCharacterSet"]


def test_zero_length_sequences_return_their_whole_content():
    ds = Dataset()
    ds.ScheduledProcedureStepSequence = []
    ds.RequestedProcedureCodeSequence = [Dataset()]  # a zero-length item means the same
    ds.ReferencedStudySequence = []  # not stored: an empty sequence
    response = render_response(ds, ROW)
    item = response.ScheduledProcedureStepSequence[0]
    assert item.ScheduledStationAETitle == "MR01"
    assert item.ScheduledProcedureStepStartTime == "093000"
    assert item.ScheduledProcedureStepID == "SPS1"
    assert item.ScheduledProcedureStepDescription == "Kopf"
    assert "ScheduledPerformingPhysicianName" in item
    code = response.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "MRH", "LOCAL", "MR Schädel")
    assert len(response.ReferencedStudySequence) == 0


def test_every_stored_attribute_can_be_asked_for():
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "ReferringPhysicianName",
                    "RequestingPhysician", "StudyInstanceUID", "RequestedProcedureID",
                    "RequestedProcedureDescription", "PlacerOrderNumberImagingServiceRequest",
                    "FillerOrderNumberImagingServiceRequest"):
        setattr(ds, keyword, None)
    response = render_response(ds, ROW)
    assert response.IssuerOfPatientID == "HOSP"
    assert response.PatientBirthDate == "19600102"
    assert response.PatientSex == "M"
    assert str(response.ReferringPhysicianName) == "HOUSE^G"
    assert str(response.RequestingPhysician) == "WILSON^J"
    assert response.StudyInstanceUID == "1.2.3"
    assert response.RequestedProcedureID == "RP1"
    assert response.RequestedProcedureDescription == "MR head"
    assert response.PlacerOrderNumberImagingServiceRequest == "PL1"
    assert response.FillerOrderNumberImagingServiceRequest == "FI1"


def test_item_without_code_gives_an_empty_code_sequence():
    row = WorklistRow(ROW.patient, ProcedureData("ACC2"), ItemStatus.SCHEDULED)
    ds = Dataset()
    ds.RequestedProcedureCodeSequence = []
    ds.ScheduledProcedureStepSequence = [step(ScheduledProcedureStepStartDate="",
                                              ScheduledProcedureStepStatus="")]
    response = render_response(ds, row)
    assert len(response.RequestedProcedureCodeSequence) == 0
    item = response.ScheduledProcedureStepSequence[0]
    assert not item.ScheduledProcedureStepStartDate
    assert item.ScheduledProcedureStepStatus == "SCHEDULED"


def test_query_reads_every_stored_key_and_the_code_sequence_item():
    ds = Dataset()
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19500101-19601231"
    ds.RequestingPhysician = "WILSON^*^^"
    ds.PlacerOrderNumberImagingServiceRequest = "PL1"
    ds.FillerOrderNumberImagingServiceRequest = "FI*"
    ds.RequestedProcedureDescription = "MR*"
    code = Dataset()
    code.CodeValue = "MRH"
    code.CodingSchemeDesignator = ""
    code.CodeMeaning = "*Schädel"
    ds.RequestedProcedureCodeSequence = [code]
    ds.ScheduledProcedureStepSequence = [step(ScheduledProcedureStepDescription="Kopf*")]
    query = query_from_identifier(ds, max_matches=10, names_case_sensitive=True)
    assert (query.patient_sex, query.patient_birth_date) == ("F", "19500101-19601231")
    assert query.requesting_physician == "WILSON^*"
    assert (query.placer_order_number, query.filler_order_number) == ("PL1", "FI*")
    assert query.requested_procedure_description == "MR*"
    assert query.requested_procedure_code_value == "MRH"
    assert query.requested_procedure_code_scheme is None  # zero length: universal
    assert query.requested_procedure_code_meaning == "*Schädel"
    assert query.sps_description == "Kopf*"
    assert query.names_case_sensitive is True


def test_an_empty_code_sequence_item_is_universal():
    ds = Dataset()
    ds.RequestedProcedureCodeSequence = [Dataset()]
    query = query_from_identifier(ds, max_matches=10)
    assert query.requested_procedure_code_value is None
    assert query.names_case_sensitive is False
