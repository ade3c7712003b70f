"""Modality Worklist matching (PS3.4 C.2.2.2 and K.6.1.2) turned into SQLAlchemy filters.

One function per matching type, after pynetdicom's ``apps/qrscp/db.py``:

- universal matching (C.2.2.2.3): no value, or a lone ``*`` -> no filter at all, so items
  whose attribute is empty still match;
- single value matching (C.2.2.2.1): ``column = value``; for PN the broker uses the freedom
  the standard gives and matches case-insensitively by default, component group by component
  group (see :func:`person_name_pattern`);
- wild card matching (C.2.2.2.4): ``*`` and ``?`` become SQL ``%`` and ``_``, while a literal
  ``%``, ``_`` or the escape character in the value is escaped, so ``50%`` matches only
  ``50%``;
- list of UID matching (C.2.2.2.2): ``uid1\\uid2`` -> ``IN``;
- range matching (C.2.2.2.5) on the scheduled start date and time, which the store keeps as
  one naive ``DateTime`` column, see :func:`start_interval`, and on the patient's birth date;
- sequence matching (C.2.2.2.6): the broker keeps one item per sequence (one scheduled step,
  one requested procedure code), so the keys of the request's item are matched against it.

Every attribute the broker keeps in a column is a matching key (Scheduled Station AE Title with
all its values, :func:`match_multi_valued`); every other key, the attributes kept only in the
item's dataset included, is matched universally (it never fails a query), see
docs/worklist-matching.md.

Every filter is pushed into the one SQL statement :func:`find_worklist` runs; nothing loops over
rows in Python. This module knows nothing of pydicom: the DICOM edge reads the identifier into
a :class:`WorklistQuery` of plain strings.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, Time, and_, case, cast, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from broker.domain import VISIBLE_STATUSES, ItemStatus, PatientData, ProcedureData, WorklistRow
from broker.errors import BrokerError
from broker.models import Patient, WorklistItem

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1000

# Escape character for LIKE patterns; not a DICOM wildcard and rare in worklist values.
_ESCAPE = "/"
_LIKE_SPECIAL = {"%": "/%", "_": "/_", "/": "//"}

_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TIME = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_ONE_DAY = dt.timedelta(days=1)


class InvalidQuery(BrokerError):
    """A key's value cannot be matched: a malformed date, time or range."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WorklistQuery:
    """The matching keys of one worklist query; ``None`` means universal matching.

    Text keys take DICOM single values or wild cards; several values separated by ``\\``
    match if any of them matches. ``scheduled_start_date`` is a DA value or range
    (``20260101``, ``20260101-20260107``, ``-20260107``, ``20260101-``) and
    ``scheduled_start_time`` a TM value or range; see :func:`start_interval` for how they
    combine. ``statuses`` lists the item statuses returned (an empty tuple returns nothing);
    by default only work still to do or under way.
    """

    accession_number: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    referring_physician_name: str | None = None
    requesting_physician: str | None = None
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    requested_procedure_id: str | None = None
    requested_procedure_description: str | None = None
    study_instance_uid: str | None = None
    # Requested Procedure Code Sequence: the keys of its one request item (C.2.2.2.6).
    requested_procedure_code_value: str | None = None
    requested_procedure_code_scheme: str | None = None
    requested_procedure_code_meaning: str | None = None
    modality: str | None = None
    scheduled_station_ae_title: str | None = None
    scheduled_start_date: str | None = None
    scheduled_start_time: str | None = None
    sps_id: str | None = None
    sps_description: str | None = None
    scheduled_performing_physician_name: str | None = None
    scheduled_station_name: str | None = None
    requested_procedure_priority: str | None = None
    statuses: tuple[ItemStatus, ...] = VISIBLE_STATUSES
    limit: int = DEFAULT_LIMIT
    # PS3.4 C.2.2.2.1 lets PN matching ignore case; modalities type names in any case.
    names_case_sensitive: bool = False
    # Site policy for one modality: only items of this station, or (when the RIS sent no
    # station) of this modality. Not a matching key: applied whatever the query asks.
    scope_station: str | None = None
    scope_modality: str | None = None


Column = InstrumentedAttribute[Any]
Condition = ColumnElement[bool]


