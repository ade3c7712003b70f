"""The database schema: declarations only; queries live with the code that needs them."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# Scheduled Station AE Title: up to 64 stations of 16 characters with their separators.
STATIONS_LENGTH = 64 * 17


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    # DICOM PN (family^given^middle^prefix^suffix), at most 64 chars per component group.
    patient_name: Mapped[str | None] = mapped_column(String(324), index=True)
    birth_date: Mapped[dt.date | None] = mapped_column(Date)
    sex: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    items: Mapped[list[WorklistItem]] = relationship(back_populates="patient")


class WorklistItem(Base):
    __tablename__ = "worklist_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    accession_number: Mapped[str] = mapped_column(String(16), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(String(16))
    requested_procedure_description: Mapped[str | None] = mapped_column(String(64))
    requested_procedure_code_value: Mapped[str | None] = mapped_column(String(64))
    requested_procedure_code_scheme: Mapped[str | None] = mapped_column(String(64))
    requested_procedure_code_meaning: Mapped[str | None] = mapped_column(String(64))
    sps_id: Mapped[str | None] = mapped_column(String(16))
    sps_description: Mapped[str | None] = mapped_column(String(64))
    # Added by migration 0002_step_keys (broker/migrations).
    scheduled_performing_physician_name: Mapped[str | None] = mapped_column(String(324))
    scheduled_station_name: Mapped[str | None] = mapped_column(String(16))
    requested_procedure_priority: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    # Every value of Scheduled Station AE Title (VM 1-n), joined by "\\" as DICOM encodes
    # them: a step schedulable on several stations (widened by 0006_item_dataset).
    scheduled_station_ae_title: Mapped[str | None] = mapped_column(String(STATIONS_LENGTH))
    scheduled_start: Mapped[dt.datetime | None] = mapped_column(DateTime)
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    requesting_physician: Mapped[str | None] = mapped_column(String(324))
    placer_order_number: Mapped[str | None] = mapped_column(String(64))
    filler_order_number: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    # Every attribute the item was given (a worklist file's dataset, an order's mapped
    # attributes), as DICOM JSON (PS3.18 F): what no column holds reaches the modality from
    # here, merged in by the renderer (broker/dicom/worklist.py). Added by 0006_item_dataset.
    item_dataset: Mapped[str | None] = mapped_column(Text)
    last_message_control_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="items")
    mpps: Mapped[list[MPPSTracking]] = relationship(secondary="mpps_item",
                                                    back_populates="items")

    __table_args__ = (
        # The typical modality poll: visible statuses, one day, one modality or station.
        Index("ix_item_status_start", "status", "scheduled_start"),
        Index("ix_item_modality_start", "modality", "scheduled_start"),
        Index("ix_item_station_start", "scheduled_station_ae_title", "scheduled_start"),
        Index("ix_item_scheduled_start", "scheduled_start"),
    )


class MPPSTracking(Base):
    __tablename__ = "mpps_tracking"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    start_datetime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    end_datetime: Mapped[dt.datetime | None] = mapped_column(DateTime)
    performed_station_ae_title: Mapped[str | None] = mapped_column(String(16))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    attributes_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    # One MPPS may cover several scheduled steps (IHE group case) and several MPPS one step
    # (append case); an MPPS linked to none is unscheduled and still kept for administrators.
    items: Mapped[list[WorklistItem]] = relationship(secondary="mpps_item",
                                                     back_populates="mpps")


class MPPSItemLink(Base):
    __tablename__ = "mpps_item"

    mpps_fk: Mapped[int] = mapped_column(
        ForeignKey("mpps_tracking.id", ondelete="CASCADE"), primary_key=True)
    item_fk: Mapped[int] = mapped_column(
        ForeignKey("worklist_item.id", ondelete="CASCADE"), primary_key=True, index=True)


class OutboxState:
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


OUTBOX_STATES = (OutboxState.PENDING, OutboxState.SENT, OutboxState.FAILED)


class OutboxMessage(Base):
    """A status message for the RIS, written in the same transaction as the change it reports."""

    __tablename__ = "outbox"
    REFUSALS: ClassVar[str] = "negative_acks"  # broker.delivery's refusal counter

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stable MSH-10: a resend after a lost ACK carries the same id so the RIS can drop it.
    message_control_id: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(8))
    payload_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Only negative ACKs count towards dead-lettering; an unreachable RIS merely delays.
    negative_acks: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_outbox_state_id", "state", "id"),
        Index("ix_outbox_accession_id", "accession_number", "id"),
    )


class InboundOutcome:
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class InboundMessage(Base):
    """Every HL7 message received, raw, with what became of it.

    An accepted message's row is written in the same transaction as the order it carried, so
    a resend (same sender, same MSH-10, same content) is recognised and answered with the
    stored ACK, changing nothing; a different message under a used MSH-10 is a new message.
    Rejected messages are kept for an administrator to read and replay
    (``worklist-broker messages``).
    """

    __tablename__ = "inbound_message"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    sender: Mapped[str] = mapped_column(String(200))  # MSH-3^MSH-4
    control_id: Mapped[str] = mapped_column(String(200))  # MSH-10
    message_type: Mapped[str] = mapped_column(String(20))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    ack_code: Mapped[str] = mapped_column(String(2))
    reason: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    ack: Mapped[bytes] = mapped_column(LargeBinary)
    # Added by migration 0003_inbound_content: hl7_listener.message.content_digest of raw.
    content_digest: Mapped[str | None] = mapped_column(String(64))
    # What the sender was warned of in an accepted message's ACK, one per line.
    warnings: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # At most one accepted copy of a message, even when two copies of a resend race on
        # PostgreSQL: the loser fails here and is answered as a duplicate.
        Index("ux_inbound_accepted_content", "sender", "control_id", "content_digest",
              unique=True, sqlite_where=text("outcome = 'accepted'"),
              postgresql_where=text("outcome = 'accepted'")),
        # Every message looks up what was accepted under its MSH-10 (resend or reuse?): a
        # plain index, since a partial one is not used for a bound ``outcome = ?``.
        Index("ix_inbound_sender_control", "sender", "control_id"),
        Index("ix_inbound_outcome_id", "outcome", "id"),
    )


class MppsForwardOperation:
    CREATE = "create"
    SET = "set"


class MppsForward(Base):
    """A copy of an accepted N-CREATE or N-SET owed to one downstream MPPS SCP, written in the
    same transaction as the MPPS change. States are the outbox's (pending, sent, failed).

    No foreign key to ``mpps_tracking``: a forward still owed outlives a purged MPPS record.
    """

    __tablename__ = "mpps_forward"
    REFUSALS: ClassVar[str] = "refusals"  # broker.delivery's refusal counter

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(300))  # MppsDestination.key, AE@host:port
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(8))
    # The request's dataset as received, in DICOM JSON (None: it could not be encoded).
    dataset_json: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Failure statuses only count towards dead-lettering; an unreachable peer merely delays.
    refusals: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_mpps_forward_state_destination_id", "state", "destination", "id"),
        Index("ix_mpps_forward_uid_destination_id", "sop_instance_uid", "destination", "id"),
    )


class CFindExposure(Base):
    """Which calling AE was given which item in C-FIND answers: first and last time, how often.

    One row per (calling AE, accession number), aggregated by the DICOM edge's recorder in
    batches. No foreign key: a batch may arrive just after its item was purged or cancelled
    away; the purge deletes the rows with their item.
    """

    __tablename__ = "cfind_exposure"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    accession_number: Mapped[str] = mapped_column(String(16), index=True)
    first_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_at: Mapped[dt.datetime] = mapped_column(DateTime)
    count: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        # The upsert's conflict target, so brokers sharing one PostgreSQL add up their counts.
        Index("ux_cfind_exposure_ae_accession", "calling_ae", "accession_number", unique=True),
    )


class CFindQuery(Base):
    """The last few distinct C-FIND identifiers of each calling AE, for "why is it not on the
    worklist?". A repeated identifier (a modality polling) moves to the front and counts."""

    __tablename__ = "cfind_query"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    # sha256 of identifier_json: the upsert's key (the JSON itself is too long to index).
    digest: Mapped[str] = mapped_column(String(64))
    identifier_json: Mapped[str] = mapped_column(Text)  # DICOM JSON, as the modality asked
    first_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_at: Mapped[dt.datetime] = mapped_column(DateTime)
    count: Mapped[int] = mapped_column(Integer)
    matches: Mapped[int] = mapped_column(Integer)  # items sent by the last one

    __table_args__ = (
        Index("ux_cfind_query_ae_digest", "calling_ae", "digest", unique=True),
        Index("ix_cfind_query_ae_last", "calling_ae", "last_at"),
    )


