"""Plain typed objects that cross the boundary between the edges and the core."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass


class ItemStatus(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"
    CANCELLED = "CANCELLED"
    HELD = "HELD"  # put on hold by the RIS (ORC-1 HD) until released (RL)


# What a modality sees by default: work still to do or under way.
VISIBLE_STATUSES: tuple[ItemStatus, ...] = (ItemStatus.SCHEDULED, ItemStatus.IN_PROGRESS)


class OrderControl(enum.StrEnum):
    """HL7 table 0119 order control codes the broker acts on (OC arrives as CANCEL)."""

    NEW = "NW"
    CHANGE = "XO"
    CANCEL = "CA"
    DISCONTINUE = "DC"
    STATUS = "SC"
    HOLD = "HD"
    RELEASE = "RL"


class MppsStatus(enum.StrEnum):
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


@dataclass(frozen=True, slots=True)
class PatientData:
    patient_id: str
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: dt.date | None = None
    sex: str | None = None


@dataclass(frozen=True, slots=True)
class ProcedureData:
    """One scheduled procedure step as the RIS ordered it."""

    accession_number: str
    study_instance_uid: str | None = None
    requested_procedure_id: str | None = None
    requested_procedure_description: str | None = None
    requested_procedure_code_value: str | None = None
    requested_procedure_code_scheme: str | None = None
    requested_procedure_code_meaning: str | None = None
    sps_id: str | None = None
    sps_description: str | None = None
    modality: str | None = None
    # Several stations (VM 1-n) joined by "\\", as DICOM encodes them.
    scheduled_station_ae_title: str | None = None
    scheduled_start: dt.datetime | None = None
    referring_physician_name: str | None = None
    requesting_physician: str | None = None
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    scheduled_performing_physician_name: str | None = None  # DICOM PN
    scheduled_station_name: str | None = None
    requested_procedure_priority: str | None = None  # STAT, HIGH, ROUTINE, MEDIUM, LOW
    # Every other attribute the item was given (Allergies, Medical Alerts, Pregnancy Status,
    # Scheduled Procedure Step Location, private attributes...), or a worklist file's whole
    # dataset, as DICOM JSON (PS3.18 F): built and read by broker/item_dataset.py. An
    # order's attributes are merged into the stored ones, the order's winning.
    item_dataset: str | None = None


@dataclass(frozen=True, slots=True)
class Order:
    """An order message reduced to what the worklist needs."""

    control: OrderControl
    patient: PatientData
    procedure: ProcedureData
    message_control_id: str = ""
    order_status: str | None = None  # ORC-5 (table 0038), read for SC
    # The item's attributes become exactly the order's (what it leaves out is removed), as a
    # REST PUT of a whole worklist item means; HL7 orders update, keeping what they omit. The
    # patient's demographics are shared by the patient's other orders: always updated.
    replace: bool = False


@dataclass(frozen=True, slots=True)
class OrderResult:
    accession_number: str
    status: ItemStatus
    created: bool
    study_instance_uid: str = ""


@dataclass(frozen=True, slots=True)
class PatientMerge:
    """ADT A40 / A34 / A36 (merge) and A47 (change of identifier): ``old_patient_id`` (MRG-1)
    is folded into ``patient`` (PID-3)."""

    patient: PatientData
    old_patient_id: str
    change_identifier_only: bool = False


@dataclass(frozen=True, slots=True)
class ScheduledStepRef:
    """One item of an MPPS Scheduled Step Attributes Sequence."""

    accession_number: str | None = None
    study_instance_uid: str | None = None
    requested_procedure_id: str | None = None
    sps_id: str | None = None


@dataclass(frozen=True, slots=True)
class MppsCreate:
    sop_instance_uid: str
    status: str
    steps: tuple[ScheduledStepRef, ...] = ()
    start: dt.datetime | None = None
    performed_station_ae_title: str | None = None
    calling_ae_title: str | None = None
    attributes_json: str | None = None  # the whole dataset as DICOM JSON, kept for audits


@dataclass(frozen=True, slots=True)
class MppsSet:
    sop_instance_uid: str
    status: str | None = None
    end: dt.datetime | None = None
    attributes_json: str | None = None


@dataclass(frozen=True, slots=True)
class MppsResult:
    sop_instance_uid: str
    status: MppsStatus
    linked_accessions: tuple[str, ...] = ()


class StudyAction(enum.StrEnum):
    """What a stable study in the PACS does to the worklist items it matches."""

    COMPLETE = "complete"  # SCHEDULED / IN PROGRESS -> COMPLETED, as an MPPS COMPLETED
    HIDE = "hide"  # off the worklist (COMPLETED) without telling the RIS
    NONE = "none"  # only recorded


@dataclass(frozen=True, slots=True)
class StudyArrival:
    """A study the PACS (Orthanc) reports stable: its main tags and what was performed."""

    source: str  # which PACS: its REST URL, without credentials
    source_id: str  # the PACS's own id of the study (Orthanc's study ID)
    study_instance_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    modalities: tuple[str, ...] = ()
    number_of_series: int | None = None
    number_of_instances: int | None = None
    study_date: dt.date | None = None
    study_time: dt.time | None = None
    study_description: str | None = None

    @property
    def performed_at(self) -> dt.datetime | None:
        if self.study_date is None:
            return None
        return dt.datetime.combine(self.study_date, self.study_time or dt.time())


@dataclass(frozen=True, slots=True)
class StudyResult:
    """What one arrival did: the items it matched (by Study Instance UID or accession number
    and patient ID), those it completed or hid, and whether it was already known."""

    matched_accessions: tuple[str, ...] = ()
    changed_accessions: tuple[str, ...] = ()
    matched_by: str | None = None  # "study_uid" / "accession"
    repeated: bool = False


@dataclass(frozen=True, slots=True)
class WorklistRow:
    """A worklist item joined with its patient, as the DICOM edge renders it."""

    patient: PatientData
    procedure: ProcedureData
    status: ItemStatus


class StatusKind(enum.StrEnum):
    """Which change a status message reports; each is switched on or off in the config."""

    IN_PROGRESS = "in_progress"  # MPPS N-CREATE
    COMPLETED = "completed"  # MPPS N-SET COMPLETED
    DISCONTINUED = "discontinued"  # MPPS N-SET DISCONTINUED
    ORDER_STATUS = "order_status"  # an order message changed an item's status
    STUDY_RECEIVED = "study_received"  # the PACS holds a stable study for the order


@dataclass(frozen=True, slots=True)
class StatusReporting:
    """Which changes the core writes to the outbox (what is written is what will be sent)."""

    kinds: frozenset[StatusKind] = frozenset(
        {StatusKind.IN_PROGRESS, StatusKind.COMPLETED, StatusKind.DISCONTINUED})
    # An MPPS that matches no scheduled item (unscheduled or emergency procedure).
    unscheduled: bool = False


DEFAULT_REPORTING = StatusReporting()


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """What the outbox carries to the RIS: an order's new status (ORC-5 IP / CM / DC...).

    Stored as JSON in the outbox row and rendered only when sent, with the message type and
    templates configured then; fields added later read as None from older rows.
    """

    order_status: str
    accession_number: str
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    requested_procedure_code_value: str | None = None
    requested_procedure_code_scheme: str | None = None
    requested_procedure_code_meaning: str | None = None
    mpps_sop_instance_uid: str | None = None
    event_time: dt.datetime | None = None
    kind: str | None = None  # a StatusKind; None in rows written before kinds existed
    requested_procedure_id: str | None = None
    sps_id: str | None = None
    study_instance_uid: str | None = None
    modality: str | None = None
    station_ae_title: str | None = None  # where it was performed (else where scheduled)
    performed_start: dt.datetime | None = None
    performed_end: dt.datetime | None = None
    number_of_images: int | None = None
    # Performed Procedure Step Discontinuation Reason Code Sequence, first item.
    discontinuation_reason_code: str | None = None
    discontinuation_reason_meaning: str | None = None
    discontinuation_reason_scheme: str | None = None

    @property
    def status_kind(self) -> StatusKind:
        if self.kind:
            return StatusKind(self.kind)
        return {"IP": StatusKind.IN_PROGRESS, "CM": StatusKind.COMPLETED,
                "DC": StatusKind.DISCONTINUED}.get(self.order_status, StatusKind.ORDER_STATUS)