# --- text: single value, wild card, lists --------------------------------------------------

def _like_pattern(value: str) -> str:
    # DICOM has no escape for its wild cards (C.2.2.2.4): every * and ? is one.
    out = []
    for ch in value:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(_LIKE_SPECIAL.get(ch, ch))
    return "".join(out)


def _glob_pattern(value: str) -> str:
    # GLOB shares * and ? with DICOM; only "[" opens a character class.
    return value.replace("[", "[[]")


def match_single_value(column: Column, value: str) -> Condition:
    """PS3.4 C.2.2.2.1: the attribute equals the value, case-sensitively."""
    return column == value


def match_wildcard(column: Column, value: str, *, dialect: str) -> Condition:
    """PS3.4 C.2.2.2.4: ``*`` any run of characters, ``?`` any one character, case-sensitive.

    SQLite's LIKE ignores ASCII case whatever is asked, so there it is GLOB, whose wild cards
    are DICOM's.
    """
    if dialect == "sqlite":
        return column.op("GLOB")(_glob_pattern(value))
    return column.like(_like_pattern(value), escape=_ESCAPE)


def match_text(column: Column, value: str | None, *, dialect: str) -> Condition | None:
    """Universal, single value or wild card matching, chosen by the value; ``None`` = no filter.

    Several values separated by ``\\`` match if any does. PS3.4 C.2.2.2.8 leaves multiple
    values undefined without Extended Negotiation (which modalities do not propose); the
    worklist keys hold one value each, so "any of" is the only useful reading, and what a
    query such as ``Modality=CT\\MR`` means.
    """
    if value is None:
        return None
    conditions: list[Condition] = []
    for part in value.split("\\"):
        if part == "*":
            return None  # C.2.2.2.4: a lone "*" is universal matching, empty values included
        if not part:
            continue
        if "*" in part or "?" in part:
            conditions.append(match_wildcard(column, part, dialect=dialect))
        else:
            conditions.append(match_single_value(column, part))
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


def match_uid_list(column: Column, value: str | None) -> Condition | None:
    """PS3.4 C.2.2.2.2: any of the ``\\``-separated UIDs; no wild cards in UIDs."""
    if value is None:
        return None
    uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
    if not uids:
        return None
    return column == uids[0] if len(uids) == 1 else column.in_(uids)


def _value_regex(value: str, *, wildcards: bool, atomic: bool = False) -> str:
    """One key value as a regular expression over one of the ``\\``-separated values of a
    stored multi-valued attribute."""
    if not wildcards:
        return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in value)
    return wildcard_regex(value, one=r"[^\\]", atomic=atomic)


def wildcard_regex(value: str, *, one: str, atomic: bool) -> str:
    """A DICOM wild card value (PS3.4 C.2.2.2.4) as a regular expression: ``?`` is ``one``
    (a character class), ``*`` any run of them, everything else literal.

    A backtracking engine (Python's re, SQLite's REGEXP) took 52 s on one 64-character name
    for ``*A*A*A*A*A*A*A*AB``, and as long for a run of 30 ``*`` (bench/fuzz.py): one C-FIND
    could hold a worker and a pooled connection for minutes per item. Runs of ``*`` are one
    ``*``, and with ``atomic`` every part between two ``*`` is matched at its first
    occurrence and never tried again (an atomic group; the earliest occurrence is always as
    good as a later one): the search is then bounded by the value's length times the key's
    parts, not exponential in them. PostgreSQL's engine does not
    backtrack this way and has no atomic groups.
    """
    many = f"{one}*"
    parts = ["".join(one if ch == "?" else "\\" + ch if ch in _REGEX_SPECIAL else ch
                     for ch in part) for part in re.split(r"\*+", value)]
    if len(parts) == 1:
        return parts[0]
    if not atomic:
        return many.join(parts)
    first, *middle, last = parts
    return first + "".join(f"(?>{many}?{part})" for part in middle) + many + last


