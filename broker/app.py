"""The composition root: builds the store, the MLLP listener, the DICOM SCP, the outbound
senders (HL7 to the RIS, MPPS to downstream SCPs) and the scheduler from the configuration,
starts them in that order and stops them in reverse.

This module and ``broker.cli`` are the only ones that import both the core and the edges.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from broker import metrics
from broker.audit_trail import AuditTrail, SyslogSender
from broker.config import BrokerConfig
from broker.dicom.mpps_forwarder import MppsForwarder
from broker.dicom.scp import DicomServer
from broker.errors import ConfigError
from broker.orthanc.config_file import apply_orthanc_config
from broker.orthanc.follower import OrthancFollower
from broker.purge import purge
from broker.store import Store, open_store
from broker.tls import ContextSource, client_source, listener_source
from broker.web.app import create_app
from broker.web.security import is_loopback
from broker.web.server import WebServer
from broker.web.services import ConsoleServices, Listener
from hl7_listener.handler import handler_from_config
from hl7_listener.mapping import load_mapping
from hl7_listener.mapping_report import mapping_report
from hl7_listener.outbound import OutboundSender
from hl7_listener.replay import replay
from hl7_listener.samples import load_samples
from hl7_listener.server import MllpServer
from hl7_listener.status_message import parse_ack

log = logging.getLogger(__name__)


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime, info.st_size


def _ports(plain: int | None, tls: int | None) -> str:
    shown = ([str(plain)] if plain is not None else []) + (
        [f"{tls} (TLS)"] if tls is not None else [])
    return " and ".join(shown)


def _audit_trail(config: BrokerConfig, store: Store) -> AuditTrail | None:
    audit = config.audit
    if not audit.enabled:
        return None
    syslog = (SyslogSender(audit.syslog_host, audit.syslog_port, audit.syslog_protocol)
              if audit.syslog_host else None)
    return AuditTrail(store, file=audit.file, syslog=syslog, flush_seconds=audit.flush_seconds)


class Broker:
    """Everything ``worklist-broker serve`` runs, in one process."""

    def __init__(self, config: BrokerConfig) -> None:
        # Idempotent: the CLI applied it already; a Broker built in-process still gets it.
        config = apply_orthanc_config(config)
        self.config = config
        # Certificates first: a missing file or a mismatched key stops start-up (exit 2)
        # before anything is opened.
        self._build_tls(config)
        self.store = open_store(config.database.url, pool_size=config.database.pool_size)
        self._mapping_stamp = _stamp(config.mapping)
        self.audit = _audit_trail(config, self.store)
        self.handler = handler_from_config(self.store, config)
        self.handler.audit = self.audit
        self.mllp = MllpServer(
            self.handler, host=config.hl7.host, port=config.hl7.port,
            max_connections=config.hl7.max_connections,
            max_waiting=config.hl7.max_waiting_connections,
            wait_timeout=config.hl7.connection_wait_seconds,
            idle_timeout=config.hl7.idle_timeout_seconds,
            max_message_bytes=config.hl7.max_message_bytes,
            frame_timeout=config.hl7.frame_timeout_seconds,
            max_per_source=config.hl7.max_connections_per_source,
            unlimited_sources=config.hl7.unlimited_sources,
            plain=config.hl7.tls.plain_port, tls=self.hl7_tls,
            tls_port=config.hl7.tls.port or 0,
            handshake_timeout=config.hl7.tls.handshake_timeout_seconds, audit=self.audit)
        self.dicom = DicomServer(config.dicom, self.store,
                                 reporting=config.ris.status_messages.reporting(),
                                 tls=self.dicom_tls, audit=self.audit)
        self.outbound = OutboundSender(self.store, config.ris, config.hl7,
                                       batch_size=config.jobs.outbound_batch_size,
                                       tls=self.ris_tls, audit=self.audit)
        self.mpps_forwarder = MppsForwarder(self.store, config.dicom,
                                            batch_size=config.jobs.outbound_batch_size,
                                            tls=self.mpps_forward_tls)
        self.orthanc = (OrthancFollower(self.store, config.orthanc,
                                        config.ris.status_messages.reporting())
                        if config.orthanc.url else None)
        self.scheduler = BackgroundScheduler()
        self._purge_lock = threading.Lock()
        # Set by stop(): a purge under way ends after its current batch.
        self._stopping = threading.Event()
        self.web = self._web(config) if config.web.enabled else None

    def _web(self, config: BrokerConfig) -> WebServer:
        web = config.web
        if not web.users and not is_loopback(web.host):
            raise ConfigError(f"web.users: serving the console on {web.host} (not a loopback "
                              "address) needs at least one user (worklist-broker "
                              "hash-password), or web.host: 127.0.0.1")
        services = ConsoleServices(
            replay=lambda message_id: replay(self.store, self.handler, message_id),
            mapping_report=lambda raw: mapping_report(self.handler.mapping, raw),
            listeners=[
                Listener("dicom", f"{config.dicom.host}:{self.dicom.port} "
                         f"(AE {config.dicom.ae_title})", lambda: self.dicom.running),
                Listener("hl7", f"{config.hl7.host}:{self.mllp.port}",
                         lambda: self.mllp.running),
                Listener("scheduler", "outbound, purge and mapping jobs",
                         lambda: self.scheduler.running),
            ],
            open_associations=self.dicom.open_associations,
            uid_root=config.uid_root, audit=self.audit)
        metrics.ASSOCIATIONS_OPEN.set_function(self.dicom.open_associations)
        return WebServer(create_app(self.store, config, services), host=web.host,
                         port=web.port, plain=web.tls.plain_port, tls_port=web.tls.port,
                         tls=self.web_tls)

    def _build_tls(self, config: BrokerConfig) -> None:
        base = config.base_dir
        self.dicom_tls = listener_source(config.dicom.tls, base_dir=base, where="dicom.tls")
        self.hl7_tls = listener_source(config.hl7.tls, base_dir=base, where="hl7.tls")
        self.ris_tls = (client_source(config.ris.tls, host=config.ris.host, base_dir=base,
                                      where="ris.tls") if config.ris.enabled else None)
        self.web_tls = (listener_source(config.web.tls, base_dir=base, where="web.tls")
                        if config.web.enabled else None)
        self.mpps_forward_tls: dict[str, ContextSource] = {}
        for index, destination in enumerate(config.dicom.mpps_forward):
            source = client_source(destination.tls, host=destination.host, base_dir=base,
                                   where=f"dicom.mpps_forward.{index}.tls")
            if source is not None:
                self.mpps_forward_tls[destination.key] = source

    def tls_sources(self) -> list[ContextSource]:
        sources = [self.dicom_tls, self.hl7_tls, self.ris_tls, self.web_tls,
                   *self.mpps_forward_tls.values()]
        return [source for source in sources if source is not None]

    def reload_tls(self) -> bool:
        """Read every certificate and key again (SIGHUP); new connections use them, open ones
        keep theirs. A link whose files are broken keeps its previous ones."""
        results = {source.where: source.reload() for source in self.tls_sources()}
        if results.get("web.tls") and self.web is not None:
            try:
                self.web.restart_tls()
            except OSError as exc:
                log.error("the console's HTTPS port did not start again: %s", exc)
                return False
        return all(results.values())

    def load_samples(self, directory: Path, today: dt.date | None = None) -> int:
        """Send the sample orders through the same path as orders from the RIS; returns how
        many were accepted."""
        accepted = 0
        for name, message in load_samples(directory, today or dt.date.today()):
            reply = self.handler.handle(message)
            ack = parse_ack(reply) if reply else None
            if ack is None or ack.code in ("AA", "CA"):
                accepted += 1
            else:
                log.warning("sample %s not accepted: %s %s", name, ack.code if ack else "",
                            ack.text if ack else "")
        log.info("loaded %d of the sample messages in %s", accepted, directory)
        return accepted

    def reload_mapping(self) -> bool:
        """Use the mapping file as it is now, if it is valid; else keep the one in use."""
        self._mapping_stamp = _stamp(self.config.mapping)
        try:
            mapping = load_mapping(self.config.mapping)
        except ConfigError as exc:
            log.error("mapping not reloaded, the previous one stays in use: %s", exc)
            return False
        # One attribute assignment: a message being handled keeps the mapping it started with.
        self.handler.mapping = mapping
        log.info("mapping reloaded from %s", self.config.mapping)
        return True

    def _reload_if_changed(self) -> None:
        if _stamp(self.config.mapping) != self._mapping_stamp:
            self.reload_mapping()

    def run_purge(self) -> None:
        with self._purge_lock:
            purge(self.store, retention=self.config.jobs.retention_with(self.config.audit),
                  stop=self._stopping)

    def start(self) -> None:
        if self.audit is not None:
            self.audit.start()
        self.dicom.start()
        try:
            self.mllp.start()
        except Exception:
            self.dicom.stop()
            raise
        if self.web is not None:
            try:
                self.web.start()
            except Exception:
                self.mllp.stop()
                self.dicom.stop()
                raise
        jobs = self.config.jobs
        if self.config.ris.enabled:
            self.scheduler.add_job(
                self.outbound.run_once, "interval", seconds=jobs.outbound_interval_seconds,
                id="outbound", max_instances=1, coalesce=True,
                next_run_time=dt.datetime.now())
        if self.config.dicom.mpps_forward:
            self.scheduler.add_job(
                self.mpps_forwarder.run_once, "interval",
                seconds=jobs.outbound_interval_seconds, id="mpps-forward", max_instances=1,
                coalesce=True, next_run_time=dt.datetime.now())
        if self.orthanc is not None:
            self.scheduler.add_job(
                self.orthanc.run_once, "interval", seconds=self.config.orthanc.poll_seconds,
                id="orthanc-feed", max_instances=1, coalesce=True,
                next_run_time=dt.datetime.now())
        self.scheduler.add_job(self.run_purge, CronTrigger.from_crontab(jobs.purge_cron),
                               id="purge", max_instances=1, coalesce=True)
        self.scheduler.add_job(self._reload_if_changed, "interval",
                               seconds=jobs.mapping_check_seconds, id="mapping-reload",
                               max_instances=1, coalesce=True)
        self.scheduler.start()
        log.info("broker started: DICOM %s on %s:%s, HL7 on %s:%s, RIS outbound %s, "
                 "MPPS forwarded to %s, Orthanc change feed %s, console %s",
                 self.config.dicom.ae_title, self.config.dicom.host,
                 _ports(self.dicom.port if self.config.dicom.tls.plain_port else None,
                        self.dicom.tls_port),
                 self.config.hl7.host,
                 _ports(self.mllp.port if self.config.hl7.tls.plain_port else None,
                        self.mllp.tls_port),
                 f"to {self.config.ris.host}:{self.config.ris.port}"
                 if self.config.ris.enabled else "disabled",
                 ", ".join(d.key for d in self.config.dicom.mpps_forward) or "none",
                 f"of {self.orthanc.source} (on_study {self.config.orthanc.on_study})"
                 if self.orthanc else "not followed",
                 " and ".join(self.web.urls) if self.web else "off")

    def stop(self) -> None:
        self._stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.web is not None:
            self.web.stop()
        self.mllp.stop()
        self.dicom.stop()
        self.outbound.close()
        if self.audit is not None:
            # Last: what the listeners and jobs did until they stopped is written too.
            self.audit.stop()
        self.store.dispose()
        log.info("broker stopped")
