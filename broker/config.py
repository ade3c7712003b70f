"""The broker's configuration: a typed tree validated once at start-up.

Sources, later winning: the YAML file, then environment variables named ``WLB_`` + the key
path in upper case joined by ``_`` (``dicom.port`` -> ``WLB_DICOM_PORT``,
``jobs.outbound_interval_seconds`` -> ``WLB_JOBS_OUTBOUND_INTERVAL_SECONDS``,
``mapping`` -> ``WLB_MAPPING``). Environment values are read as YAML scalars, so ``5243``
is a number and ``true`` a boolean. Relative paths (the SQLite file, the mapping) resolve
against the folder of the config file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.domain import StatusReporting
    from broker.purge import Retention

ENV_PREFIX = "WLB_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Section):
    url: str = "sqlite:///data/worklist.db"
    pool_size: int = Field(20, ge=1, le=500)


class ModalityConfig(_Section):
    """What one calling AE title (one modality) sees of the worklist."""

    # Only items scheduled on this station (ScheduledStationAETitle = the calling AE title)...
    only_own_items: bool = False
    # ...or, for items the RIS sent without a station, of this modality.
    modality: str | None = Field(None, min_length=1, max_length=16)
    # Specific Character Set of this modality's responses (default: ISO_IR 192, UTF-8);
    # checked against the sets the DICOM edge knows when it starts.
    character_set: str | None = None


def _ae_title(value: str) -> str:
    if value != value.strip() or "\\" in value:
        raise ValueError("an AE title has no leading/trailing spaces or backslashes")
    return value


# OpenSSL cipher string for TLS 1.2 after BCP 195 (RFC 9325 4.2) and the DICOM "BCP 195
# Non-Downgrading" TLS profile (PS3.15 B.11): forward secrecy and AEAD only. TLS 1.3 suites
# are all AEAD with forward secrecy and stay OpenSSL's defaults.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"

TlsVersion = Literal["TLSv1.2", "TLSv1.3"]


class TlsListenerConfig(_Section):
    """TLS on a listener: a port of its own beside the plain one (or instead of it).

    Relative file paths resolve against the config file's folder.
    """

    # The TLS port (None: no TLS listener).
    port: int | None = Field(None, ge=0, le=65535)
    # False: only the TLS port listens (the plain port is not opened).
    plain_port: bool = True
    certificate: Path | None = None  # PEM, the server's certificate (then its chain)
    private_key: Path | None = None  # PEM, unencrypted (protect it by file permissions)
    # PEM bundle of the CAs client certificates must chain to (None: not asked for).
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    min_version: TlsVersion = "TLSv1.2"
    ciphers: str = Field(BCP195_CIPHERS, min_length=1)
    # A client must finish its handshake within this time (a silent one holds no thread).
    handshake_timeout_seconds: float = Field(10, gt=0, le=300)

    @property
    def enabled(self) -> bool:
        return self.port is not None

    @model_validator(mode="after")
    def _complete(self) -> TlsListenerConfig:
        if self.port is not None and (self.certificate is None or self.private_key is None):
            raise ValueError("a TLS port needs certificate and private_key")
        if not self.plain_port and self.port is None:
            raise ValueError("plain_port: false needs a TLS port")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA client "
                             "certificates must chain to)")
        return self


class DicomTlsConfig(TlsListenerConfig):
    # Calling AE title -> the client certificate subjects allowed to use it: a common name
    # ("ct1.example.org") or a whole subject ("CN=ct1.example.org,O=Hospital"). A listed AE
    # title is accepted only over TLS with one of its certificates; others are not checked.
    allowed_subjects: dict[str, list[str]] = Field(default_factory=dict)


class TlsClientConfig(_Section):
    """TLS on an outbound link: the peer's certificate is always verified."""

    enabled: bool = False
    # PEM bundle of the CAs the peer's certificate must chain to (None: the system's).
    ca_certificates: Path | None = None
    # A client certificate and key, for a peer that asks for one.
    certificate: Path | None = None
    private_key: Path | None = None
    # The name the peer's certificate must carry (None: the configured host when it is a
    # host name; for an IP address only the chain is checked).
    server_name: str | None = None
    min_version: TlsVersion = "TLSv1.2"
    ciphers: str = Field(BCP195_CIPHERS, min_length=1)

    @model_validator(mode="after")
    def _pair(self) -> TlsClientConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("a client certificate needs both certificate and private_key")
        return self