def match_multi_valued(column: Column, value: str | None, *, dialect: str,
                       wildcards: bool = True) -> Condition | None:
    """A key on an attribute the broker stores with all its values joined by ``\\``
    (Scheduled Station AE Title, VM 1-n): it matches if any stored value matches any value
    of the key, as a single-valued attribute would (single value or wild card, case-
    sensitive); ``wildcards=False`` compares literally (a site policy's own AE title).

    Most items hold one value: the plain comparison comes first and uses the index; only an
    item holding several values is searched value by value.
    """
    if value is None:
        return None
    if wildcards:
        single = match_text(column, value, dialect=dialect)
        if single is None:
            return None  # universal
    else:
        single = column == value
    parts = [part for part in value.split("\\") if part]
    if not parts:
        return single
    alternatives = "|".join(_value_regex(part, wildcards=wildcards, atomic=dialect == "sqlite")
                            for part in parts)
    several = column.contains("\\", autoescape=True)
    return or_(single, several & _regex(column, rf"(^|\\)({alternatives})(\\|$)",
                                        dialect=dialect, case_insensitive=False))


# --- person names -----------------------------------------------------------------------

# What must be escaped to stay literal in both Python's and PostgreSQL's regular expressions.
_REGEX_SPECIAL = frozenset("\\.^$*+?{}[]|()")


def _name_group_pattern(group: str, *, atomic: bool = False) -> str:
    """One component group of a PN key as a regular expression over one stored group.

    DICOM wild cards never reach across a component group delimiter "=", and empty trailing
    components ("DOE^JOHN^^") name the same person as without them (PS3.5 6.2.1).
    """
    return wildcard_regex(group.rstrip("^"), one="[^=]", atomic=atomic) + r"\^*"


def person_name_pattern(value: str, *, atomic: bool = False) -> str | None:
    """A PN key (single value or wild card) as a regular expression; ``None`` = universal.

    A PN value has up to three component groups, alphabetic=ideographic=phonetic
    (``Yamada^Tarou=山田^太郎=やまだ^たろう``, PS3.5 6.2.1.2). PS3.4 C.2.2.2.1 and C.2.2.2.4
    leave PN matching to the implementation; the broker's rule:

    - a key without "=" matches if any one group of the stored name matches it, so a
      modality that types only the ideographic name (or only the romanised one) finds it;
    - a key with "=" matches group by group: each non-empty group of the key must match the
      stored group in the same position; an empty group (or ``*``) matches anything there.
      A stored name without that group fails (an unknown value matches no key, K.2.2.1.1.1).
    """
    groups = [group.rstrip("^") for group in value.split("=")]
    while groups and groups[-1] in ("", "*"):
        groups.pop()
    if not groups:
        return None
    if len(groups) == 1:
        return f"(^|=){_name_group_pattern(groups[0], atomic=atomic)}(=|$)"
    parts = ["[^=]*" if group in ("", "*") else _name_group_pattern(group, atomic=atomic)
             for group in groups]
    return "^" + "=".join(parts) + "(=|$)"


def _regex(column: Column, pattern: str, *, dialect: str, case_insensitive: bool) -> Condition:
    if dialect == "sqlite":
        # SQLAlchemy's pysqlite REGEXP is Python's re.search, which takes no separate flags;
        # its IGNORECASE folds all of Unicode (Müller = MÜLLER), not ASCII only as LIKE does.
        return column.regexp_match(f"(?i){pattern}" if case_insensitive else pattern)
    return column.regexp_match(pattern, flags="i" if case_insensitive else None)


def match_person_name(column: Column, value: str | None, *, dialect: str,
                      case_insensitive: bool = True) -> Condition | None:
    """A PN key: single value or wild card matching per :func:`person_name_pattern`, case-
    insensitive unless asked otherwise; several values separated by ``\\`` match if any
    does. ``None`` = no filter."""
    if value is None:
        return None
    conditions: list[Condition] = []
    for part in (part.strip() for part in value.split("\\")):
        if not part:
            continue
        # SQLite's REGEXP is Python's backtracking re (see wildcard_regex).
        pattern = person_name_pattern(part, atomic=dialect == "sqlite")
        if pattern is None:
            return None  # "*" (C.2.2.2.4), or nothing asked of any group: universal
        conditions.append(_regex(column, pattern, dialect=dialect,
                                 case_insensitive=case_insensitive))
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


# --- dates and times --------------------------------------------------------------------

