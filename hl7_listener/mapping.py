"""Which HL7 field feeds which worklist attribute: data in ``mapping.yaml``, not code.

The YAML language (documented in ``config/mapping.yaml``)::

    order_control:                 # where NW / XO / CA comes from, and what each code means
      from: ORC-1
      codes: {NW: NW, XO: XO, CA: CA}
    attributes:
      <DICOM keyword path>: <path> | [<path>, ...] | {from: <path or list>, as: <type>,
                                                      default: <text>, required: <bool>,
                                                      truncate: <bool>}

A path is ``SEG-field[.component[.subcomponent]]`` (first occurrence of the segment, first
repetition of the field); a list means "the first one that has a value". Types: ``text``,
``person_name`` (HL7 XPN -> DICOM PN), ``xcn_name`` (HL7 XCN, ID first -> DICOM PN), ``date``,
``datetime``, ``time``, ``uid``. The keyword paths accepted are exactly the attributes the core
stores: see ``ATTRIBUTES``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.errors import ConfigError, InvalidOrder, UnsupportedMessage
from broker.models import Patient, WorklistItem
from hl7_listener.message import FieldPath, ParsedMessage, parse_path

Kind = Literal["text", "date", "datetime", "time"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a DICOM attribute lands in the core's Order."""

    section: Literal["patient", "procedure"]
    field: str
    kind: Kind = "text"
    default_as: str = "text"

    @property
    def max_length(self) -> int | None:
        # The store's column sizes (DICOM VR lengths, PN wider) are the hard limit: PostgreSQL
        # refuses a longer value, which would otherwise surface as a database error.
        if self.kind != "text":
            return None
        model = Patient if self.section == "patient" else WorklistItem
        return getattr(model.__table__.c[self.field].type, "length", None)


_SPS = "ScheduledProcedureStepSequence."
_RPC = "RequestedProcedureCodeSequence."

# DICOM keyword path -> domain field. Exactly what broker.domain.Order carries.
ATTRIBUTES: dict[str, Target] = {
    "PatientID": Target("patient", "patient_id"),
    "IssuerOfPatientID": Target("patient", "issuer_of_patient_id"),
    "PatientName": Target("patient", "patient_name", default_as="person_name"),
    "PatientBirthDate": Target("patient", "birth_date", "date", "date"),
    "PatientSex": Target("patient", "sex"),
    "AccessionNumber": Target("procedure", "accession_number"),
    "StudyInstanceUID": Target("procedure", "study_instance_uid", default_as="uid"),
    "RequestedProcedureID": Target("procedure", "requested_procedure_id"),
    "RequestedProcedureDescription": Target("procedure", "requested_procedure_description"),
    f"{_RPC}CodeValue": Target("procedure", "requested_procedure_code_value"),
    f"{_RPC}CodingSchemeDesignator": Target("procedure", "requested_procedure_code_scheme"),
    f"{_RPC}CodeMeaning": Target("procedure", "requested_procedure_code_meaning"),
    f"{_SPS}ScheduledProcedureStepID": Target("procedure", "sps_id"),
    f"{_SPS}ScheduledProcedureStepDescription": Target("procedure", "sps_description"),
    f"{_SPS}Modality": Target("procedure", "modality"),
    f"{_SPS}ScheduledStationAETitle": Target("procedure", "scheduled_station_ae_title"),
    # One domain value (scheduled_start) fed by the date key, which takes a whole HL7 TS (date
    # and time), and optionally a time key for RIS that send the time in a field of its own.
    f"{_SPS}ScheduledProcedureStepStartDate": Target("procedure", "scheduled_start", "datetime",
                                                     "datetime"),
    f"{_SPS}ScheduledProcedureStepStartTime": Target("procedure", "scheduled_start", "time",
                                                     "time"),
    "ReferringPhysicianName": Target("procedure", "referring_physician_name",
                                     default_as="xcn_name"),
    "RequestingPhysician": Target("procedure", "requesting_physician", default_as="xcn_name"),
    "PlacerOrderNumberImagingServiceRequest": Target("procedure", "placer_order_number"),
    "FillerOrderNumberImagingServiceRequest": Target("procedure", "filler_order_number"),
}

