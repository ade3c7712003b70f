"""The HL7 -> DICOM mapping an administrator edits (config/mapping.yaml), and applying it.

The YAML names, for each DICOM attribute the broker stores (by keyword, sequence items as
``Sequence.Keyword``), the HL7 field paths it comes from. The attribute's value
representation decides how the text is read: DA and TM take the date or the time of an HL7
TS, PN reorders an HL7 XPN/XCN name into DICOM's family^given^middle^prefix^suffix, and each
value is checked against its VR's length so that no bad dataset is ever stored.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword

from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.errors import ConfigError, InvalidOrder, UnsupportedMessage
from hl7_listener.message import DATA_TYPE_ERROR, FieldPath, ParsedMessage, parse_path

REQUIRED_FIELD_MISSING = "101"
TABLE_VALUE_NOT_FOUND = "103"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a DICOM attribute lands in the core's Order, and its value representation."""

    part: str  # "patient" or "procedure"
    name: str  # the PatientData / ProcedureData field
    vr: str


# Every DICOM attribute the store keeps, by keyword path. A keyword not listed here is
# refused when the mapping is loaded.
TARGETS: dict[str, Target] = {
    "PatientID": Target("patient", "patient_id", "LO"),
    "IssuerOfPatientID": Target("patient", "issuer_of_patient_id", "LO"),
    "PatientName": Target("patient", "patient_name", "PN"),
    "PatientBirthDate": Target("patient", "birth_date", "DA"),
    "PatientSex": Target("patient", "sex", "CS"),
    "AccessionNumber": Target("procedure", "accession_number", "SH"),
    "StudyInstanceUID": Target("procedure", "study_instance_uid", "UI"),
    "RequestedProcedureID": Target("procedure", "requested_procedure_id", "SH"),
    "RequestedProcedureDescription": Target("procedure", "requested_procedure_description",
                                            "LO"),
    "RequestedProcedureCodeSequence.CodeValue": Target(
        "procedure", "requested_procedure_code_value", "SH"),
    "RequestedProcedureCodeSequence.CodingSchemeDesignator": Target(
        "procedure", "requested_procedure_code_scheme", "SH"),
    "RequestedProcedureCodeSequence.CodeMeaning": Target(
        "procedure", "requested_procedure_code_meaning", "LO"),
    "ReferringPhysicianName": Target("procedure", "referring_physician_name", "PN"),
    "RequestingPhysician": Target("procedure", "requesting_physician", "PN"),
    "PlacerOrderNumberImagingServiceRequest": Target("procedure", "placer_order_number", "LO"),
    "FillerOrderNumberImagingServiceRequest": Target("procedure", "filler_order_number", "LO"),
    "ScheduledProcedureStepSequence.ScheduledProcedureStepID": Target(
        "procedure", "sps_id", "SH"),
    "ScheduledProcedureStepSequence.ScheduledProcedureStepDescription": Target(
        "procedure", "sps_description", "LO"),
    "ScheduledProcedureStepSequence.Modality": Target("procedure", "modality", "CS"),
    "ScheduledProcedureStepSequence.ScheduledStationAETitle": Target(
        "procedure", "scheduled_station_ae_title", "AE"),
    "ScheduledProcedureStepSequence.ScheduledPerformingPhysicianName": Target(
        "procedure", "scheduled_performing_physician_name", "PN"),
    "ScheduledProcedureStepSequence.ScheduledStationName": Target(
        "procedure", "scheduled_station_name", "SH"),
    "RequestedProcedurePriority": Target("procedure", "requested_procedure_priority", "CS"),
    "ScheduledProcedureStepSequence.ScheduledProcedureStepStartDate": Target(
        "procedure", "scheduled_start", "DA"),
    "ScheduledProcedureStepSequence.ScheduledProcedureStepStartTime": Target(
        "procedure", "scheduled_start", "TM"),
}

# Value representations the mapping can fill in the item's dataset (text from HL7 fields).
_DATASET_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                          "ST", "TM", "UC", "UI", "UR", "UT", "US"})


def dataset_target(keyword: str) -> Target | None:
    """Any other DICOM attribute, top level or in a sequence's item (``Sequence.Keyword``):
    kept in the item's dataset (Allergies, Patient's Weight, Current Patient Location...)."""
    parts = keyword.split(".")
    if len(parts) > 2:
        return None
    vr = ""
    for index, part in enumerate(parts):
        tag = tag_for_keyword(part)
        if tag is None:
            return None
        vr = dictionary_VR(tag).split(" or ")[0]
        if index < len(parts) - 1 and vr != "SQ":
            return None
    if vr not in _DATASET_VRS:
        return None
    return Target("dataset", keyword, vr)