def parse_date(text: str) -> dt.date:
    """A DA value ``YYYYMMDD`` (or the ACR-NEMA ``YYYY.MM.DD`` PS3.5 6.2 still allows)."""
    cleaned = text.strip()
    if len(cleaned) == 10 and cleaned[4] == "." and cleaned[7] == ".":
        cleaned = cleaned.replace(".", "")
    found = _DATE.fullmatch(cleaned)
    if found is None:
        raise InvalidQuery(f"invalid date {text!r} (YYYYMMDD)")
    try:
        return dt.date(int(found[1]), int(found[2]), int(found[3]))
    except ValueError:
        raise InvalidQuery(f"invalid date {text!r}") from None


def parse_time(text: str) -> tuple[dt.time, dt.timedelta]:
    """A TM value as (first instant, length of the period its precision names).

    ``09`` is the hour 09:00-10:00, ``0930`` the minute 09:30-09:31, ``093000.5`` a tenth of
    a second; the legacy ``HH:MM:SS`` form is read too.
    """
    cleaned = text.strip().replace(":", "")
    found = _TIME.fullmatch(cleaned)
    if found is None:
        raise InvalidQuery(f"invalid time {text!r} (HHMMSS.FFFFFF)")
    hour, minute, second, fraction = found.groups()
    if fraction is not None:
        span = dt.timedelta(microseconds=10 ** (6 - len(fraction)))
    elif second is not None:
        span = dt.timedelta(seconds=1)
    elif minute is not None:
        span = dt.timedelta(minutes=1)
    else:
        span = dt.timedelta(hours=1)
    try:
        start = dt.time(int(hour), int(minute or 0), int(second or 0),
                        int((fraction or "0").ljust(6, "0")))
    except ValueError:
        raise InvalidQuery(f"invalid time {text!r}") from None
    return start, span


def _split_range(value: str, what: str) -> tuple[str | None, str | None]:
    """``A`` -> (A, A), ``A-B`` -> (A, B), ``-B`` -> (None, B), ``A-`` -> (A, None)."""
    value = value.strip()
    if "-" not in value:
        return value, value
    low, _, high = value.partition("-")
    if "-" in high:
        raise InvalidQuery(f"invalid {what} range {value!r} (one '-' at most)")
    low, high = low.strip(), high.strip()
    if not low and not high:
        raise InvalidQuery(f"invalid {what} range {value!r} (no start, no end)")
    return low or None, high or None


def _at(day: dt.date, time: dt.time) -> dt.datetime:
    return dt.datetime.combine(day, time)


