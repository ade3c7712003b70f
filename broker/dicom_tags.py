"""The tags of the worklist attributes read and written by name, looked up once in pydicom's
dictionary: one list for the item's dataset (broker.item_dataset), the DICOM edge's renderer
and its identifier reader."""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword


def tag(keyword: str) -> int:
    found = tag_for_keyword(keyword)
    if found is None:  # pragma: no cover - a typo in this module
        raise KeyError(keyword)
    return found


SPECIFIC_CHARACTER_SET = tag("SpecificCharacterSet")
SPS_SEQUENCE = tag("ScheduledProcedureStepSequence")
CODE_SEQUENCE = tag("RequestedProcedureCodeSequence")
PATIENT_NAME = tag("PatientName")
PATIENT_ID = tag("PatientID")
ISSUER_OF_PATIENT_ID = tag("IssuerOfPatientID")
PATIENT_BIRTH_DATE = tag("PatientBirthDate")
PATIENT_SEX = tag("PatientSex")
ACCESSION_NUMBER = tag("AccessionNumber")
REFERRING_PHYSICIAN = tag("ReferringPhysicianName")
REQUESTING_PHYSICIAN = tag("RequestingPhysician")
STUDY_INSTANCE_UID = tag("StudyInstanceUID")
REQUESTED_PROCEDURE_ID = tag("RequestedProcedureID")
REQUESTED_PROCEDURE_DESCRIPTION = tag("RequestedProcedureDescription")
PLACER_ORDER = tag("PlacerOrderNumberImagingServiceRequest")
FILLER_ORDER = tag("FillerOrderNumberImagingServiceRequest")
CODE_VALUE = tag("CodeValue")
CODING_SCHEME = tag("CodingSchemeDesignator")
CODE_MEANING = tag("CodeMeaning")
MODALITY = tag("Modality")
STATION_AE_TITLE = tag("ScheduledStationAETitle")
SPS_START_DATE = tag("ScheduledProcedureStepStartDate")
SPS_START_TIME = tag("ScheduledProcedureStepStartTime")
SPS_ID = tag("ScheduledProcedureStepID")
SPS_DESCRIPTION = tag("ScheduledProcedureStepDescription")
SPS_STATUS = tag("ScheduledProcedureStepStatus")
PERFORMING_PHYSICIAN = tag("ScheduledPerformingPhysicianName")
STATION_NAME = tag("ScheduledStationName")
PRIORITY = tag("RequestedProcedurePriority")
SPS_LOCATION = tag("ScheduledProcedureStepLocation")
PRE_MEDICATION = tag("PreMedication")
CONTRAST_AGENT = tag("RequestedContrastAgent")
