from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from broker.domain import OrderControl
from broker.errors import ConfigError, InvalidOrder, UnsupportedMessage
from hl7_listener.mapping import load_mapping
from hl7_listener.message import MessageError, parse
from tests.messages import orm

REPO = Path(__file__).resolve().parents[2]
MAPPING = load_mapping(REPO / "config" / "mapping.yaml")


def order(**kwargs):
    return MAPPING.to_order(parse(orm(**kwargs).encode()))


def test_default_mapping_follows_the_ihe_table():
    result = order(patient_name="MUSTERMANN^ERIKA^M^JR^DR", study_uid="1.2.840.99.1")
    p, proc = result.patient, result.procedure
    assert result.control is OrderControl.NEW and result.message_control_id == "MSG-1"
    assert (p.patient_id, p.issuer_of_patient_id) == ("PAT-1", "HOSP")
    # HL7 XPN family^given^middle^suffix^prefix -> DICOM family^given^middle^prefix^suffix
    assert p.patient_name == "MUSTERMANN^ERIKA^M^DR^JR"
    assert (p.birth_date, p.sex) == (dt.date(1965, 4, 12), "F")
    assert proc.referring_physician_name == "HOUSE^GREGORY^^DR"  # PV1-8 XCN
    assert proc.requesting_physician == "WILSON^JAMES"  # OBR-16 XCN
    assert (proc.placer_order_number, proc.filler_order_number) == ("PLC-1", "FIL-1")
    assert (proc.requested_procedure_code_value, proc.requested_procedure_code_meaning,
            proc.requested_procedure_code_scheme) == ("CTHEAD", "CT Head", "LOCAL")
    assert proc.requested_procedure_description == "CT Head"
    assert (proc.accession_number, proc.requested_procedure_id, proc.sps_id) == (
        "ACC-1", "RP-1", "SPS-1")
    assert proc.modality == "CT"
    assert proc.scheduled_start == dt.datetime(2026, 11, 29, 9, 30)
    assert proc.study_instance_uid == "1.2.840.99.1"  # ZDS-1 survives hl7apy's parse


def test_v25_takes_the_start_from_tq1():
    result = order(version="2.5", tq1=True, start="202612011415")
    assert result.procedure.scheduled_start == dt.datetime(2026, 12, 1, 14, 15)


def test_without_zds_the_study_uid_is_left_to_the_core():
    assert order().procedure.study_instance_uid is None


def test_sloppy_terminators_escapes_and_charsets():
    text = orm(code="CT^Head \\T\\ neck \\X41\\^L", terminator="\r\n",
               patient_name="M\\S\\LLER^J")
    result = MAPPING.to_order(parse(text.encode()))
    assert result.procedure.requested_procedure_description == "Head & neck A"
    assert result.patient.patient_name == "M^LLER^J"
    latin = orm(patient_name="MÜLLER^JÜRGEN", charset="8859/1", terminator="\n")
    assert MAPPING.to_order(parse(latin.encode("latin-1"))).patient.patient_name == (
        "MÜLLER^JÜRGEN")
    utf8 = orm(patient_name="ŁUKASZ^ŻÓŁW", charset="UNICODE UTF-8")
    assert MAPPING.to_order(parse(utf8.encode())).patient.patient_name == "ŁUKASZ^ŻÓŁW"


def test_wrong_declared_charset_is_refused_not_stored_as_mojibake():
    bad = orm(patient_name="MÜLLER", charset="ASCII").encode("latin-1")
    with pytest.raises(MessageError, match="not valid ASCII"):
        parse(bad)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"accession": ""}, "OBR-18 AccessionNumber is required"),
    ({"patient_id": ""}, "PID-3.1 PatientID is required"),
    ({"birth_date": "19651399"}, "PID-7 PatientBirthDate '19651399' is not a valid date"),
    ({"start": "tomorrow"}, "OBR-27.4 ScheduledProcedureStepStartDate 'tomorrow' is not"),
    ({"accession": "A" * 17}, "OBR-18 AccessionNumber 'AAAAAAAAAAAAAAAAA' is longer than 16"),
    ({"study_uid": "1.2.abc"}, "ZDS-1.1 StudyInstanceUID '1.2.abc' is not a DICOM UID"),
])
def test_invalid_values_name_the_field(kwargs, error):
    with pytest.raises(InvalidOrder) as info:
        order(**kwargs)
    assert str(info.value).startswith(error)