def start_interval(date_value: str | None,
                   time_value: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The scheduled start period a date and time query selects, as [low, high).

    PS3.4 C.2.2.2.5: with the date alone, a date or range covers whole days (``-B`` all
    before the end of day B, ``A-`` all from the start of day A). When both the date and the
    time are given they are one combined date-time range, not a daily time window:
    ``20060705-20060707`` with ``1000-1800`` selects 5 July 10:00 to 7 July 18:00. A single
    value counts as a range of itself (``20060705`` with ``1000-1800`` is that day 10:00 to
    18:00). The start time applies to the start date and the end time to the end date; an
    open side stays open. A time of reduced precision covers its whole unit, so an end of
    ``1800`` includes 18:00:59.

    Returns ``(None, None)`` when the date is universal; a time alone is matched separately,
    as a time of day on any date (:func:`time_of_day_condition`).
    """
    if not date_value:
        return None, None
    low_date_text, high_date_text = _split_range(date_value, "date")
    low_date = parse_date(low_date_text) if low_date_text else None
    high_date = parse_date(high_date_text) if high_date_text else None
    if low_date and high_date and low_date > high_date:
        raise InvalidQuery(f"date range {date_value!r} ends before it starts")
    low_time: tuple[dt.time, dt.timedelta] | None = None
    high_time: tuple[dt.time, dt.timedelta] | None = None
    if time_value:
        low_time_text, high_time_text = _split_range(time_value, "time")
        low_time = parse_time(low_time_text) if low_time_text else None
        high_time = parse_time(high_time_text) if high_time_text else None
    low = None
    if low_date is not None:
        low = _at(low_date, low_time[0] if low_time else dt.time())
    high = None
    if high_date is not None:
        if high_time is not None:
            high = _at(high_date, high_time[0]) + high_time[1]
        else:
            high = _at(high_date, dt.time()) + _ONE_DAY
    if low is not None and high is not None and low >= high:
        raise InvalidQuery(f"date/time range {date_value!r} {time_value!r} ends before it "
                           "starts")
    return low, high


def match_date(column: Column, value: str | None) -> list[Condition]:
    """PS3.4 C.2.2.2.1 / C.2.2.2.5 on a DA column: a date, ``A-B``, ``-B`` or ``A-``."""
    if not value:
        return []
    low_text, high_text = _split_range(value, "date")
    low = parse_date(low_text) if low_text else None
    high = parse_date(high_text) if high_text else None
    if low and high and low > high:
        raise InvalidQuery(f"date range {value!r} ends before it starts")
    found: list[Condition] = []
    if low is not None:
        found.append(column >= low)
    if high is not None:
        found.append(column <= high)
    return found


def _time_of_day(column: Column, dialect: str) -> tuple[ColumnElement[Any], Any]:
    """An SQL expression for the column's time of day, and how to render a bound for it."""
    if dialect == "sqlite":
        # SQLite stores DateTime as text; strftime's %f is SS.SSS, so milliseconds.
        return (func.strftime("%H:%M:%f", column),
                lambda t: f"{t:%H:%M:%S}.{t.microsecond // 1000:03d}")
    return cast(column, Time), lambda t: t


def time_of_day_condition(column: Column, time_value: str | None,
                          dialect: str) -> list[Condition]:
    """A TM value or range without a date: the time of day, on any date (C.2.2.2.5)."""
    if not time_value:
        return []
    low_text, high_text = _split_range(time_value, "time")
    expression, bound = _time_of_day(column, dialect)
    conditions: list[Condition] = []
    if low_text:
        conditions.append(expression >= bound(parse_time(low_text)[0]))
    if high_text:
        start, span = parse_time(high_text)
        end = _at(dt.date.min, start) + span
        if end.date() == dt.date.min:  # an end of 24:00 is no bound at all
            conditions.append(expression < bound(end.time()))
    return conditions


# --- the query --------------------------------------------------------------------------

_COLUMNS = (
    Patient.patient_id,
    Patient.issuer_of_patient_id,
    Patient.patient_name,
    Patient.birth_date,
    Patient.sex,
    WorklistItem.accession_number,
    WorklistItem.study_instance_uid,
    WorklistItem.requested_procedure_id,
    WorklistItem.requested_procedure_description,
    WorklistItem.requested_procedure_code_value,
    WorklistItem.requested_procedure_code_scheme,
    WorklistItem.requested_procedure_code_meaning,
    WorklistItem.sps_id,
    WorklistItem.sps_description,
    WorklistItem.modality,
    WorklistItem.scheduled_station_ae_title,
    WorklistItem.scheduled_start,
    WorklistItem.referring_physician_name,
    WorklistItem.requesting_physician,
    WorklistItem.placer_order_number,
    WorklistItem.filler_order_number,
    WorklistItem.status,
    WorklistItem.scheduled_performing_physician_name,
    WorklistItem.scheduled_station_name,
    WorklistItem.requested_procedure_priority,
    WorklistItem.item_dataset,
)


# The DICOM name of each key, as an explanation shows it (PS3.6).
_TEXT_KEYS: tuple[tuple[str, str, Column], ...] = (
    ("accession_number", "Accession Number", WorklistItem.accession_number),
    ("patient_id", "Patient ID", Patient.patient_id),
    ("issuer_of_patient_id", "Issuer of Patient ID", Patient.issuer_of_patient_id),
    ("patient_sex", "Patient's Sex", Patient.sex),
    ("placer_order_number", "Placer Order Number / Imaging Service Request",
     WorklistItem.placer_order_number),
    ("filler_order_number", "Filler Order Number / Imaging Service Request",
     WorklistItem.filler_order_number),
    ("requested_procedure_id", "Requested Procedure ID", WorklistItem.requested_procedure_id),
    ("requested_procedure_description", "Requested Procedure Description",
     WorklistItem.requested_procedure_description),
    ("requested_procedure_code_value", "Requested Procedure Code Value",
     WorklistItem.requested_procedure_code_value),
    ("requested_procedure_code_scheme", "Requested Procedure Coding Scheme Designator",
     WorklistItem.requested_procedure_code_scheme),
    ("requested_procedure_code_meaning", "Requested Procedure Code Meaning",
     WorklistItem.requested_procedure_code_meaning),
    ("modality", "Modality", WorklistItem.modality),
    ("sps_id", "Scheduled Procedure Step ID", WorklistItem.sps_id),
    ("sps_description", "Scheduled Procedure Step Description", WorklistItem.sps_description),
    ("scheduled_station_name", "Scheduled Station Name", WorklistItem.scheduled_station_name),
    ("requested_procedure_priority", "Requested Procedure Priority",
     WorklistItem.requested_procedure_priority),
)
_NAME_KEYS: tuple[tuple[str, str, Column], ...] = (
    ("patient_name", "Patient's Name", Patient.patient_name),
    ("referring_physician_name", "Referring Physician's Name",
     WorklistItem.referring_physician_name),
    ("requesting_physician", "Requesting Physician", WorklistItem.requesting_physician),
    ("scheduled_performing_physician_name", "Scheduled Performing Physician's Name",
     WorklistItem.scheduled_performing_physician_name),
)
STATUS_KEY = "Scheduled Procedure Step Status"
START_DATE_KEY = "Scheduled Procedure Step Start Date"
START_TIME_KEY = "Scheduled Procedure Step Start Time"
SCOPE_KEY = "only_own_items"


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, dt.datetime):
        return f"{value:%Y%m%d %H%M%S}"
    if isinstance(value, dt.date):
        return f"{value:%Y%m%d}"
    return str(value)


