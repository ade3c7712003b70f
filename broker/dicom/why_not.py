""""Why is it not on the worklist?": a calling AE's recent C-FIND identifiers replayed
against one item, key by key.

Each remembered identifier goes through the same steps as a live C-FIND: the identifier read
into a query (``broker.dicom.worklist.query_from_identifier``), the site policy of that
calling AE on the day it asked (``broker.site_policy``), then the matching module explains its
own decision for that item (``broker.matching.explain``, which evaluates the very conditions
C-FIND filters with). Nothing here decides whether a key matches.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import cfind_log
from broker.config import DicomConfig
from broker.dicom.worklist import query_from_identifier
from broker.errors import BrokerError
from broker.matching import InvalidQuery, KeyVerdict, explain
from broker.models import WorklistItem
from broker.site_policy import apply_site_policy
from broker.store import Store

__all__ = ["KeyVerdict", "QueryExplanation", "UnknownAccession", "explain_recent",
           "recorded_calling_aes"]


class UnknownAccession(BrokerError):
    """No worklist item has this accession number (never received, or purged)."""


@dataclass(frozen=True)
class QueryExplanation:
    at: dt.datetime  # when the calling AE last sent this identifier (UTC, naive)
    calling_ae: str
    matched: bool
    verdicts: list[KeyVerdict]
    # How often this identifier was sent, and how many items its last answer held.
    count: int = 1
    matches: int = 0
    identifier_json: str = ""


def recorded_calling_aes(session: Session) -> list[str]:
    """The calling AEs whose recent C-FIND identifiers are kept (for the AE picker)."""
    return cfind_log.recorded_calling_aes(session)


def _local_day(at_utc: dt.datetime) -> dt.date:
    # The C-FIND handler's universal_query_days window is built from the local date.
    return at_utc.replace(tzinfo=dt.UTC).astimezone().date()


def explain_recent(store: Store, dicom: DicomConfig, accession_number: str,
                   calling_ae: str) -> list[QueryExplanation]:
    """One explanation per remembered identifier of ``calling_ae``, newest first (an empty
    list when none is kept). Raises :class:`UnknownAccession`."""
    with store.reading() as session:
        item_id = session.scalar(select(WorklistItem.id).where(
            WorklistItem.accession_number == accession_number))
        if item_id is None:
            raise UnknownAccession(f"no worklist item with accession number {accession_number}")
        asked = cfind_log.recent_queries(session, calling_ae, limit=dicom.recent_queries_per_ae)
        return [_explain(session, dicom, item_id, query) for query in asked]


def _explain(session: Session, dicom: DicomConfig, item_id: int,
             asked: cfind_log.AskedQuery) -> QueryExplanation:
    def refused(reason: str) -> QueryExplanation:
        verdict = KeyVerdict("identifier", "", "", False, reason)
        return QueryExplanation(asked.last_at, asked.calling_ae, False, [verdict],
                                asked.count, asked.matches, asked.identifier_json)

    try:
        identifier = Dataset.from_json(asked.identifier_json)
        query = query_from_identifier(identifier, max_matches=dicom.max_matches,
                                      names_case_sensitive=dicom.names_case_sensitive)
    except Exception as exc:
        return refused(f"the identifier could not be read, the query was refused: {exc}")
    policy = apply_site_policy(query, dicom, asked.calling_ae, today=_local_day(asked.last_at))
    try:
        verdicts = explain(session, policy.query, item_id, policy=policy.applied)
    except InvalidQuery as exc:
        return refused(f"the query was refused (no match for any item): {exc.reason}")
    return QueryExplanation(asked.last_at, asked.calling_ae,
                            all(verdict.matched for verdict in verdicts), verdicts,
                            asked.count, asked.matches, asked.identifier_json)
