"""apply_order: what an order message does to the stored patients and worklist items."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom.datadict import keyword_for_tag
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from broker.db_text import field_with_nul, holds_nul
from broker.domain import (
    DEFAULT_REPORTING,
    ItemStatus,
    Order,
    OrderControl,
    OrderResult,
    PatientData,
    ProcedureData,
    StatusReporting,
)
from broker.errors import InvalidOrder, UnknownOrder
from broker.models import Patient, WorklistItem
from broker.status_events import report_order_status
from broker.uids import generate_uid

log = logging.getLogger(__name__)

# DICOM value length limits (PS3.5 table 6.2-1) of the attributes the store keys on.
_MAX_ACCESSION = 16  # SH
_MAX_PATIENT_ID = 64  # LO


def _attribute_with_nul(dataset_json: str) -> str | None:
    """The attribute of a kept dataset (DICOM JSON) that holds a NUL, named as in DICOM. In
    JSON a NUL is an escape; a backslash typed before "u0000" is text, hence the read."""
    if "\\u0000" not in dataset_json:
        return None
    for key, element in json.loads(dataset_json).items():
        if holds_nul(element):
            tag = int(key, 16)
            return f"{keyword_for_tag(tag) or 'attribute'} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return None


def _check_text(order: Order) -> None:
    """No stored value holds a NUL (broker.db_text), whichever way the order came in."""
    dataset = order.procedure.item_dataset
    where = (dataset and _attribute_with_nul(dataset)) or field_with_nul(order.patient,
                                                                          order.procedure)
    if where is not None:
        raise InvalidOrder(f"{where} holds a NUL character (0x00), which no stored value "
                           "may hold", code="102")


def check_order(order: Order) -> None:
    """What every order must hold before it is looked up or stored; raises InvalidOrder."""
    _check_text(order)
    accession = order.procedure.accession_number
    if not accession:
        raise InvalidOrder("AccessionNumber is required", attribute="AccessionNumber")
    if len(accession) > _MAX_ACCESSION:
        raise InvalidOrder(f"AccessionNumber {accession!r} is longer than 16 characters",
                           attribute="AccessionNumber", code="102")
    patient_id = order.patient.patient_id
    if not patient_id:
        raise InvalidOrder("PatientID is required", attribute="PatientID")
    if len(patient_id) > _MAX_PATIENT_ID:
        raise InvalidOrder("PatientID is longer than 64 characters", attribute="PatientID",
                           code="102")


# Built once: an order runs both look-ups, and building a statement per call costs more than
# the indexed read itself.
_PATIENT_BY_ID = select(Patient).where(Patient.patient_id == bindparam("patient_id"))
_ITEM_BY_ACCESSION = select(WorklistItem).where(
    WorklistItem.accession_number == bindparam("accession"))


@dataclass(slots=True)
class Known:
    """Patients and items of a batch of orders read ahead in two queries (``apply_batch``):
    a lookup here replaces a query per order."""

    patients: dict[str, Patient | None] = field(default_factory=dict)
    items: dict[str, WorklistItem | None] = field(default_factory=dict)


def _upsert_patient(session: Session, data: PatientData, known: Known | None = None) -> Patient:
    if known is not None and data.patient_id in known.patients:
        patient: Patient | None = known.patients[data.patient_id]
    else:
        patient = session.scalars(_PATIENT_BY_ID,
                                  {"patient_id": data.patient_id}).one_or_none()
    if patient is None:
        patient = Patient(patient_id=data.patient_id)
        session.add(patient)
    if known is not None:
        known.patients[data.patient_id] = patient
    # The RIS is the master of demographics: the latest order wins, empty values included
    # only where the order carried the field at all.
    for name in ("issuer_of_patient_id", "patient_name", "birth_date", "sex"):
        value = getattr(data, name)
        if value is not None:
            setattr(patient, name, value)
    return patient


# DICOM JSON keys (PS3.18 F.2) of the sequences whose single item an order adds to rather than
# replaces: the Scheduled Procedure Step Sequence (one item per worklist item, K.6-1).
_MERGED_ITEMS = frozenset({"00400100"})


def merge_datasets(stored: str | None, given: str | None) -> str | None:
    """The item's attributes after an order: the order's attributes win, attribute by
    attribute (the step's item attribute by attribute too), and those it does not carry
    are kept, as for the columns. Plain DICOM JSON: the core reads no DICOM."""
    if given is None:
        return stored
    if stored is None:
        return given
    old: dict[str, Any] = json.loads(stored)
    new: dict[str, Any] = json.loads(given)
    for tag, element in new.items():
        previous = old.get(tag)
        if (tag in _MERGED_ITEMS and previous and previous.get("Value")
                and element.get("Value") and len(element["Value"]) == 1):
            element = {**element,
                       "Value": [{**previous["Value"][0], **element["Value"][0]}]}
        old[tag] = element
    return json.dumps(dict(sorted(old.items())), ensure_ascii=False, separators=(",", ":"))


def _fill_item(item: WorklistItem, data: ProcedureData, *, replace: bool = False) -> None:
    for name in ProcedureData.__slots__:
        if name in ("accession_number", "study_instance_uid", "item_dataset"):
            continue
        value = getattr(data, name)
        if value is not None or replace:
            setattr(item, name, value)
    item.item_dataset = (data.item_dataset if replace
                         else merge_datasets(item.item_dataset, data.item_dataset))


def _find_item(session: Session, accession: str, known: Known | None = None
               ) -> WorklistItem | None:
    if known is not None and accession in known.items:
        return known.items[accession]
    return session.scalars(_ITEM_BY_ACCESSION, {"accession": accession}).one_or_none()


# ORC-5 order status (HL7 table 0038) of an SC message -> the item's status.
_ORDER_STATUS = {
    "SC": ItemStatus.SCHEDULED,
    "IP": ItemStatus.IN_PROGRESS,
    "CM": ItemStatus.COMPLETED,
    "CA": ItemStatus.CANCELLED,
    "DC": ItemStatus.DISCONTINUED,
    "HD": ItemStatus.HELD,
}


def _status_change(item: WorklistItem, order: Order) -> ItemStatus:
    """The new status for CA, DC, SC, HD and RL, which change nothing but the status."""
    current = ItemStatus(item.status)
    if order.control is OrderControl.CANCEL:
        return ItemStatus.CANCELLED
    if order.control is OrderControl.DISCONTINUE:
        return ItemStatus.DISCONTINUED
    if order.control is OrderControl.HOLD:
        if current not in (ItemStatus.SCHEDULED, ItemStatus.HELD):
            raise InvalidOrder(f"order {item.accession_number} is {current}, it cannot be put "
                               "on hold", location="ORC-1", code="207")
        return ItemStatus.HELD
    if order.control is OrderControl.RELEASE:
        return ItemStatus.SCHEDULED if current is ItemStatus.HELD else current
    status = _ORDER_STATUS.get((order.order_status or "").upper())
    if status is None:
        raise InvalidOrder(f"ORC-5 order status {order.order_status!r} is not one of "
                           f"{', '.join(_ORDER_STATUS)}", location="ORC-5",
                           code="101" if not order.order_status else "103")
    return status


_STATUS_ONLY = (OrderControl.CANCEL, OrderControl.DISCONTINUE, OrderControl.STATUS,
                OrderControl.HOLD, OrderControl.RELEASE)


def apply_order(session: Session, order: Order, *, uid_root: str,
                existing: str = "update",
                reporting: StatusReporting = DEFAULT_REPORTING,
                known: Known | None = None) -> OrderResult:
    """Apply one order inside the caller's transaction.

    NW creates the item (or updates it when the RIS sends the same order again), XO changes it
    keeping its Study Instance UID; CA cancels, DC discontinues, HD holds and RL releases it,
    and SC sets the status the RIS gives in ORC-5. Only SCHEDULED and IN PROGRESS items are
    on the worklist.
    """
    check_order(order)
    accession = order.procedure.accession_number
    item = _find_item(session, accession, known)

    if order.control in _STATUS_ONLY:
        if item is None:
            raise UnknownOrder(accession)
        status = _status_change(item, order)
        changed = item.status != status
        item.status = status
        item.last_message_control_id = order.message_control_id
        if changed:
            report_order_status(session, reporting, item)
        log.debug("order %s accession=%s status=%s msh10=%s", order.control, accession, status,
                  order.message_control_id)
        return OrderResult(accession, status, created=False,
                           study_instance_uid=item.study_instance_uid)

    if order.control is OrderControl.CHANGE and item is None:
        raise UnknownOrder(accession)
    if (order.control is OrderControl.NEW and item is not None and existing == "reject"
            and item.status != ItemStatus.CANCELLED):
        raise InvalidOrder(f"an order with AccessionNumber {accession!r} already exists "
                           "(send XO to change it)", attribute="AccessionNumber", code="205")

    patient = _upsert_patient(session, order.patient, known)
    created = item is None
    previous_status = None if item is None else item.status
    if item is None:
        item = WorklistItem(
            accession_number=accession,
            study_instance_uid=order.procedure.study_instance_uid or generate_uid(uid_root),
            status=ItemStatus.SCHEDULED,
        )
        session.add(item)
        if known is not None:
            known.items[accession] = item
    elif order.procedure.study_instance_uid and order.control is OrderControl.NEW:
        item.study_instance_uid = order.procedure.study_instance_uid
    if order.control is OrderControl.NEW and item.status == ItemStatus.CANCELLED:
        # A new order reusing a cancelled accession puts it back on the worklist.
        item.status = ItemStatus.SCHEDULED
    item.patient = patient
    _fill_item(item, order.procedure, replace=order.replace)
    item.last_message_control_id = order.message_control_id
    if item.status != previous_status:
        report_order_status(session, reporting, item)
    # DEBUG: the HL7 edge logs one INFO line per message already.
    log.debug("order %s accession=%s msh10=%s", "created" if created else "updated",
              accession, order.message_control_id)
    return OrderResult(accession, ItemStatus(item.status), created=created,
                       study_instance_uid=item.study_instance_uid)


def apply_orders(session: Session, orders: list[Order], *, uid_root: str,
                 existing: str = "update",
                 reporting: StatusReporting = DEFAULT_REPORTING) -> list[OrderResult]:
    """Apply every item of one message in the caller's transaction (all or nothing).

    Items of one requested procedure (same placer order number and requested procedure ID)
    that arrive without a Study Instance UID share the one generated for the first of them.
    """
    shared: dict[tuple[str | None, str], str] = {}
    results = []
    for order in orders:
        key = (order.procedure.placer_order_number, order.procedure.requested_procedure_id or "")
        if (order.procedure.study_instance_uid is None and key[1] and key in shared
                and order.control is OrderControl.NEW):
            order = replace(order, procedure=replace(order.procedure,
                                                     study_instance_uid=shared[key]))
        result = apply_order(session, order, uid_root=uid_root, existing=existing,
                             reporting=reporting)
        if key[1]:
            shared.setdefault(key, result.study_instance_uid)
        results.append(result)
    return results


_READ_AHEAD_CHUNK = 500  # bound parameters per IN list


def apply_batch(session: Session, orders: list[Order], *, uid_root: str,
                reporting: StatusReporting = DEFAULT_REPORTING) -> list[OrderResult]:
    """Apply many independent orders in the caller's transaction (a migration's files): as
    :func:`apply_order` one after the other, with the patients and items they name read in a
    few queries beforehand and written in one flush at the end."""
    known = Known()
    patient_ids = sorted({order.patient.patient_id for order in orders})
    accessions = sorted({order.procedure.accession_number for order in orders})
    for start in range(0, len(patient_ids), _READ_AHEAD_CHUNK):
        chunk = patient_ids[start:start + _READ_AHEAD_CHUNK]
        known.patients.update(dict.fromkeys(chunk))
        known.patients.update((p.patient_id, p) for p in session.scalars(
            select(Patient).where(Patient.patient_id.in_(chunk))))
    for start in range(0, len(accessions), _READ_AHEAD_CHUNK):
        chunk = accessions[start:start + _READ_AHEAD_CHUNK]
        known.items.update(dict.fromkeys(chunk))
        known.items.update((i.accession_number, i) for i in session.scalars(
            select(WorklistItem).where(WorklistItem.accession_number.in_(chunk))))
    with session.no_autoflush:
        results = [apply_order(session, order, uid_root=uid_root, reporting=reporting,
                               known=known) for order in orders]
    session.flush()
    return results