def _shown_date(value: Any) -> str:
    return f"{value:%Y%m%d}" if isinstance(value, dt.date) else _shown(value)


def _shown_time(value: Any) -> str:
    return f"{value:%H%M%S}" if isinstance(value, dt.datetime) else _shown(value)


@dataclass(frozen=True, slots=True)
class KeyCondition:
    """One key's filter, with what the explanation of a decision needs to show it.

    ``field`` is the :class:`WorklistQuery` field it comes from, ``item`` the stored value
    it tests (rendered by ``shown``). C-FIND uses only ``condition``; an explanation runs the
    very same conditions against one item (:func:`explain`).
    """

    field: str
    key: str
    asked: str
    condition: Condition
    item: ColumnElement[Any]
    shown: Callable[[Any], str] = _shown


def keyed_conditions(query: WorklistQuery, dialect: str) -> list[KeyCondition]:
    """Every filter the query asks for, one per key; raises :class:`InvalidQuery`."""
    found: list[KeyCondition] = [KeyCondition(
        "statuses", STATUS_KEY, ", ".join(str(s) for s in query.statuses) or "(none)",
        WorklistItem.status.in_([str(s) for s in query.statuses]), WorklistItem.status)]
    for field, key, column in _TEXT_KEYS:
        value = getattr(query, field)
        condition = match_text(column, value, dialect=dialect)
        if condition is not None:
            found.append(KeyCondition(field, key, value, condition, column))
    for field, key, column in _NAME_KEYS:
        value = getattr(query, field)
        condition = match_person_name(column, value, dialect=dialect,
                                      case_insensitive=not query.names_case_sensitive)
        if condition is not None:
            found.append(KeyCondition(field, key, value, condition, column))
    station = match_multi_valued(WorklistItem.scheduled_station_ae_title,
                                 query.scheduled_station_ae_title, dialect=dialect)
    if station is not None:
        found.append(KeyCondition("scheduled_station_ae_title", "Scheduled Station AE Title",
                                  query.scheduled_station_ae_title or "", station,
                                  WorklistItem.scheduled_station_ae_title))
    birth = match_date(Patient.birth_date, query.patient_birth_date)
    if birth:
        found.append(KeyCondition("patient_birth_date", "Patient's Birth Date",
                                  query.patient_birth_date or "", and_(*birth),
                                  Patient.birth_date, _shown_date))
    uid = match_uid_list(WorklistItem.study_instance_uid, query.study_instance_uid)
    if uid is not None:
        found.append(KeyCondition("study_instance_uid", "Study Instance UID",
                                  query.study_instance_uid or "", uid,
                                  WorklistItem.study_instance_uid))
    if query.scope_station is not None:
        # A step schedulable on several stations belongs to each of them.
        own = match_multi_valued(WorklistItem.scheduled_station_ae_title, query.scope_station,
                                 dialect=dialect, wildcards=False)
        assert own is not None  # a calling AE title is never empty
        asked = query.scope_station
        if query.scope_modality is not None:
            own = or_(own, (WorklistItem.scheduled_station_ae_title.is_(None)
                            & (WorklistItem.modality == query.scope_modality)))
            asked += f" (or no station and modality {query.scope_modality})"
        found.append(KeyCondition("scope_station", SCOPE_KEY, asked, own,
                                  WorklistItem.scheduled_station_ae_title))
    start = WorklistItem.scheduled_start
    if query.scheduled_start_date:
        low, high = start_interval(query.scheduled_start_date, query.scheduled_start_time)
        bounds: list[Condition] = []
        if low is not None:
            bounds.append(start >= low)
        if high is not None:
            bounds.append(start < high)
        if query.scheduled_start_time:
            found.append(KeyCondition(
                "scheduled_start_date", f"{START_DATE_KEY} and Time",
                f"{query.scheduled_start_date} {query.scheduled_start_time}", and_(*bounds),
                start))
        else:
            found.append(KeyCondition("scheduled_start_date", START_DATE_KEY,
                                      query.scheduled_start_date, and_(*bounds), start,
                                      _shown_date))
    else:
        times = time_of_day_condition(start, query.scheduled_start_time, dialect)
        if times:
            found.append(KeyCondition("scheduled_start_time", START_TIME_KEY,
                                      query.scheduled_start_time or "", and_(*times), start,
                                      _shown_time))
    return found


