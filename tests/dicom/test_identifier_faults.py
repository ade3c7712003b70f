"""C-FIND identifiers a fuzzer found to fail inside pydicom (issue 13, part 3), sent byte for
byte over a real association: each is answered, or refused with 0xA900 naming the key."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from broker.store import Store
from tests.dicom.conftest import ORDERS, Running, load, start_server
from tests.dicom.raw import element, raw_dataset
from tests.dicom.scu import find

SPS = 0x00400100
PATIENT_NAME = 0x00100010
ACCESSION = 0x00080050
CHARSET = 0x00080005


def _find(running: Running, *elements: bytes):
    return find(running.port, raw_dataset(*elements), transfer_syntax=ExplicitVRLittleEndian)


def _refused(result, tag: int, name: str) -> None:
    assert result.statuses == [0xA900], [hex(s) for s in result.statuses]
    assert result.identifiers == []
    assert len(result.final.ErrorComment) <= 64
    assert name in str(result.final.ErrorComment)
    assert result.final.OffendingElement == tag


def test_sequence_key_sent_as_lo_is_refused_naming_it(running: Running):
    result = _find(running, element(ACCESSION, "SH", b""), element(SPS, "LO", b"CT"))
    _refused(result, SPS, "(0040,0100) ScheduledProcedureStepSequence")


def test_sequence_key_sent_as_ob_is_refused_naming_it(running: Running):
    result = _find(running, element(SPS, "OB", b"\x01\x02\x03\x04"))
    _refused(result, SPS, "(0040,0100)")


def test_plain_key_sent_as_a_sequence_is_refused_naming_it(running: Running):
    result = _find(running, element(PATIENT_NAME, "SQ", b""))
    _refused(result, PATIENT_NAME, "(0010,0010) PatientName")


def test_name_with_an_empty_component_under_iso_2022_ir_87_is_answered(running: Running):
    # "DOE^JOHN" with an empty middle group and an empty ideographic group: pydicom decodes
    # it, then fails re-encoding an empty component under ISO 2022 IR 87.
    result = _find(running, element(CHARSET, "CS", b"ISO 2022 IR 87"),
                   element(PATIENT_NAME, "PN", b"DOE^JOHN^^=^"),
                   element(ACCESSION, "SH", b""))
    assert result.final_status == 0x0000
    assert [str(ds.AccessionNumber) for ds in result.identifiers] == ["ACC-CT-1"]


def test_is_value_beyond_python_int_limit_in_a_return_key_is_answered(running: Running):
    # (0020,1208) Number of Study Related Instances, IS: 4,400 digits is past Python's
    # 4,300-digit limit on int conversion. The broker does not match on it: universal.
    result = _find(running, element(ACCESSION, "SH", b"ACC-CT-1"),
                   element(0x00201208, "IS", b"1" * 4400))
    assert result.final_status == 0x0000
    assert len(result.identifiers) == 1
    answer = result.identifiers[0]
    assert answer.AccessionNumber == "ACC-CT-1"
    assert 0x00201208 in answer and answer[0x00201208].value is None


def test_unreadable_value_in_a_matched_key_is_refused_naming_it(running: Running):
    # Accession Number sent as FD with two bytes: no number, no text, nothing to match on.
    result = _find(running, element(ACCESSION, "FD", b"\x01\x02"))
    _refused(result, ACCESSION, "(0008,0050) AccessionNumber")


@pytest.mark.parametrize(("vr", "value"), [
    ("SH", b"\x00\x01"),
    # Found by the fuzzer on PostgreSQL: a binary VR kept the NUL out of sight of the check,
    # and so did a second value (the check read the values' repr, which escapes it).
    ("OB", b"*\x00"),
    ("SH", b"A\\B\x00C "),
])
def test_nul_inside_a_matched_key_is_refused_naming_it(store: Store, vr: str,
                                                       value: bytes) -> None:
    # PostgreSQL refuses a NUL in any string: the query failed as a database error (0xC001).
    load(store, ORDERS)
    server = start_server(store)
    try:
        result = find(server.port, raw_dataset(element(ACCESSION, vr, value)),
                      transfer_syntax=ExplicitVRLittleEndian)
    finally:
        server.stop()
    _refused(result, ACCESSION, "(0008,0050) AccessionNumber")
