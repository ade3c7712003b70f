"""The site's worklist policy, applied on top of what a modality asks (``dicom`` config):
which statuses are visible, which items a calling AE may see (``only_own_items``), and the
date window of a query that names no date and no patient or order (``universal_query_days``).

One function, called by the C-FIND handler and by the "why is it not on the worklist?"
explanation, so both apply the same rules.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from broker.config import DicomConfig
from broker.domain import VISIBLE_STATUSES, ItemStatus
from broker.matching import WorklistQuery

# Keys that pick out a patient or an order: a query with one of them is no "universal" query.
IDENTIFYING_KEYS = ("accession_number", "patient_id", "patient_name", "study_instance_uid",
                    "requested_procedure_id", "sps_id")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    query: WorklistQuery
    # The query fields the policy set (``statuses``, ``scheduled_start_date``,
    # ``scope_station``): an explanation names the rule rather than the modality's key.
    applied: frozenset[str]


def apply_site_policy(query: WorklistQuery, dicom: DicomConfig, calling_ae: str, *,
                      today: dt.date | None = None) -> PolicyResult:
    """The query as the broker runs it for ``calling_ae``; ``today`` is the local date the
    query was asked on (default: now)."""
    changes: dict[str, object] = {}
    if query.statuses == VISIBLE_STATUSES:
        # The modality asked no status: the site decides what it sees.
        changes["statuses"] = tuple(ItemStatus(status) for status in dicom.visible_statuses)
    days = dicom.universal_query_days
    if days is not None and not query.scheduled_start_date and not any(
            getattr(query, key) for key in IDENTIFYING_KEYS):
        # Some modalities poll with no key at all; a year of history is not their worklist.
        day, span = today or dt.date.today(), dt.timedelta(days=days)
        changes["scheduled_start_date"] = f"{day - span:%Y%m%d}-{day + span:%Y%m%d}"
    modality = dicom.modalities.get(calling_ae)
    if modality is not None and modality.only_own_items:
        changes["scope_station"] = calling_ae
        changes["scope_modality"] = modality.modality
    if not changes:
        return PolicyResult(query, frozenset())
    applied = frozenset(changes) - {"scope_modality"}
    return PolicyResult(replace(query, **changes), applied)  # type: ignore[arg-type]