def test_unknown_order_control_is_refused():
    with pytest.raises(UnsupportedMessage, match="ORC-1 order control 'ZZ'"):
        order(control="ZZ")


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("attributes:\n  PatientID: PID-3.1\n  AccessionNumber: OBR-18\n  PatientNme: PID-5\n",
     ":4: 'PatientNme' is not a DICOM attribute"),
    ("attributes:\n  PatientID: PID-3.x\n  AccessionNumber: OBR-18\n",
     ":2: PatientID: 'PID-3.x' is not a field path"),
    ("attributes:\n  PatientID: {from: PID-3.1, requird: true}\n  AccessionNumber: OBR-18\n",
     "unknown option(s) requird"),
    ("attributes:\n  PatientID: PID-3.1\n", "AccessionNumber must be mapped"),
    ("attributes: [1\n", "not valid YAML"),
])
def test_bad_mapping_is_refused_with_file_line_and_key(tmp_path, yaml_text, message):
    path = tmp_path / "mapping.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_mapping(path)
    assert message in str(info.value) and str(path) in str(info.value)


MAPPING_WITH_TABLES = """
tables:
  modality_by_code: {CTHEAD: CT, MRKNEE: MR}
attributes:
  PatientID: {from: "PID-3[5=MR].1", required: true}
  IssuerOfPatientID: "PID-3[5=MR].4"
  PatientName: {from: "PID-5[*]", transform: [upper]}
  PatientBirthDate: {from: PID-7, date_format: "%d.%m.%Y"}
  AccessionNumber: {from: OBR-18, required: true}
  RequestedProcedureDescription: {from: OBR-4.2, truncate: true}
  ScheduledProcedureStepSequence.Modality: {from: OBR-4.1, table: modality_by_code}
  ScheduledProcedureStepSequence.ScheduledStationAETitle: {default: CT_ROOM1}
"""


def _with_tables(tmp_path):
    path = tmp_path / "mapping.yaml"
    path.write_text(MAPPING_WITH_TABLES)
    return load_mapping(path)


def test_repetition_filters_tables_transforms_and_constants(tmp_path):
    mapping = _with_tables(tmp_path)
    text = orm(birth_date="12.04.1965", code="CTHEAD^" + "Long description " * 5 + "^L",
               patient_name="~doe^jane",
               extra_pid={3: "X-9^^^OTHER^PI~MRN-1^^^HOSP^MR"})
    result = mapping.to_order(parse(text.encode()))
    assert (result.patient.patient_id, result.patient.issuer_of_patient_id) == ("MRN-1", "HOSP")
    assert result.patient.patient_name == "DOE^JANE"  # first non-empty repetition, upper-cased
    assert result.patient.birth_date == dt.date(1965, 4, 12)
    assert len(result.procedure.requested_procedure_description) == 64
    assert result.procedure.modality == "CT"
    assert result.procedure.scheduled_station_ae_title == "CT_ROOM1"


def test_table_miss_is_ae_103_naming_the_field(tmp_path):
    mapping = _with_tables(tmp_path)
    text = orm(code="XRHAND^Hand^L", extra_pid={3: "MRN-1^^^HOSP^MR"}, birth_date="12.04.1965")
    with pytest.raises(InvalidOrder) as info:
        mapping.to_order(parse(text.encode()))
    assert info.value.code == "103"
    assert str(info.value) == "OBR-4.1 Modality: 'XRHAND' is not in the mapping's table"


def test_unknown_table_and_transform_are_refused_at_load(tmp_path):
    path = tmp_path / "mapping.yaml"
    path.write_text(MAPPING_WITH_TABLES.replace("table: modality_by_code", "table: nope"))
    with pytest.raises(ConfigError, match=r":11: .*Modality: unknown table 'nope'"):
        load_mapping(path)
    path.write_text(MAPPING_WITH_TABLES.replace("[upper]", "[shout]"))
    with pytest.raises(ConfigError, match="unknown transform"):
        load_mapping(path)
    path.write_text(MAPPING_WITH_TABLES.replace('"PID-3[5=MR].4"', '"PID-3[=MR].4"'))
    with pytest.raises(ConfigError, match=r":6: IssuerOfPatientID: .*repetition \[=MR\] is not"):
        load_mapping(path)


def test_step_keys_added_in_revision_0002_can_be_mapped(tmp_path):
    path = tmp_path / "mapping.yaml"
    path.write_text("""
tables:
  priority: {SC: ROUTINE, S: STAT}
attributes:
  PatientID: {from: PID-3.1, required: true}
  AccessionNumber: {from: OBR-18, required: true}
  ScheduledProcedureStepSequence.ScheduledPerformingPhysicianName: PV1-8
  ScheduledProcedureStepSequence.ScheduledStationName: {from: OBR-24, transform: [lower]}
  RequestedProcedurePriority: {from: ORC-5, table: priority}
""")
    procedure = load_mapping(path).to_order(parse(orm().encode())).procedure
    assert procedure.scheduled_performing_physician_name == "HOUSE^GREGORY^^DR"
    assert procedure.scheduled_station_name == "ct"
    assert procedure.requested_procedure_priority == "ROUTINE"
