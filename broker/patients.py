"""Patient demographics from ADT: updates (A08, A31), merges (A40, A34, A36) and identifier
changes (A47). Worklist items point at their patient row, so every open item shows the new
demographics as soon as the row changes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from broker.domain import PatientData, PatientMerge
from broker.errors import InvalidOrder
from broker.models import Patient, WorklistItem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PatientResult:
    patient_id: str
    found: bool
    items_moved: int = 0


def _find(session: Session, patient_id: str) -> Patient | None:
    return session.scalars(select(Patient).where(Patient.patient_id == patient_id)).one_or_none()


def _apply_demographics(patient: Patient, data: PatientData) -> None:
    for name in ("issuer_of_patient_id", "patient_name", "birth_date", "sex"):
        value = getattr(data, name)
        if value is not None:
            setattr(patient, name, value)


def update_patient(session: Session, data: PatientData) -> PatientResult:
    """A08 / A31: new demographics for a patient the broker holds orders for.

    A patient the broker has never seen is not created: without an order there is nothing for
    a modality to see, and the next order carries the demographics anyway."""
    if not data.patient_id:
        raise InvalidOrder("PatientID is required", attribute="PatientID")
    patient = _find(session, data.patient_id)
    if patient is None:
        log.info("patient update for an unknown patient ignored")
        return PatientResult(data.patient_id, found=False)
    _apply_demographics(patient, data)
    return PatientResult(data.patient_id, found=True)


def merge_patient(session: Session, merge: PatientMerge) -> PatientResult:
    """A40 / A34 / A36: the MRG-1 patient's items move to the PID-3 patient, and the old
    record goes. A47 (``change_identifier_only``): the record keeps its items under the new
    identifier; if the new identifier already exists, this is a merge after all."""
    new_id = merge.patient.patient_id
    if not new_id or not merge.old_patient_id:
        raise InvalidOrder("PID-3 and MRG-1 patient identifiers are required",
                           attribute="PatientID", location="MRG-1")
    if new_id == merge.old_patient_id:
        return update_patient(session, merge.patient)
    old = _find(session, merge.old_patient_id)
    target = _find(session, new_id)
    if old is None:
        log.info("merge/change of an unknown patient: nothing to move")
        if target is not None:
            _apply_demographics(target, merge.patient)
        return PatientResult(new_id, found=target is not None)
    if target is None and merge.change_identifier_only:
        old.patient_id = new_id
        _apply_demographics(old, merge.patient)
        return PatientResult(new_id, found=True)
    if target is None:
        target = Patient(patient_id=new_id)
        session.add(target)
        session.flush()
    moved = session.execute(update(WorklistItem).where(WorklistItem.patient_fk == old.id)
                            .values(patient_fk=target.id)).rowcount
    _apply_demographics(target, merge.patient)
    session.execute(delete(Patient).where(Patient.id == old.id))
    log.info("patients merged: %d worklist items moved", moved)
    return PatientResult(new_id, found=True, items_moved=moved)