class MppsDestination(_Section):
    """A downstream MPPS SCP (a PACS, a RIS) that receives a copy of every accepted MPPS."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: TlsClientConfig = Field(default_factory=TlsClientConfig)

    _check_ae_title = field_validator("ae_title")(_ae_title)

    @property
    def key(self) -> str:
        """How the forward queue names this destination (``AE@host:port``)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


WorklistStatus = Literal["SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED", "CANCELLED",
                         "HELD"]


class DicomConfig(_Section):
    ae_title: str = Field("WORKLISTS", min_length=1, max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(5243, ge=0, le=65535)
    max_associations: int = Field(64, ge=1, le=1000)
    network_timeout_seconds: float = Field(60, gt=0)
    # Calling AE titles allowed to associate; an empty list accepts any modality.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    max_matches: int = Field(1000, ge=1)
    visible_statuses: list[WorklistStatus] = Field(
        default_factory=lambda: ["SCHEDULED", "IN PROGRESS"], min_length=1)
    modalities: dict[str, ModalityConfig] = Field(default_factory=dict)
    # A character a modality's character set cannot hold: "transliterate" (drop accents,
    # then "?") or "replace" (always "?").
    unencodable: Literal["transliterate", "replace"] = "transliterate"
    # A query with no date and no identifying key gets today +/- this many days (None: off).
    universal_query_days: int | None = Field(None, ge=0, le=3650)
    # Downstream MPPS SCPs that get every accepted N-CREATE / N-SET, through a durable queue.
    mpps_forward: list[MppsDestination] = Field(default_factory=list)
    mpps_forward_timeout_seconds: float = Field(30, gt=0)
    # As RisConfig: backoff doubled from the initial wait up to the cap; failure statuses
    # tolerated before a forward is dead-lettered (an unreachable peer only delays).
    mpps_forward_retry_initial_seconds: float = Field(5, gt=0)
    mpps_forward_retry_max_seconds: float = Field(600, gt=0)
    mpps_forward_max_attempts: int = Field(10, ge=1)

    @field_validator("mpps_forward")
    @classmethod
    def _distinct_destinations(cls, value: list[MppsDestination]) -> list[MppsDestination]:
        keys = [destination.key for destination in value]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"destination listed twice: {', '.join(repeated)}")
        return value

    # Record which calling AE was given which item, and each calling AE's last few distinct
    # C-FIND identifiers (order timeline, "why is it not on the worklist?"). Buffered in
    # memory and written every record_flush_seconds, off the C-FIND path.
    record_cfind: bool = True
    record_flush_seconds: float = Field(5, gt=0, le=3600)
    recent_queries_per_ae: int = Field(5, ge=1, le=100)

    # Person name keys (Patient's Name, physicians) match case-sensitively: PS3.4 C.2.2.2.1
    # leaves PN case to the SCP, and modalities type names in any case, so off by default.
    names_case_sensitive: bool = False
    # TLS port (2762 is DICOM's registered one) beside or instead of the plain one.
    tls: DicomTlsConfig = Field(default_factory=DicomTlsConfig)

    @field_validator("ae_title")
    @classmethod
    def _ae_title_chars(cls, value: str) -> str:
        if value != value.strip() or "\\" in value:
            raise ValueError("an AE title has no leading/trailing spaces or backslashes")
        return value