def _multi_valued(keyword: str) -> bool:
    tag = tag_for_keyword(keyword.rsplit(".", 1)[-1])
    return tag is not None and dictionary_VM(tag) != "1"


# PS3.5 table 6.2-1 maximum lengths.
_MAX_LENGTH = {"LO": 64, "SH": 16, "CS": 16, "AE": 16, "UI": 64, "DS": 16, "IS": 12,
               "LT": 10240, "ST": 1024, "AS": 4, "DT": 26}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?$")
# HL7 XPN: family^given^middle^suffix^prefix^degree; XCN: id^family^given^middle^suffix^prefix.
_NAME_ORDER = {"XPN": (0, 1, 2, 4, 3), "XCN": (1, 2, 3, 5, 4)}
# HL7 table 0001 -> DICOM PatientSex (M, F, O; empty when unknown).
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "U": "", "N": ""}
_CONTROLS = {
    "NW": OrderControl.NEW,
    "XO": OrderControl.CHANGE,
    "CA": OrderControl.CANCEL,
    "OC": OrderControl.CANCEL,  # order cancelled by the filler: the same for the worklist
    "DC": OrderControl.DISCONTINUE,
    "SC": OrderControl.STATUS,
    "HD": OrderControl.HOLD,
    "RL": OrderControl.RELEASE,
}
_ORDER_CONTROL_PATH = FieldPath("ORC", 1)
START_DATE = "ScheduledProcedureStepSequence.ScheduledProcedureStepStartDate"
_ORDER_STATUS_PATH = FieldPath("ORC", 5)
MERGE_PATIENT_ID_PATH = FieldPath("MRG", 1, 1)


@dataclass(frozen=True, slots=True)
class Rule:
    keyword: str
    target: Target
    sources: tuple[FieldPath, ...]
    required: bool = False
    name_format: str = "XPN"
    default: str | None = None
    table: dict[str, str] | None = None
    transforms: tuple[str, ...] = ()
    truncate: bool = False
    date_format: str | None = None
    # Every value (every repetition, in every such segment), for a multi-valued attribute.
    all_values: bool = False
    # Only segments where, for one of these alternatives, every path holds one of its values
    # (case-insensitive): OBX-5 where OBX-3 is the body weight.
    where: tuple[tuple[tuple[FieldPath, frozenset[str]], ...], ...] = ()

    def describe_source(self) -> str:
        text = " | ".join(str(p) for p in self.sources) or "constant"
        if self.where:
            text += " where " + " or ".join(
                " and ".join(f"{path}={'/'.join(sorted(values))}" for path, values in group)
                for group in self.where)
        if self.all_values and self.sources:
            text += f" (every {self.sources[0].segment}, every repetition)"
        return text


_TRANSFORMS = {
    "upper": str.upper,
    "lower": str.lower,
    "strip": str.strip,
    "collapse_spaces": lambda text: " ".join(text.split()),
}
_OPTIONS = {"from", "required", "format", "default", "table", "transform", "truncate",
            "date_format", "all", "where"}