def conditions(query: WorklistQuery, dialect: str) -> list[Condition]:
    """Every filter the query asks for, ready for ``select(...).where(*conditions)``."""
    return [key.condition for key in keyed_conditions(query, dialect)]


def _row(values: Any) -> WorklistRow:
    return WorklistRow(
        patient=PatientData(
            patient_id=values.patient_id,
            issuer_of_patient_id=values.issuer_of_patient_id,
            patient_name=values.patient_name,
            birth_date=values.birth_date,
            sex=values.sex,
        ),
        procedure=ProcedureData(
            accession_number=values.accession_number,
            study_instance_uid=values.study_instance_uid,
            requested_procedure_id=values.requested_procedure_id,
            requested_procedure_description=values.requested_procedure_description,
            requested_procedure_code_value=values.requested_procedure_code_value,
            requested_procedure_code_scheme=values.requested_procedure_code_scheme,
            requested_procedure_code_meaning=values.requested_procedure_code_meaning,
            sps_id=values.sps_id,
            sps_description=values.sps_description,
            modality=values.modality,
            scheduled_station_ae_title=values.scheduled_station_ae_title,
            scheduled_start=values.scheduled_start,
            referring_physician_name=values.referring_physician_name,
            requesting_physician=values.requesting_physician,
            placer_order_number=values.placer_order_number,
            filler_order_number=values.filler_order_number,
            scheduled_performing_physician_name=values.scheduled_performing_physician_name,
            scheduled_station_name=values.scheduled_station_name,
            requested_procedure_priority=values.requested_procedure_priority,
            item_dataset=values.item_dataset,
        ),
        status=ItemStatus(values.status),
    )


def _ordered(statement: Select[Any], where: list[Condition]) -> Select[Any]:
    """The matching items, joined to their patient, in the order C-FIND answers them."""
    return (statement
            .join(Patient, WorklistItem.patient_fk == Patient.id)
            .where(*where)
            .order_by(WorklistItem.scheduled_start.asc().nulls_last(), WorklistItem.id))


