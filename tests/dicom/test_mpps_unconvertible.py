"""MPPS carrying values pydicom cannot convert (issue 13, part 3): never answered Success for
data that was not kept. Such values are kept exactly as received and N-GET gives them back;
what cannot be kept at all is refused 0x0106 naming the attribute."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
)

from broker.dicom.mpps_scu import create_dataset, set_dataset
from broker.domain import ItemStatus
from tests.dicom.conftest import Running
from tests.dicom.raw import element, raw_dataset
from tests.dicom.scu import n_get
from tests.dicom.test_mpps import item_status, outbox

UID = "1.2.826.0.1.3680043.10.1491.8.1"
NUMBER_OF_INSTANCES = 0x00201208  # IS
PATIENT_WEIGHT = 0x00101030  # DS
PERFORMED_SERIES = 0x00400340  # SQ


def _with_raw(dataset: Dataset, *elements: bytes) -> Dataset:
    """``dataset`` plus raw elements sent byte for byte (explicit VR little endian)."""
    for raw in raw_dataset(*elements).values():
        assert isinstance(raw, RawDataElement)
        dataset[raw.tag] = raw
    # As read from the wire: pydicom writes it back without looking at (converting) values.
    dataset.set_original_encoding(False, True, dataset._character_set)
    return dataset


def _send(port: int, dataset: Dataset, *, create: bool) -> Dataset:
    ae = AE(ae_title="RAW_SCU")
    ae.add_requested_context(ModalityPerformedProcedureStep, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established
    try:
        if create:
            status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, UID)
        else:
            status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, UID)
    finally:
        assoc.release()
    assert assoc.is_released, "the association was aborted"
    return status


def _create(running: Running, *elements: bytes) -> Dataset:
    dataset = create_dataset(accession="ACC-MR-1", calling_aet="RAW_SCU", modality="MR",
                             study_instance_uid=None)
    return _send(running.port, _with_raw(dataset, *elements), create=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unconvertible_values_in_n_create_are_kept_as_received(running: Running):
    status = _create(running, element(NUMBER_OF_INSTANCES, "IS", b"abc"),
                     element(PATIENT_WEIGHT, "DS", b"x,y"))
    assert status.Status == 0x0000
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.IN_PROGRESS
    # N-GET answers from the kept dataset: exactly the bytes received, whatever VR the SCU
    # reads them with.
    got, kept = n_get(running.port, UID, [NUMBER_OF_INSTANCES, PATIENT_WEIGHT, 0x00400252])
    assert got.Status == 0x0000
    assert kept is not None
    assert kept[NUMBER_OF_INSTANCES].value == "abc"
    assert kept[PATIENT_WEIGHT].value == "x,y"
    assert kept.PerformedProcedureStepStatus == "IN PROGRESS"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_is_beyond_python_int_limit_is_kept(running: Running):
    status = _create(running, element(NUMBER_OF_INSTANCES, "IS", b"9" * 4400))
    assert status.Status == 0x0000
    got, kept = n_get(running.port, UID, [])
    assert got.Status == 0x0000 and kept is not None
    assert kept.PerformedProcedureStepStatus == "IN PROGRESS"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_n_set_completed_with_an_unconvertible_value_is_what_n_get_reports(running: Running):
    assert _create(running).Status == 0x0000
    modification = _with_raw(set_dataset("COMPLETED"), element(PATIENT_WEIGHT, "DS", b"x,y"))
    status = _send(running.port, modification, create=False)
    assert status.Status == 0x0000
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.COMPLETED
    got, kept = n_get(running.port, UID, [0x00400252, 0x00400250, PATIENT_WEIGHT])
    assert got.Status == 0x0000 and kept is not None
    assert kept.PerformedProcedureStepStatus == "COMPLETED"
    assert kept.PerformedProcedureStepEndDate
    assert kept[PATIENT_WEIGHT].value == "x,y"


def test_an_attribute_that_cannot_be_read_is_refused_naming_it(running: Running):
    # A sequence whose content is no item: nothing that could be kept or given back.
    status = _create(running, element(PERFORMED_SERIES, "SQ", b"\x01\x02\x03\x04"))
    assert status.Status == 0x0106
    assert "(0040,0340)" in status.ErrorComment
    assert item_status(running.store, "ACC-MR-1") == ItemStatus.SCHEDULED
    assert outbox(running.store) == []
    got, _ = n_get(running.port, UID, [])
    assert got.Status == 0x0112  # nothing half-written


def test_n_get_reads_what_an_n_get_scu_sends_in_implicit_vr(running: Running):
    # The kept UN values over the default (implicit VR) context: the SCU reads them with its
    # dictionary's VR, as it sent them.
    assert _create(running, element(NUMBER_OF_INSTANCES, "IS", b"abc")).Status == 0x0000
    ae = AE(ae_title="GET_SCU")
    ae.add_requested_context(ModalityPerformedProcedureStepRetrieve)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="WORKLISTS")
    assert assoc.is_established
    try:
        status, kept = assoc.send_n_get([NUMBER_OF_INSTANCES],
                                        ModalityPerformedProcedureStepRetrieve, UID)
    finally:
        assoc.release()
    assert status.Status == 0x0000 and kept is not None
    assert kept[NUMBER_OF_INSTANCES].value == "abc"