def _read_rule(keyword: str, spec: Any, where: str,
               tables: dict[str, dict[str, str]] | None = None) -> Rule:
    target = TARGETS.get(keyword) or dataset_target(keyword)
    if target is None:
        raise ConfigError(f"{where}: {keyword!r} is not a DICOM attribute keyword (or "
                          "Sequence.Keyword) of a text value the mapping can fill")
    if isinstance(spec, str | list):
        spec = {"from": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {keyword}: expected a field path or a mapping with 'from'")
    unknown = set(spec) - _OPTIONS
    if unknown:
        raise ConfigError(f"{where}: {keyword}: unknown option(s) {', '.join(sorted(unknown))}")
    sources = spec.get("from", [])
    sources = [sources] if isinstance(sources, str) else sources
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ConfigError(f"{where}: {keyword}: 'from' must be a field path or a list of them")
    try:
        paths = tuple(parse_path(s) for s in sources)
    except ValueError as exc:
        raise ConfigError(f"{where}: {keyword}: {exc}") from None
    name_format = str(spec.get("format", "XCN" if keyword != "PatientName" else "XPN")).upper()
    if name_format not in _NAME_ORDER:
        raise ConfigError(f"{where}: {keyword}: format must be XPN or XCN")
    if "format" in spec and target.vr != "PN":
        raise ConfigError(f"{where}: {keyword}: 'format' applies to person names only")
    default = spec.get("default")
    if not paths and default is None:
        raise ConfigError(f"{where}: {keyword}: needs 'from' or 'default'")
    table = None
    if "table" in spec:
        table = (tables or {}).get(str(spec["table"]))
        if table is None:
            raise ConfigError(f"{where}: {keyword}: unknown table {spec['table']!r} "
                              f"(tables: {', '.join(tables or {}) or 'none defined'})")
    transforms = spec.get("transform", [])
    transforms = [transforms] if isinstance(transforms, str) else transforms
    bad = [t for t in transforms if t not in _TRANSFORMS]
    if not isinstance(transforms, list) or bad:
        raise ConfigError(f"{where}: {keyword}: unknown transform {bad or transforms!r} "
                          f"(one of: {', '.join(_TRANSFORMS)})")
    date_format = spec.get("date_format")
    if date_format is not None and target.vr not in ("DA", "TM"):
        raise ConfigError(f"{where}: {keyword}: 'date_format' applies to dates and times only")
    all_values = bool(spec.get("all", False))
    if all_values and (target.part != "dataset" or not _multi_valued(keyword)):
        raise ConfigError(f"{where}: {keyword}: 'all' applies to multi-valued attributes the "
                          "broker keeps in the item's dataset only")
    conditions = _read_where(spec.get("where"), f"{where}: {keyword}")
    if (all_values or conditions) and len({p.segment for p in paths}) != 1:
        raise ConfigError(f"{where}: {keyword}: with 'all' or 'where', every path of 'from' "
                          "reads the same segment")
    if conditions and any(path.segment != paths[0].segment
                          for group in conditions for path, _ in group):
        raise ConfigError(f"{where}: {keyword}: 'where' reads the segment of 'from' "
                          f"({paths[0].segment})")
    return Rule(keyword, target, paths, bool(spec.get("required", False)), name_format,
                None if default is None else str(default), table, tuple(transforms),
                bool(spec.get("truncate", False)),
                None if date_format is None else str(date_format), all_values, conditions)


def _read_where(spec: Any, where: str) -> tuple[tuple[tuple[FieldPath, frozenset[str]], ...],
                                                ...]:
    """``where: {OBX-3.1: [3141-9, 29463-7], OBX-6.1: kg}`` (every path matches), or a list
    of such mappings (any of them matches)."""
    if spec is None:
        return ()
    groups = spec if isinstance(spec, list) else [spec]
    out = []
    for group in groups:
        if not isinstance(group, dict) or not group:
            raise ConfigError(f"{where}: 'where' is a mapping of field path: value(s), or a "
                              "list of them")
        conditions = []
        for path_text, values in group.items():
            try:
                path = parse_path(str(path_text))
            except ValueError as exc:
                raise ConfigError(f"{where}: where: {exc}") from None
            values = values if isinstance(values, list) else [values]
            conditions.append((path, frozenset(str(v).upper() for v in values)))
        out.append(tuple(conditions))
    return tuple(out)


@dataclass(slots=True)
class Mapping:
    rules: tuple[Rule, ...]
    source: Path | None = None
    # Per message type (e.g. "OMI^O23"): rules that replace the default ones by keyword.
    overrides: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    _locations: dict[str, str] = field(default_factory=dict)
    _by_type: dict[str, tuple[Rule, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rule in self.rules:
            if rule.sources:
                for name in (rule.keyword, rule.keyword.rsplit(".", 1)[-1], rule.target.name):
                    self._locations.setdefault(name, str(rule.sources[0]))
        for message_type, replaced in self.overrides.items():
            by_keyword = {rule.keyword: rule for rule in self.rules}
            by_keyword.update({rule.keyword: rule for rule in replaced})
            self._by_type[message_type] = tuple(by_keyword.values())

    def location_of(self, attribute: str) -> str | None:
        """The HL7 field an attribute (keyword or core field name) is read from."""
        return self._locations.get(attribute)

    def _rules_for(self, message: ParsedMessage) -> tuple[Rule, ...]:
        return self._by_type.get(f"{message.message_type}^{message.trigger_event}", self.rules)

    def describe(self, message: ParsedMessage) -> list[tuple[Order, list[tuple[str, str, str]]]]:
        """For ``mapping-test``: per item, its Order and (keyword, DICOM value, source) rows."""
        described = []
        for view in message.item_views():
            order = self.to_order(view)
            rows = []
            for rule in self._rules_for(view):
                if rule.target.part == "dataset":
                    found = self._values(view, [rule])["dataset"].get(rule.keyword)
                    shown = "\\".join(str(v) for v in found) if found is not None else ""
                    rows.append((rule.keyword, shown, rule.describe_source()))
                    continue
                part = order.patient if rule.target.part == "patient" else order.procedure
                value = getattr(part, rule.target.name)
                if isinstance(value, dt.datetime):
                    value = value.strftime("%Y%m%d" if rule.target.vr == "DA" else "%H%M%S")
                elif isinstance(value, dt.date):
                    value = value.strftime("%Y%m%d")
                rows.append((rule.keyword, "" if value is None else str(value),
                             rule.describe_source()))
            described.append((order, rows))
        return described

    def warnings(self, message: ParsedMessage, orders: list[Order]) -> list[str]:
        """What the sender and the administrator should know of orders that are taken all
        the same: the ACK, the log, the message list and ``mapping-test`` all say this."""
        rule = next((r for r in self._rules_for(message) if r.keyword == START_DATE), None)
        tried = ", ".join(str(p) for p in rule.sources) if rule and rule.sources else (
            f"{START_DATE.rsplit('.', 1)[-1]} is not mapped")
        return [f"accession {order.procedure.accession_number}: no scheduled start "
                f"({tried} empty); a modality polling by date will not find it"
                for order in orders
                if order.control in (OrderControl.NEW, OrderControl.CHANGE)
                and order.procedure.scheduled_start is None]

    def to_orders(self, message: ParsedMessage) -> list[Order]:
        """One Order per worklist item: per ORC group, or per IPC in an OMI^O23."""
        return [self.to_order(view) for view in message.item_views()]

    def to_patient(self, message: ParsedMessage) -> PatientData:
        """The patient demographics of an ADT message (the mapping's patient attributes)."""
        values = self._values(message, [r for r in self._rules_for(message)
                                         if r.target.part == "patient"])
        values["patient"].setdefault("patient_id", "")
        return PatientData(**values["patient"])

    def to_order(self, message: ParsedMessage) -> Order:
        control_text = message.raw(_ORDER_CONTROL_PATH)
        control = _CONTROLS.get(control_text)
        if control is None:
            raise UnsupportedMessage(
                f"ORC-1 order control {control_text!r} is not supported "
                f"({', '.join(_CONTROLS)})" if control_text else
                "ORC-1 order control is required",
                location="ORC-1", code=TABLE_VALUE_NOT_FOUND if control_text else "101")
        rules = self._rules_for(message)
        if control is not OrderControl.NEW and control is not OrderControl.CHANGE:
            # A status change needs only the keys; a cancel with a stale date is no error.
            rules = tuple(r for r in rules if r.keyword in ("PatientID", "AccessionNumber"))
        values = self._values(message, rules)
        values["patient"].setdefault("patient_id", "")
        values["procedure"].setdefault("accession_number", "")
        if values["dataset"]:
            values["procedure"]["item_dataset"] = _item_dataset(values["dataset"], rules)
        return Order(control, PatientData(**values["patient"]),
                     ProcedureData(**values["procedure"]), message_control_id=message.control_id,
                     order_status=message.get(_ORDER_STATUS_PATH))

    def _values(self, message: ParsedMessage, rules: Any) -> dict[str, dict[str, Any]]:
        values: dict[str, dict[str, Any]] = {"patient": {}, "procedure": {}, "dataset": {}}
        start_date: dt.date | None = None
        start_time: dt.time | None = None
        for rule in rules:
            if rule.target.part == "dataset":
                found = _dataset_values(message, rule)
                if found:
                    values["dataset"][rule.keyword] = found
                continue
            text, location = _first_value(message, rule)
            if text is None:
                if rule.required:
                    raise InvalidOrder(f"{location} {rule.keyword.rsplit('.', 1)[-1]} is "
                                       "required", location=location, attribute=rule.keyword,
                                       code=REQUIRED_FIELD_MISSING)
                continue
            value = _convert(rule, text, location)
            if rule.target.name == "scheduled_start":
                if rule.target.vr == "DA":
                    start_date = value
                else:
                    start_time = value
                continue
            values[rule.target.part][rule.target.name] = value
        if start_date is not None:
            values["procedure"]["scheduled_start"] = dt.datetime.combine(
                start_date, start_time or dt.time())
        return values


def _text_at(message: ParsedMessage, path: FieldPath, rule: Rule) -> str:
    if rule.target.vr == "PN" and path.component is None:
        components = message.components(path)
        order = _NAME_ORDER[rule.name_format]
        picked = [components[i] if i < len(components) else "" for i in order]
        return "^".join(picked).rstrip("^")
    return message.get(path) or ""


def _first_value(message: ParsedMessage, rule: Rule) -> tuple[str | None, str]:
    for path in rule.sources:
        text = _text_at(message, path, rule)
        if text.strip():
            return text, str(path)
    first = str(rule.sources[0]) if rule.sources else rule.keyword
    return rule.default, first


def _where(view: ParsedMessage, rule: Rule) -> bool:
    return not rule.where or any(
        all((view.get(path) or "").strip().upper() in values for path, values in group)
        for group in rule.where)


def _texts(view: ParsedMessage, path: FieldPath, rule: Rule) -> list[str]:
    """The value at ``path``, or with ``all`` every repetition's (unless the path picks one)."""
    picks_one = path.any_repetition or path.where is not None or path.repetition != 1
    if not rule.all_values or picks_one:
        text = _text_at(view, path, rule)
        return [text] if text.strip() else []
    found = []
    for number in range(1, view.repetition_count(path) + 1):
        text = _text_at(view, replace(path, repetition=number), rule)
        if text.strip():
            found.append(text)
    return found


def _dataset_values(message: ParsedMessage, rule: Rule) -> list[Any]:
    """A dataset attribute's values, converted: the first one found, or with ``all`` every
    one (every segment of that name, every repetition; per segment the first path of
    ``from`` that has a value). ``where`` keeps only the segments it describes."""
    if not rule.all_values and not rule.where:
        text, location = _first_value(message, rule)
        return [] if text is None else [_dicom_text(rule, text, location)]
    found: list[Any] = []
    for view in message.segment_views(rule.sources[0].segment):
        if not _where(view, rule):
            continue
        for path in rule.sources:
            texts = _texts(view, path, rule)
            if texts:
                found.extend(_dicom_text(rule, text, str(path)) for text in texts)
                break
        if found and not rule.all_values:
            break
    if not found and rule.default is not None:
        found.append(_dicom_text(rule, rule.default, rule.keyword))
    return found


def _dicom_text(rule: Rule, text: str, location: str) -> Any:
    """A value for the item's dataset: as :func:`_convert` reads it, in DICOM's form."""
    value = _convert(rule, text, location)
    vr, keyword = rule.target.vr, rule.keyword.rsplit(".", 1)[-1]
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    if isinstance(value, dt.time):
        return value.strftime("%H%M%S")
    try:
        if vr == "DS":
            float(value)
        elif vr in ("IS", "US"):
            number = int(value)
            if vr == "US" and not 0 <= number <= 65535:
                raise ValueError(value)
            return number if vr == "US" else str(number)
    except ValueError:
        raise InvalidOrder(f"{location} {keyword} {value!r} is not a number ({vr})",
                           location=location, attribute=rule.keyword,
                           code=DATA_TYPE_ERROR) from None
    return value


def _item_dataset(values: dict[str, list[Any]], rules: Any) -> str:
    """The mapped dataset attributes as the item keeps them (broker.item_dataset)."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    from broker.item_dataset import dataset_json

    vrs = {rule.keyword: rule.target.vr for rule in rules}
    ds = Dataset()
    for keyword, found in values.items():
        *sequence, name = keyword.split(".")
        target = ds
        if sequence:
            if sequence[0] not in ds:
                setattr(ds, sequence[0], [Dataset()])
            target = getattr(ds, sequence[0])[0]
        tag = tag_for_keyword(name)
        target.add(DataElement(tag, vrs[keyword], found[0] if len(found) == 1 else found))
    return dataset_json(ds)


def _timestamp(text: str, location: str, keyword: str) -> re.Match[str]:
    match = _TS.match(text.strip())
    if match is None:
        raise InvalidOrder(f"{location} {keyword} {text!r} is not an HL7 date/time",
                           location=location, attribute=keyword, code=DATA_TYPE_ERROR)
    return match


def _lookup(rule: Rule, text: str, location: str) -> str:
    if rule.table is None:
        return text
    value = rule.table.get(text.strip())
    if value is None:
        if rule.default is not None:
            return rule.default
        keyword = rule.keyword.rsplit(".", 1)[-1]
        raise InvalidOrder(f"{location} {keyword}: {text!r} is not in the mapping's table",
                           location=location, attribute=rule.keyword,
                           code=TABLE_VALUE_NOT_FOUND)
    return str(value)


def _convert(rule: Rule, text: str, location: str) -> Any:
    keyword = rule.keyword.rsplit(".", 1)[-1]
    vr = rule.target.vr
    text = _lookup(rule, text, location)
    for name in rule.transforms:
        text = _TRANSFORMS[name](text)
    # Every attribute the broker stores is single-line; a \.br\ from the RIS becomes a space.
    text = " ".join(text.split()) if vr != "PN" else text.strip()
    try:
        if rule.date_format is not None:
            parsed = dt.datetime.strptime(text, rule.date_format)
            return parsed.date() if vr == "DA" else parsed.time()
        if vr == "DA":
            match = _timestamp(text, location, keyword)
            return dt.date(int(match[1]), int(match[2] or 1), int(match[3] or 1))
        if vr == "TM":
            match = _timestamp(text, location, keyword)
            return dt.time(int(match[4] or 0), int(match[5] or 0), int(match[6] or 0))
    except ValueError:
        raise InvalidOrder(f"{location} {keyword} {text!r} is not a valid date/time",
                           location=location, attribute=rule.keyword,
                           code=DATA_TYPE_ERROR) from None
    if vr == "CS" and keyword == "PatientSex":
        return _SEX.get(text.upper(), "O")
    if vr == "CS":
        text = text.upper()
    if vr == "UI" and not _UID.match(text):
        raise InvalidOrder(f"{location} {keyword} {text!r} is not a DICOM UID",
                           location=location, attribute=rule.keyword, code=DATA_TYPE_ERROR)
    limit = _MAX_LENGTH.get(vr)
    if rule.truncate and limit is not None:
        text = text[:limit]
    if vr == "PN":
        if rule.truncate:
            text = "=".join(group[:64] for group in text.split("="))
        if any(len(group) > 64 for group in text.split("=")):
            raise InvalidOrder(f"{location} {keyword} is longer than 64 characters",
                               location=location, attribute=rule.keyword, code=DATA_TYPE_ERROR)
        return text
    if limit is not None and len(text) > limit:
        raise InvalidOrder(f"{location} {keyword} {text!r} is longer than {limit} characters "
                           f"({vr})", location=location, attribute=rule.keyword,
                           code=DATA_TYPE_ERROR)
    return text


def load_mapping(path: Path) -> Mapping:
    """Read and validate a mapping file; errors name the file, the line and the key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"mapping: cannot read {path}: {exc.strerror}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict) or not isinstance(data.get("attributes"), dict):
        raise ConfigError(f"{path}: expected a top-level 'attributes:' mapping")
    unknown = set(data) - {"attributes", "message_types", "tables"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    tables = data.get("tables") or {}
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: tables: each table is a mapping of value: replacement")
    tables = {str(name): {str(k): str(v) for k, v in table.items()}
              for name, table in tables.items()}
    rules = _read_rules(path, data["attributes"], _key_lines(node, ("attributes",)), tables)
    keywords = {rule.keyword for rule in rules}
    for needed in ("PatientID", "AccessionNumber"):
        if needed not in keywords:
            raise ConfigError(f"{path}: attributes: {needed} must be mapped")
    overrides: dict[str, tuple[Rule, ...]] = {}
    for message_type, specs in (data.get("message_types") or {}).items():
        if not re.fullmatch(r"[A-Z0-9]{3}\^[A-Z0-9]{3}", str(message_type)):
            raise ConfigError(f"{path}: message_types: {message_type!r} is not a message type "
                              "like OMI^O23")
        if not isinstance(specs, dict):
            raise ConfigError(f"{path}: message_types: {message_type}: expected attributes")
        lines = _key_lines(node, ("message_types", str(message_type)))
        overrides[str(message_type)] = tuple(_read_rules(path, specs, lines, tables))
    return Mapping(tuple(rules), source=Path(path), overrides=overrides)


def _read_rules(path: Path, specs: dict[Any, Any], lines: dict[str, int],
                tables: dict[str, dict[str, str]]) -> list[Rule]:
    return [_read_rule(str(keyword), spec, f"{path}:{lines.get(str(keyword), '?')}", tables)
            for keyword, spec in specs.items()]


def _key_lines(node: yaml.Node | None, path: tuple[str, ...]) -> dict[str, int]:
    """Line numbers of the keys under ``path`` (e.g. ('attributes',)), for error messages."""
    for name in path:
        if not isinstance(node, yaml.MappingNode):
            return {}
        node = next((value for key, value in node.value if key.value == name), None)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value}