def find_worklist(session: Session, query: WorklistQuery) -> list[WorklistRow]:
    """The matching items with their patients, by scheduled start, at most ``query.limit``.

    One SELECT joining the patient; raises :class:`InvalidQuery` for a malformed date, time
    or range before touching the database.
    """
    if not query.statuses or query.limit < 1:
        return []
    dialect = session.get_bind().dialect.name
    where = conditions(query, dialect)
    # One row more than allowed tells a truncated answer from an exact fit.
    statement = _ordered(select(*_COLUMNS), where).limit(query.limit + 1)
    rows = [_row(values) for values in session.execute(statement)]
    if len(rows) > query.limit:
        log.warning("worklist query matched more than %d items; answering the first %d",
                    query.limit, query.limit)
        del rows[query.limit:]
    return rows


# --- explaining a decision ---------------------------------------------------------------

LIMIT_KEY = "max_matches"
UNIVERSAL_DAYS_KEY = "universal_query_days"


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """Whether one key of a query let one item through, and why, in an operator's words."""

    key: str
    asked: str
    item: str
    matched: bool
    reason: str


def _reason(key: KeyCondition, item: str, matched: bool, policy: Collection[str]) -> str:
    if key.field in policy:
        if key.field == "statuses":
            return f"status {item} is {'' if matched else 'not '}visible"
        if key.field == "scope_station":
            return f"{SCOPE_KEY}: station {key.asked}, item {item}"
        if key.field == "scheduled_start_date":
            return (f"{UNIVERSAL_DAYS_KEY}: a query with no date and no identifying key gets "
                    f"{key.asked}, item {item}")
    return f"{key.key}: asked {key.asked}, item {item}"


def _item_scope(session: Session, item_id: int) -> str:
    station, modality = session.execute(
        select(WorklistItem.scheduled_station_ae_title, WorklistItem.modality)
        .where(WorklistItem.id == item_id)).one()
    return station or f"no station, modality {modality or '(empty)'}"


def explain(session: Session, query: WorklistQuery, item_id: int, *,
            policy: Collection[str] = ()) -> list[KeyVerdict]:
    """Key by key, whether the item ``item_id`` matches ``query``, as C-FIND decides it.

    The very conditions :func:`find_worklist` puts in its WHERE clause are evaluated, each
    on its own, against that one item (one SELECT). ``policy`` names the query fields the
    site policy set rather than the modality (``statuses``, ``scope_station``,
    ``scheduled_start_date``), so the reason names the rule. A match the query's limit cuts
    off is reported as the ``max_matches`` key. Raises :class:`InvalidQuery`, and
    ``NoResultFound`` when there is no such item.
    """
    dialect = session.get_bind().dialect.name
    keyed = keyed_conditions(query, dialect)
    columns: list[ColumnElement[Any]] = []
    for number, key in enumerate(keyed):
        columns.append(case((key.condition, 1), else_=0).label(f"m{number}"))
        columns.append(key.item.label(f"v{number}"))
    row = session.execute(
        select(*columns).select_from(WorklistItem)
        .join(Patient, WorklistItem.patient_fk == Patient.id)
        .where(WorklistItem.id == item_id)).one()
    verdicts: list[KeyVerdict] = []
    for number, key in enumerate(keyed):
        matched = bool(row[2 * number])
        item = (_item_scope(session, item_id) if key.field == "scope_station"
                else key.shown(row[2 * number + 1]))
        verdicts.append(KeyVerdict(key.key, key.asked, item, matched,
                                   _reason(key, item, matched, policy)))
    if all(verdict.matched for verdict in verdicts):
        cut = _beyond_limit(session, query, item_id, [key.condition for key in keyed])
        if cut is not None:
            verdicts.append(cut)
    return verdicts


def _beyond_limit(session: Session, query: WorklistQuery, item_id: int,
                  where: list[Condition]) -> KeyVerdict | None:
    """The ``max_matches`` verdict when the item matched but is not among the items sent."""
    total = session.scalar(select(func.count()).select_from(
        _ordered(select(WorklistItem.id), where).order_by(None).subquery())) or 0
    if total <= query.limit:
        return None
    sent = set(session.scalars(_ordered(select(WorklistItem.id), where).limit(query.limit)))
    if item_id in sent:
        return None
    return KeyVerdict(LIMIT_KEY, str(query.limit), f"one of {total} matches", False,
                      f"{LIMIT_KEY}: the query matched {total} items; only the first "
                      f"{query.limit} by scheduled start are answered")