# The worklist keys on these; apply_order refuses an order without them.
ALWAYS_REQUIRED = ("PatientID", "AccessionNumber")

# `as` type -> the kinds of target it can feed.
TYPES: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "person_name": frozenset({"text"}),
    "xcn_name": frozenset({"text"}),
    "uid": frozenset({"text"}),
    "date": frozenset({"date", "datetime"}),
    "datetime": frozenset({"date", "datetime"}),
    "time": frozenset({"time"}),
}

_RULE_KEYS = frozenset({"from", "as", "default", "required", "truncate"})
_TOP_KEYS = frozenset({"order_control", "attributes"})
_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?"
                 r"(?:[+-]\d{4})?")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.\d{1,4})?(?:[+-]\d{4})?")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_CONTROL_ID = 64  # worklist_item.last_message_control_id


class ValueProblem(ValueError):
    """A value that cannot become its attribute; the caller adds where it came from."""

    def __init__(self, reason: str, code: str = "102") -> None:
        super().__init__(reason)
        self.code = code


def _ts_parts(value: str) -> tuple[int, ...]:
    # TS = YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]; v2.3-2.4 may add ^precision (and
    # in OBR-27.4 the TS is a component, so the precision arrives as a subcomponent).
    text = re.split(r"[&^]", value.strip(), maxsplit=1)[0]
    match = _TS.fullmatch(text)
    if match is None:
        raise ValueProblem("is not an HL7 date/time (YYYYMMDD[HHMM[SS]])")
    return tuple(int(g) for g in match.groups() if g is not None)


def _to_date(value: str) -> dt.date:
    parts = _ts_parts(value)
    if len(parts) < 3:
        raise ValueProblem("is not a full date (YYYYMMDD)")
    try:
        return dt.date(*parts[:3])
    except ValueError:
        raise ValueProblem("is not a valid date") from None


def _to_datetime(value: str) -> dt.datetime:
    parts = _ts_parts(value)
    if len(parts) < 3:
        raise ValueProblem("is not a full date (YYYYMMDD)")
    if len(parts) == 4:
        raise ValueProblem("has an hour without minutes (expected YYYYMMDDHHMM[SS])")
    try:
        # Local time as the RIS sent it; a UTC offset, if any, is dropped (DICOM DA/TM are
        # local too, and modalities match on them as such).
        return dt.datetime(*parts[:6])
    except ValueError:
        raise ValueProblem("is not a valid date/time") from None


def _to_time(value: str) -> dt.time:
    text = re.split(r"[&^]", value.strip(), maxsplit=1)[0]
    match = _TM.fullmatch(text)
    if match is None:
        raise ValueProblem("is not an HL7 time (HHMM[SS])")
    parts = [int(g) for g in match.groups() if g is not None]
    if len(parts) < 2:
        raise ValueProblem("is not a time with minutes (HHMM[SS])")
    try:
        return dt.time(*parts)
    except ValueError:
        raise ValueProblem("is not a valid time") from None


def _single_line(value: str) -> str:
    # DICOM SH/LO/PN/CS/UI forbid control characters (PS3.5 6.2); \.br\ becomes a space.
    return _CONTROL_CHARS.sub(" ", value).strip() if value else value


def _pn(components: list[str]) -> str:
    # Family names may carry subcomponents (FN: surname&own surname prefix&...): keep the
    # surname. DICOM PN drops trailing empty components.
    parts = [_single_line(c.split("&", 1)[0]) for c in components]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def _person_name(value: str) -> str:
    # XPN: family ^ given ^ middle ^ suffix ^ prefix ^ degree
    # PN:  family ^ given ^ middle ^ prefix ^ suffix
    c = [*value.split("^"), "", "", "", "", ""]
    return _pn([c[0], c[1], c[2], c[4], c[3]])


def _xcn_name(value: str) -> str:
    # XCN: ID ^ family ^ given ^ middle ^ suffix ^ prefix ^ degree ...
    c = [*value.split("^"), "", "", "", "", "", ""]
    return _pn([c[1], c[2], c[3], c[5], c[4]])