class Hl7Config(_Section):
    host: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535)
    max_connections: int = Field(128, ge=1)
    max_waiting_connections: int = Field(256, ge=0)
    connection_wait_seconds: float = Field(60, gt=0)
    idle_timeout_seconds: float = Field(300, gt=0)
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    # MSH-3 / MSH-4 of the broker's own messages (ACKs and status messages).
    sending_application: str = "WORKLIST_BROKER"
    sending_facility: str = ""
    # A NW for an accession the broker already holds: "update" it, or "reject" it (AE).
    existing_order: Literal["update", "reject"] = "update"
    # Codec for bytes that do not fit the declared MSH-18 (empty: refuse them with AE).
    charset_fallback: str = ""
    # A frame, once started, must be complete within this time (a trickling sender).
    frame_timeout_seconds: float = Field(30, gt=0)
    # Connections (served and waiting) from one address; past it one is closed at once, so
    # one misbehaving client cannot take every slot from the RIS. 0: no limit.
    max_connections_per_source: int = Field(32, ge=0)
    # Addresses or networks exempt from that limit (e.g. the RIS's interface engine).
    unlimited_sources: list[str] = Field(default_factory=list)
    tls: TlsListenerConfig = Field(default_factory=TlsListenerConfig)

    @field_validator("unlimited_sources")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"not an address or network: {entry!r}") from None
        return value

    @field_validator("charset_fallback")
    @classmethod
    def _codec(cls, value: str) -> str:
        if value:
            import codecs

            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown character set {value!r} (e.g. cp1252, latin-1)"
                                 ) from None
        return value


StatusMessageType = Literal["ORM^O01", "ORU^R01", "OMI^O23"]


class StatusEventConfig(_Section):
    """One kind of status event: sent or not, as which message type and HL7 version."""

    send: bool = True
    message_type: StatusMessageType = "ORM^O01"
    version: str | None = None  # MSH-12; None: ris.hl7_version


def _event(send: bool = True) -> Any:
    return Field(default_factory=lambda: StatusEventConfig(send=send))