class OperatorAction(Base):
    """What an operator did through the console (replay, retry, drop, worklist create /
    modify / delete), and the purge's removal of an item: who, when, what changed."""

    __tablename__ = "operator_action"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    user: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(32))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_operator_action_accession_id", "accession_number", "id"),
        Index("ix_operator_action_at", "at"),
    )

class AuditEvent(Base):
    """Who saw or sent which patient's data: one DICOM association, C-FIND, MPPS request, HL7
    message, or console login (broker.audit). Operator actions stay in ``operator_action``
    and are read with these. Written in batches off the hot paths; added by 0007_audit."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Calling AE title, HL7 sender (MSH-3^MSH-4) or console user.
    actor: Mapped[str] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(100))
    tls_subject: Mapped[str | None] = mapped_column(String(400))
    outcome: Mapped[str] = mapped_column(String(32))
    # Every accession number concerned, joined by "\\" (the look-up is audit_accession).
    accession_numbers: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object: control ID, SOP UID...

    __table_args__ = (Index("ix_audit_event_actor_at", "actor", "at"),)


class AuditAccession(Base):
    """One accession number of an audit event, so that "who saw order X" is an index look-up."""

    __tablename__ = "audit_accession"

    event_fk: Mapped[int] = mapped_column(
        ForeignKey("audit_event.id", ondelete="CASCADE"), primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(16), primary_key=True, index=True)


class StudyRecord(Base):
    """A stable study the PACS (Orthanc) reported, with the item it matched if any.

    Matched studies are the performed data of their item (instances, modalities, date), as an
    MPPS is; unmatched ones (``item_fk`` NULL) wait for an administrator
    (``worklist-broker studies list --unmatched``). Added by migration 0005_orthanc.
    """

    __tablename__ = "study_arrival"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(300))  # the PACS's REST URL
    source_id: Mapped[str] = mapped_column(String(64))  # Orthanc's study ID
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    # The study's own accession number (SH, but PACS keep what modalities typed: 64).
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    modalities: Mapped[str | None] = mapped_column(String(64))  # backslash-separated
    number_of_series: Mapped[int | None] = mapped_column(Integer)
    number_of_instances: Mapped[int | None] = mapped_column(Integer)
    performed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # StudyDate + Time
    study_description: Mapped[str | None] = mapped_column(String(64))
    # The item it matched; a purged item leaves the record (SET NULL keeps the purge simple).
    item_fk: Mapped[int | None] = mapped_column(
        ForeignKey("worklist_item.id", ondelete="SET NULL"), index=True)
    matched_by: Mapped[str | None] = mapped_column(String(16))  # study_uid / accession
    # What it did to its items: completed, hidden, none (on_study), or unchanged (already
    # finished, e.g. by an MPPS).
    action: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    item: Mapped[WorklistItem | None] = relationship()

    __table_args__ = (
        # One row per study and item: a study matching several steps has one per step.
        # Serves the look-up by (source, source_id) too.
        Index("ux_study_arrival_source_item", "source", "source_id", "item_fk", unique=True),
    )


class FeedCursor(Base):
    """How far the broker has read a change feed (Orthanc's ``/changes`` ``Seq``), per source,
    advanced in the same transaction as what the changes caused. Added by 0005_orthanc."""

    __tablename__ = "feed_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(300), unique=True)
    position: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