def _uid(value: str) -> str:
    value = value.strip()
    if len(value) > 64 or _UID.fullmatch(value) is None:
        raise ValueProblem("is not a valid DICOM UID (digits and dots, at most 64 characters, "
                           "no leading zeros)")
    return value


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "text": _single_line,
    "person_name": _person_name,
    "xcn_name": _xcn_name,
    "uid": _uid,
    "date": _to_date,
    "datetime": _to_datetime,
    "time": _to_time,
}


def _fit(value: Any, kind: Kind) -> Any:
    """A date where the target wants one, a datetime (midnight) where it wants that."""
    if kind == "date" and isinstance(value, dt.datetime):
        return value.date()
    if kind == "datetime" and isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return dt.datetime.combine(value, dt.time())
    return value


@dataclass(frozen=True, slots=True)
class Rule:
    """One attribute's recipe, compiled from the YAML."""

    keyword: str
    target: Target
    sources: tuple[FieldPath, ...]
    as_type: str
    default: Any = None
    required: bool = False
    truncate: bool = False

    @property
    def location(self) -> str | None:
        return str(self.sources[0]) if self.sources else None

    @property
    def label(self) -> str:
        where = " or ".join(str(s) for s in self.sources)
        name = self.keyword.rsplit(".", 1)[-1]
        return f"{where} {name}" if where else name

    def _fail(self, reason: str, code: str, source: FieldPath | None = None) -> InvalidOrder:
        # A bad value names the field it came from; a missing one names every candidate.
        label = f"{source} {self.keyword.rsplit('.', 1)[-1]}" if source else self.label
        return InvalidOrder(f"{label} {reason}", location=str(source) if source
                            else self.location, attribute=self.keyword, code=code)

    def value(self, msg: ParsedMessage) -> Any:
        raw: str | None = None
        used: FieldPath | None = None
        for source in self.sources:
            found = msg.get(source)
            if found:
                raw, used = found, source
                break
            if found == "" and raw is None:
                raw, used = "", source  # the HL7 null "": the RIS deletes the value
        if raw is None or (raw == "" and self.target.kind != "text"):
            if self.required and self.default is None:
                raise self._fail("is required", "101")
            return self.default
        try:
            value = _CONVERTERS[self.as_type](raw)
        except ValueProblem as exc:
            raise self._fail(str(exc), exc.code, used) from None
        if isinstance(value, str):
            if not value and self.required:
                raise self._fail("is required", "101")
            limit = self.target.max_length
            if limit is not None and len(value) > limit:
                if not self.truncate:
                    raise self._fail(f"is longer than {limit} characters", "102", used)
                value = value[:limit]
        return _fit(value, self.target.kind)


@dataclass(frozen=True, slots=True)
class OrderControlRule:
    source: FieldPath
    codes: dict[str, OrderControl]

    def value(self, msg: ParsedMessage) -> OrderControl:
        code = (msg.get(self.source) or "").strip().upper()
        if not code:
            raise InvalidOrder(f"{self.source} order control is required",
                               location=str(self.source), attribute="OrderControl", code="101")
        control = self.codes.get(code)
        if control is None:
            taken = ", ".join(sorted(self.codes))
            raise UnsupportedMessage(f"{self.source} order control {code!r} is not supported "
                                     f"(supported: {taken})", location=str(self.source),
                                     code="103")
        return control


