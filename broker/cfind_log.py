"""What C-FIND gave to whom: exposure counts per (calling AE, item) and the last few distinct
identifiers of each calling AE.

The DICOM edge buffers both in memory and hands them here in batches
(``broker.dicom.query_recorder``); these functions only write and read them. Writes are
upserts that add up, so several brokers on one PostgreSQL database agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Insert, Select, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from broker.models import CFindExposure, CFindQuery

# How many distinct identifiers are kept per calling AE by default.
DEFAULT_QUERIES_PER_AE = 5


@dataclass(frozen=True, slots=True)
class Exposure:
    """``calling_ae`` was given the item ``accession_number`` ``count`` times between
    ``first_at`` and ``last_at`` (UTC)."""

    calling_ae: str
    accession_number: str
    first_at: dt.datetime
    last_at: dt.datetime
    count: int


@dataclass(frozen=True, slots=True)
class AskedQuery:
    """One distinct identifier a calling AE sent (DICOM JSON), asked ``count`` times."""

    calling_ae: str
    digest: str
    identifier_json: str
    first_at: dt.datetime
    last_at: dt.datetime
    count: int
    matches: int  # items sent in answer to the last one


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no upsert for {dialect}")  # pragma: no cover


def _later(new: ColumnElement[Any], old: ColumnElement[Any]) -> ColumnElement[Any]:
    # GREATEST (PostgreSQL) and two-argument MAX (SQLite) differ; CASE is the same in both.
    return case((new > old, new), else_=old)


def _earlier(new: ColumnElement[Any], old: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((new < old, new), else_=old)


def write_exposures(session: Session, exposures: Sequence[Exposure]) -> None:
    """Add a batch (at most one entry per calling AE and accession) to the stored counts."""
    if not exposures:
        return
    table = CFindExposure.__table__
    statement: Insert = _insert(session, table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["calling_ae", "accession_number"],
        set_={"first_at": _earlier(excluded.first_at, table.c.first_at),
              "last_at": _later(excluded.last_at, table.c.last_at),
              "count": table.c.count + excluded.count})
    # One order for every broker's batch: two upserts of the same rows never deadlock.
    rows = sorted(exposures, key=lambda e: (e.calling_ae, e.accession_number))
    session.execute(statement, [
        {"calling_ae": e.calling_ae[:16], "accession_number": e.accession_number[:16],
         "first_at": e.first_at, "last_at": e.last_at, "count": e.count} for e in rows])


def write_queries(session: Session, queries: Sequence[AskedQuery], *,
                  keep: int = DEFAULT_QUERIES_PER_AE) -> None:
    """Add a batch of identifiers (at most one entry per calling AE and digest), then keep
    only the ``keep`` most recently asked of each calling AE in the batch."""
    if not queries:
        return
    table = CFindQuery.__table__
    statement: Insert = _insert(session, table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["calling_ae", "digest"],
        set_={"first_at": _earlier(excluded.first_at, table.c.first_at),
              "last_at": _later(excluded.last_at, table.c.last_at),
              "count": table.c.count + excluded.count,
              "matches": case((excluded.last_at >= table.c.last_at, excluded.matches),
                              else_=table.c.matches)})
    rows = sorted(queries, key=lambda q: (q.calling_ae, q.digest))
    session.execute(statement, [
        {"calling_ae": q.calling_ae[:16], "digest": q.digest,
         "identifier_json": q.identifier_json, "first_at": q.first_at, "last_at": q.last_at,
         "count": q.count, "matches": q.matches} for q in rows])
    for calling_ae in sorted({q.calling_ae[:16] for q in queries}):
        newest = (select(CFindQuery.id).where(CFindQuery.calling_ae == calling_ae)
                  .order_by(CFindQuery.last_at.desc(), CFindQuery.id.desc()).limit(keep))
        kept = list(session.scalars(newest))
        session.execute(delete(CFindQuery).where(CFindQuery.calling_ae == calling_ae,
                                                 CFindQuery.id.not_in(kept)))


def recent_queries(session: Session, calling_ae: str, *,
                   limit: int = DEFAULT_QUERIES_PER_AE) -> list[AskedQuery]:
    """The identifiers ``calling_ae`` sent most recently, newest first."""
    rows = session.scalars(select(CFindQuery).where(CFindQuery.calling_ae == calling_ae)
                           .order_by(CFindQuery.last_at.desc(), CFindQuery.id.desc())
                           .limit(limit))
    return [AskedQuery(r.calling_ae, r.digest, r.identifier_json, r.first_at, r.last_at,
                       r.count, r.matches) for r in rows]


def recorded_calling_aes(session: Session) -> list[str]:
    """Every calling AE whose C-FIND identifiers are kept, in alphabetical order."""
    return list(session.scalars(select(CFindQuery.calling_ae).distinct()
                                .order_by(CFindQuery.calling_ae)))


def exposures_of(session: Session, accession_number: str) -> list[Exposure]:
    """Who was given this item, first given first."""
    rows = session.scalars(select(CFindExposure)
                           .where(CFindExposure.accession_number == accession_number)
                           .order_by(CFindExposure.first_at, CFindExposure.calling_ae))
    return [Exposure(r.calling_ae, r.accession_number, r.first_at, r.last_at, r.count)
            for r in rows]


def delete_exposures(session: Session, accession_numbers: Select[tuple[str]]) -> int:
    """Forget who was given these items (the purge, with the items): ``accession_numbers``
    selects them, and the database does the rest."""
    return session.execute(delete(CFindExposure).where(
        CFindExposure.accession_number.in_(accession_numbers))).rowcount
