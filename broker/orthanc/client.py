"""A small client for Orthanc's REST API: the change feed and a study's main tags.

Standard library only (urllib): two GET requests with JSON answers need no HTTP dependency.
Every call has a timeout: a hung Orthanc inside a scheduler job would stop the job for good.
Answers are those of Orthanc 1.10 (Debian 12), unchanged since 1.0 for what is read here:
``GET /changes?since=N&limit=M`` -> ``{"Changes": [...], "Done": bool, "Last": N}``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from broker.domain import StudyArrival


class OrthancError(Exception):
    """Orthanc cannot be reached, or answered with an error or something not understood."""


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    change_type: str  # NewInstance, StableStudy, ...
    resource_type: str
    resource_id: str


@dataclass(frozen=True, slots=True)
class ChangesPage:
    changes: list[Change]
    done: bool
    last: int


def public_url(url: str) -> str:
    """The URL without credentials or a trailing slash: how the broker names this Orthanc."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class OrthancClient:
    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        # Credentials in the URL (http://user:pass@host:8042) work as well as the keys.
        username = username or (urllib.parse.unquote(parts.username) if parts.username
                                else None)
        password = password or (urllib.parse.unquote(parts.password) if parts.password
                                else None)
        self.url = public_url(url)
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def _get(self, path: str, **query: Any) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            hint = " (check orthanc.username / password)" if exc.code == 401 else ""
            raise OrthancError(f"GET {path}: HTTP {exc.code} {exc.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OrthancError(f"cannot reach Orthanc at {self.url}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise OrthancError(f"GET {path}: the answer is not JSON") from None

    def changes(self, since: int, limit: int = 100) -> ChangesPage:
        data = self._get("/changes", since=since, limit=limit)
        try:
            changes = [Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]),
                              str(c["ID"])) for c in data["Changes"]]
            return ChangesPage(changes, bool(data["Done"]), int(data["Last"]))
        except (TypeError, KeyError, ValueError):
            raise OrthancError("GET /changes: not the answer of an Orthanc change feed") from None

    def last_change(self) -> int:
        """The sequence number of the newest change (0 for an empty Orthanc)."""
        data = self._get("/changes", last="")
        try:
            return int(data["Last"])
        except (TypeError, KeyError, ValueError):
            raise OrthancError("GET /changes?last: not the answer of an Orthanc change feed"
                               ) from None

    def study(self, study_id: str) -> StudyArrival | None:
        """The study's main tags, modalities and counts; None if Orthanc no longer has it."""
        quoted = urllib.parse.quote(study_id, safe="")
        study = self._get(f"/studies/{quoted}")
        series = self._get(f"/studies/{quoted}/series")
        if study is None or series is None:
            return None
        try:
            tags = study.get("MainDicomTags") or {}
            patient = study.get("PatientMainDicomTags") or {}
            modalities: list[str] = []
            instances = 0
            for one in series:
                modality = (one.get("MainDicomTags") or {}).get("Modality")
                if modality and modality not in modalities:
                    modalities.append(modality)
                instances += len(one.get("Instances") or ())
        except (AttributeError, TypeError):
            raise OrthancError(f"GET /studies/{study_id}: not the answer of Orthanc") from None
        return StudyArrival(
            source=self.url, source_id=study_id,
            study_instance_uid=_text(tags.get("StudyInstanceUID")),
            accession_number=_text(tags.get("AccessionNumber")),
            patient_id=_text(patient.get("PatientID")),
            patient_name=_text(patient.get("PatientName")),
            modalities=tuple(modalities), number_of_series=len(series),
            number_of_instances=instances,
            study_date=_date(tags.get("StudyDate")), study_time=_time(tags.get("StudyTime")),
            study_description=_text(tags.get("StudyDescription")))


def _text(value: Any) -> str | None:
    return str(value).strip() or None if value is not None else None


def _date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None  # absent or malformed: the study is still handled, without a date


def _time(value: Any) -> dt.time | None:
    digits = str(value or "").strip().replace(":", "").split(".")[0]
    if not digits.isdigit() or len(digits) < 2:
        return None
    digits = digits.ljust(6, "0")[:6]
    try:
        return dt.time(int(digits[:2]), int(digits[2:4]), int(digits[4:6]))
    except ValueError:
        return None