@dataclass(frozen=True)
class Mapping:
    """A validated mapping; :meth:`to_order` turns a parsed ORM into the core's Order."""

    source: Path
    order_control: OrderControlRule
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        index: dict[str, str | None] = {}
        for rule in self.rules:
            index[rule.keyword] = rule.location
            index.setdefault(rule.keyword.rsplit(".", 1)[-1], rule.location)
        object.__setattr__(self, "_locations", index)

    def location_of(self, attribute: str | None) -> str | None:
        """The HL7 field feeding a DICOM attribute (keyword or keyword path), e.g. ``OBR-18``
        for ``AccessionNumber``; None when unmapped or fed by a constant."""
        if not attribute:
            return None
        locations: dict[str, str | None] = self._locations  # type: ignore[attr-defined]
        return locations.get(attribute)

    def to_order(self, msg: ParsedMessage) -> Order:
        orders = len(msg.segments("ORC"))
        if orders > 1:
            raise UnsupportedMessage(f"the message carries {orders} orders (ORC segments); the "
                                     "broker takes one order per message", location="ORC",
                                     code="200")
        control = self.order_control.value(msg)
        values: dict[str, dict[str, Any]] = {"patient": {}, "procedure": {}}
        start_time: dt.time | None = None
        for rule in self.rules:
            value = rule.value(msg)
            if value is None:
                continue
            target = rule.target
            if target.kind == "time":
                start_time = value
            else:
                values[target.section][target.field] = value
        start = values["procedure"].get("scheduled_start")
        if start_time is not None and start is not None:
            values["procedure"]["scheduled_start"] = dt.datetime.combine(start.date(),
                                                                         start_time)
        values["patient"].setdefault("patient_id", "")
        values["procedure"].setdefault("accession_number", "")
        return Order(control=control, patient=PatientData(**values["patient"]),
                     procedure=ProcedureData(**values["procedure"]),
                     message_control_id=msg.control_id[:_MAX_CONTROL_ID])


# ---------------------------------------------------------------------------- loading