class StatusMessagesConfig(_Section):
    in_progress: StatusEventConfig = _event()
    completed: StatusEventConfig = _event()
    discontinued: StatusEventConfig = _event()
    # Status changes made by order messages (NW -> SC, CA, DC, HD, RL): off by default, as
    # the RIS made them itself.
    order_status: StatusEventConfig = _event(send=False)
    # A stable study in the PACS (orthanc.*) matched an order: "the images are there".
    study_received: StatusEventConfig = _event(send=False)
    # Report an MPPS that matches no scheduled item (unscheduled or emergency procedure).
    unscheduled: bool = False
    # Per message type, field path -> template with {placeholders}, over the defaults.
    field_templates: dict[StatusMessageType, dict[str, str]] = Field(default_factory=dict)

    @field_validator("in_progress", "completed", "discontinued", "order_status",
                     "study_received", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # "completed: false" is short for "completed: {send: false}".
        return {"send": value} if isinstance(value, bool) else value

    @field_validator("field_templates")
    @classmethod
    def _templates(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        from broker.status_templates import check_template

        for message_type, templates in value.items():
            for path, template in templates.items():
                problem = check_template(path, template)
                if problem:
                    raise ValueError(f"{message_type} {path}: {problem}")
        return value

    def reporting(self) -> StatusReporting:
        from broker.domain import StatusKind, StatusReporting

        kinds = frozenset(kind for kind in StatusKind if getattr(self, kind.value).send)
        return StatusReporting(kinds=kinds, unscheduled=self.unscheduled)


class RisConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(2576, ge=1, le=65535)
    connect_timeout_seconds: float = Field(5, gt=0)
    ack_timeout_seconds: float = Field(30, gt=0)
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    hl7_version: str = "2.3.1"
    # Backoff after a failed delivery: first wait, doubled each time up to the cap.
    retry_initial_seconds: float = Field(5, gt=0)
    retry_max_seconds: float = Field(600, gt=0)
    # Negative ACKs (AE/CE) tolerated before a message is dead-lettered. An unreachable RIS
    # never dead-letters: it only delays, however long it is down.
    max_attempts: int = Field(10, ge=1)
    status_messages: StatusMessagesConfig = Field(default_factory=StatusMessagesConfig)
    tls: TlsClientConfig = Field(default_factory=TlsClientConfig)


class JobsConfig(_Section):
    outbound_interval_seconds: float = Field(5, gt=0)
    purge_cron: str = "0 3 * * *"
    retention_days: int = Field(30, ge=1)
    # Finer retention; each unset one falls back to retention_days.
    completed_retention_days: int | None = Field(None, ge=1)
    cancelled_retention_days: int | None = Field(None, ge=1)
    unperformed_retention_days: int | None = Field(None, ge=1)
    mpps_retention_days: int | None = Field(None, ge=1)
    outbox_retention_days: int | None = Field(None, ge=1)
    inbound_log_retention_days: int | None = Field(None, ge=1)
    outbound_batch_size: int = Field(100, ge=1)
    mapping_check_seconds: float = Field(5, gt=0)

    def retention(self) -> Retention:
        from broker.purge import Retention

        days = self.retention_days
        return Retention(
            completed_days=self.completed_retention_days or days,
            cancelled_days=self.cancelled_retention_days or days,
            unperformed_days=self.unperformed_retention_days or days,
            mpps_days=self.mpps_retention_days or days,
            outbox_days=self.outbox_retention_days or days,
            inbound_log_days=self.inbound_log_retention_days or days,
        )

    def retention_with(self, audit: AuditConfig) -> Retention:
        """The retention rules, the audit trail's own included."""
        from dataclasses import replace

        return replace(self.retention(), audit_days=audit.retention_days)

    @field_validator("purge_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression: {exc}") from None
        return value


class OrthancConfig(_Section):
    """The link to an Orthanc PACS: its change feed completes orders when their study arrives
    (broker/orthanc), and its orthanc.json can supply the DICOM AE title and port."""

    # Orthanc's REST API, e.g. http://127.0.0.1:8042; None (the default): no link, unless
    # config_file supplies HttpPort.
    url: str | None = Field(None, pattern=r"^https?://[^/\s]+(/.*)?$")
    username: str | None = None
    password: str | None = None
    # Seconds between reads of the change feed; after a failure the wait doubles up to 30 s.
    poll_seconds: float = Field(5, gt=0, le=300)
    timeout_seconds: float = Field(10, gt=0, le=300)
    # What a stable study does to the items it matches: complete (COMPLETED + the RIS gets
    # the MPPS completion message), hide (leaves the worklist silently), none (recorded only).
    on_study: Literal["complete", "hide", "none"] = "complete"
    # A first follow starts at the feed's end (what Orthanc holds is history); true replays
    # the whole feed.
    from_start: bool = False
    # orthanc.json (or Orthanc's configuration folder): MPPSAet / DicomPortMPPS give
    # dicom.ae_title / dicom.port, HttpPort / RegisteredUsers the REST link, unless set here.
    config_file: Path | None = None

    @field_validator("url", "username", "password", "config_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # WLB_ORTHANC_URL= (empty) switches the link off as an empty YAML value does.
        return None if value == "" else value


WebRole = Literal["viewer", "operator", "admin"]


class WebUser(_Section):
    """One console user; ``password_hash`` is what ``worklist-broker hash-password`` prints."""

    name: str = Field(min_length=1, max_length=64)
    # What `worklist-broker hash-password` prints; a mistyped one would lock the user out
    # without a word, so its shape is checked when the config loads.
    password_hash: str = Field(pattern=r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")
    role: WebRole = "viewer"


class WebConfig(_Section):
    """The operator console: web pages, REST API, /health and /metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8044, ge=0, le=65535)
    # Empty: the console is open, and only allowed on a loopback host.
    users: list[WebUser] = Field(default_factory=list)
    # Hours a login stays valid without use.
    session_hours: float = Field(12, gt=0)
    # Seconds between refreshes of the worklist page (0: never).
    refresh_seconds: int = Field(30, ge=0)
    # Failed logins per user name and client address before each further try waits
    # (doubling up to 30 s).
    login_failures_before_delay: int = Field(3, ge=1)
    # Send the session cookie only over HTTPS (set when a TLS proxy is in front).
    secure_cookie: bool = False
    # HTTPS: a TLS port beside the plain one (web.port), or instead of it (plain_port: false);
    # the same keys and defaults as dicom.tls and hl7.tls.
    tls: TlsListenerConfig = TlsListenerConfig()

    @field_validator("users")
    @classmethod
    def _distinct_users(cls, value: list[WebUser]) -> list[WebUser]:
        names = [user.name for user in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"user listed twice: {', '.join(repeated)}")
        return value


class AuditConfig(_Section):
    """The audit trail (broker.audit): associations, C-FIND answers, MPPS, HL7 messages and
    console logins, in the database and as JSON lines, optionally to a syslog collector."""

    enabled: bool = True
    # JSON lines file, one event a line; relative to the config file's folder. None: no file.
    file: Path | None = None
    # RFC 5424 syslog collector (IHE ATNA's transport); None: none.
    syslog_host: str | None = None
    syslog_port: int = Field(514, ge=1, le=65535)
    syslog_protocol: Literal["udp", "tcp"] = "udp"
    # Days an audit event is kept in the database (the purge job deletes older ones).
    retention_days: int = Field(365, ge=1)
    # Seconds between two batched writes (the hot paths only append to a buffer).
    flush_seconds: float = Field(2, gt=0, le=60)

    @field_validator("file", "syslog_host", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class BrokerConfig(_Section):
    database: DatabaseConfig = DatabaseConfig()
    dicom: DicomConfig = DicomConfig()
    hl7: Hl7Config = Hl7Config()
    ris: RisConfig = RisConfig()
    jobs: JobsConfig = JobsConfig()
    orthanc: OrthancConfig = OrthancConfig()
    web: WebConfig = WebConfig()
    audit: AuditConfig = AuditConfig()
    logging: LoggingConfig = LoggingConfig()
    mapping: Path = Path("mapping.yaml")
    # Root under which Study Instance UIDs (and MPPS-less status message ids) are generated
    # when the RIS sends none. Replace with your organisation's registered root.
    uid_root: str = Field("1.2.826.0.1.3680043.10.1491", pattern=r"^[0-9]+(\.[0-9]+)*$",
                          max_length=40)
    # Where the file came from; relative paths in it were resolved against this folder.
    base_dir: Path = Path(".")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``WLB_SECTION_KEY`` variables into a nested dict, refusing names that match no key."""
    overrides: dict[str, Any] = {}
    top_fields = BrokerConfig.model_fields
    for name, raw in environ.items():
        # WLB_TEST_* belong to the test suite (WLB_TEST_PG_URL), which runs the CLI with them.
        if not name.startswith(ENV_PREFIX) or name.startswith(f"{ENV_PREFIX}TEST_"):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        value = yaml.safe_load(raw) if raw != "" else ""
        if rest in top_fields and rest != "base_dir":
            overrides[rest] = value
            continue
        section, _, key = rest.partition("_")
        field = top_fields.get(section)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, _Section)
                and key in model.model_fields):
            raise ConfigError(f"environment variable {name} names no config key "
                              "(expected WLB_<SECTION>_<KEY>, e.g. WLB_DICOM_PORT)")
        if model.model_fields[key].annotation in (str, str | None):
            # Keep "0123", "2.3" or a password "1234" exactly as typed for string keys.
            value = raw
        overrides.setdefault(section, {})[key] = value
    return overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    given = err.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{path}: {err['msg']}{shown}"


def _resolve_paths(config: BrokerConfig, base_dir: Path) -> BrokerConfig:
    url = make_url(config.database.url)
    database = config.database
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_path = Path(url.database)
        if not db_path.is_absolute():
            db_path = (base_dir / db_path).resolve()
        database = database.model_copy(
            update={"url": url.set(database=str(db_path)).render_as_string(hide_password=False)})
    mapping = config.mapping if config.mapping.is_absolute() else (base_dir / config.mapping)
    orthanc = config.orthanc
    if orthanc.config_file is not None and not orthanc.config_file.is_absolute():
        # A copy keeps model_fields_set: what was set explicitly stays distinguishable.
        orthanc = orthanc.model_copy(update={"config_file": (base_dir / orthanc.config_file)})
    audit = config.audit
    if audit.file is not None and not audit.file.is_absolute():
        audit = audit.model_copy(update={"file": (base_dir / audit.file).resolve()})
    return config.model_copy(update={"database": database, "mapping": mapping.resolve(),
                                     "base_dir": base_dir, "orthanc": orthanc,
                                     "audit": audit})


def load_config(path: str | os.PathLike[str] | None,
                environ: Mapping[str, str] | None = None) -> BrokerConfig:
    """Read, merge and validate the configuration, or raise ConfigError naming the key."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        data = loaded or {}
        if "base_dir" in data:
            raise ConfigError("base_dir: unknown key")
        base_dir = file.resolve().parent
    data = _merge(data, _env_overrides(environ))
    try:
        config = BrokerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None
    config = _resolve_paths(config, base_dir)
    if not config.mapping.is_file():
        raise ConfigError(f"mapping: cannot read mapping file {config.mapping}")
    return config