class _Source:
    """The YAML file with line numbers, so that every error can say where."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def error(self, key: str, reason: str, node: yaml.Node | None = None) -> ConfigError:
        where = f"{self.path}:{node.start_mark.line + 1}" if node is not None else str(self.path)
        return ConfigError(f"{where}: {key}: {reason}")


def _pairs(node: yaml.Node, src: _Source, key: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise src.error(key, "must be a mapping of keys to values", node)
    seen: set[str] = set()
    out = []
    for k, v in node.value:
        name = k.value if isinstance(k, yaml.ScalarNode) else None
        if not isinstance(name, str):
            raise src.error(key, "keys must be plain names", k)
        if name in seen:
            raise src.error(f"{key}.{name}" if key else name, "is given twice", k)
        seen.add(name)
        out.append((name, k, v))
    return out


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _paths(node: yaml.Node, src: _Source, key: str) -> tuple[FieldPath, ...]:
    items: list[yaml.Node]
    if isinstance(node, yaml.SequenceNode):
        items = list(node.value)
        if not items:
            raise src.error(key, "'from' lists no field path", node)
    else:
        items = [node]
    paths = []
    for item in items:
        text = item.value if isinstance(item, yaml.ScalarNode) else None
        try:
            if not isinstance(text, str):
                raise ValueError("a field path must be text like OBR-18")
            paths.append(parse_path(text))
        except ValueError as exc:
            raise src.error(key, str(exc), item) from None
    return tuple(paths)


def _bool(node: yaml.Node, src: _Source, key: str) -> bool:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, bool):
        raise src.error(key, "must be true or false", node)
    return value


def _rule(keyword: str, key_node: yaml.Node, node: yaml.Node, src: _Source) -> Rule | None:
    key = f"attributes.{keyword}"
    target = ATTRIBUTES.get(keyword)
    if target is None:
        raise src.error(key, "unknown attribute; the broker stores: "
                        + ", ".join(ATTRIBUTES), key_node)
    spec: dict[str, yaml.Node] = {}
    if isinstance(node, yaml.ScalarNode) and _scalar(node) is None:
        return None  # "Keyword: null" or "Keyword:" leaves the attribute unmapped
    if isinstance(node, (yaml.ScalarNode, yaml.SequenceNode)):
        spec["from"] = node
    else:
        for name, k, v in _pairs(node, src, key):
            if name not in _RULE_KEYS:
                raise src.error(f"{key}.{name}", "unknown option; options are "
                                + ", ".join(sorted(_RULE_KEYS)), k)
            spec[name] = v
    sources = _paths(spec["from"], src, f"{key}.from") if "from" in spec else ()
    as_type = target.default_as
    if "as" in spec:
        as_type = _scalar(spec["as"]) if isinstance(spec["as"], yaml.ScalarNode) else None
        if as_type not in TYPES:
            raise src.error(f"{key}.as", f"unknown type {as_type!r}; types are "
                            + ", ".join(TYPES), spec["as"])
        if target.kind not in TYPES[as_type]:
            raise src.error(f"{key}.as", f"{as_type} cannot feed {keyword} (a {target.kind} "
                            "value)", spec["as"])
    default = None
    if "default" in spec:
        raw = _scalar(spec["default"]) if isinstance(spec["default"], yaml.ScalarNode) else None
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise src.error(f"{key}.default", "must be a text value", spec["default"])
        try:
            default = _CONVERTERS[as_type](str(raw))
        except ValueProblem as exc:
            raise src.error(f"{key}.default", f"{raw!r} {exc}", spec["default"]) from None
        default = _fit(default, target.kind)
    required = _bool(spec["required"], src, f"{key}.required") if "required" in spec else False
    truncate = _bool(spec["truncate"], src, f"{key}.truncate") if "truncate" in spec else False
    if not sources and default is None:
        raise src.error(key, "needs 'from' (field paths) or a 'default'", node)
    if keyword in ALWAYS_REQUIRED:
        required = True
    return Rule(keyword, target, sources, as_type, default, required, truncate)


def _order_control(node: yaml.Node, src: _Source) -> OrderControlRule:
    key = "order_control"
    spec = {"from": node} if isinstance(node, yaml.ScalarNode) else None
    if spec is None:
        spec = {}
        for name, k, v in _pairs(node, src, key):
            if name not in ("from", "codes"):
                raise src.error(f"{key}.{name}", "unknown option; options are from, codes", k)
            spec[name] = v
    if "from" not in spec:
        raise src.error(key, "needs 'from' (the field holding NW/XO/CA)", node)
    paths = _paths(spec["from"], src, f"{key}.from")
    if len(paths) != 1:
        raise src.error(f"{key}.from", "takes exactly one field path", spec["from"])
    codes = {c.value: c for c in OrderControl}
    if "codes" in spec:
        codes = {}
        for name, _k, v in _pairs(spec["codes"], src, f"{key}.codes"):
            action = _scalar(v) if isinstance(v, yaml.ScalarNode) else None
            try:
                codes[name.strip().upper()] = OrderControl(action)
            except ValueError:
                raise src.error(f"{key}.codes.{name}", "must be NW (new), XO (change) or CA "
                                "(cancel)", v) from None
    return OrderControlRule(paths[0], codes)


def load_mapping(path: Path) -> Mapping:
    """Read and validate a mapping file; ConfigError names the file, line, key and reason."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read mapping file {path}: {exc}") from None
    src = _Source(path, text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if root is None:
        raise ConfigError(f"{path}: the mapping file is empty")
    top = {name: (k, v) for name, k, v in _pairs(root, src, "")}
    for name, (k, _v) in top.items():
        if name not in _TOP_KEYS:
            raise src.error(name, "unknown key; the top level has order_control and attributes",
                            k)
    if "attributes" not in top:
        raise src.error("attributes", "is missing", root)
    control_node = top.get("order_control")
    order_control = (_order_control(control_node[1], src) if control_node is not None
                     else OrderControlRule(parse_path("ORC-1"),
                                           {c.value: c for c in OrderControl}))
    rules = []
    for keyword, k, v in _pairs(top["attributes"][1], src, "attributes"):
        rule = _rule(keyword, k, v, src)
        if rule is not None:
            rules.append(rule)
    mapped = {r.keyword for r in rules}
    for keyword in ALWAYS_REQUIRED:
        if keyword not in mapped:
            raise src.error(f"attributes.{keyword}", "must be mapped: the worklist keys on it",
                            top["attributes"][1])
    if f"{_SPS}ScheduledProcedureStepStartTime" in mapped and \
            f"{_SPS}ScheduledProcedureStepStartDate" not in mapped:
        raise src.error(f"attributes.{_SPS}ScheduledProcedureStepStartTime",
                        "needs ScheduledProcedureStepStartDate mapped too",
                        top["attributes"][1])
    return Mapping(path, order_control, tuple(rules))

