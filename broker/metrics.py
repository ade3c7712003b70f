"""Process-wide Prometheus metrics the broker's paths update as they work.

Core-side on purpose: the HL7 and DICOM edges and the purge increment these counters, the
web edge only exposes them (``broker.web`` reads; nothing here imports it). Every update is
a prometheus_client counter or histogram: a lock and an addition, cheap enough for the C-FIND
hot path. Labels are low-cardinality (message type, ACK code, calling AE, outcome), never a
patient identifier. Queue depths are not here: they are read from the database at scrape
time, so several brokers on one PostgreSQL report the same numbers.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

PREFIX = "worklist_broker"
# Our own registry: the default one adds python_* and process_* series, not ours to name.
REGISTRY = CollectorRegistry(auto_describe=True)
# One series per counter, not two: the *_created timestamps say nothing an operator needs.
disable_created_metrics()

# A calling AE title is chosen by whoever connects: past this many distinct titles the
# rest are counted as "other", so a scanner cannot grow the label set without bound.
_MAX_CALLING_AES = 200
_seen_aes: set[str] = set()
_seen_lock = threading.Lock()

HL7_MESSAGES = Counter(f"{PREFIX}_hl7_messages_total",
                       "HL7 messages received, by message type and ACK code",
                       ["message_type", "ack_code"],
                       registry=REGISTRY)
HL7_ACK_SECONDS = Histogram(f"{PREFIX}_hl7_ack_seconds",
                            "Seconds from a message's last byte to its ACK being ready",
                            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                     5, 10),
                            registry=REGISTRY)
CFIND_QUERIES = Counter(f"{PREFIX}_cfind_queries_total",
                        "Modality Worklist C-FIND queries, by calling AE and outcome",
                        ["calling_ae", "outcome"],
                        registry=REGISTRY)
CFIND_SECONDS = Histogram(f"{PREFIX}_cfind_seconds",
                          "Seconds to answer one C-FIND (match and send every response)",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5, 10),
                          registry=REGISTRY)
CFIND_MATCHES = Counter(f"{PREFIX}_cfind_matches_total",
                        "Worklist items returned by C-FIND, by calling AE", ["calling_ae"],
                        registry=REGISTRY)
ASSOCIATIONS_REFUSED = Counter(f"{PREFIX}_associations_refused_total",
                               "DICOM associations rejected (unknown calling AE, limits)",
                               registry=REGISTRY)
ASSOCIATIONS_OPEN = Gauge(f"{PREFIX}_associations_open", "DICOM associations open now",
                          registry=REGISTRY)
MPPS_EVENTS = Counter(f"{PREFIX}_mpps_events_total",
                      "MPPS N-CREATE / N-SET requests, by operation, status and outcome",
                      ["operation", "status", "outcome"],
                      registry=REGISTRY)
PURGE_RUNS = Counter(f"{PREFIX}_purge_runs_total", "Purge runs that deleted (not skipped)",
                     registry=REGISTRY)
PURGE_ROWS = Counter(f"{PREFIX}_purge_rows_total", "Rows deleted by the purge, by kind",
                     ["kind"],
                     registry=REGISTRY)

_MPPS_STATUSES = frozenset({"IN PROGRESS", "COMPLETED", "DISCONTINUED"})


def calling_ae_label(calling_ae: str) -> str:
    if calling_ae in _seen_aes:
        return calling_ae
    with _seen_lock:
        if len(_seen_aes) >= _MAX_CALLING_AES:
            return "other"
        _seen_aes.add(calling_ae)
    return calling_ae


def observe_cfind(calling_ae: str, outcome: str, matches: int, seconds: float) -> None:
    label = calling_ae_label(calling_ae)
    CFIND_QUERIES.labels(label, outcome).inc()
    CFIND_SECONDS.observe(seconds)
    if matches:
        CFIND_MATCHES.labels(label).inc(matches)


def observe_mpps(operation: str, status: str | None, success: bool) -> None:
    shown = status if status in _MPPS_STATUSES else ("none" if not status else "other")
    MPPS_EVENTS.labels(operation, shown, "success" if success else "failure").inc()


def observe_hl7(message_type: str, ack_code: str) -> None:
    # Message types come from MSH-9 of whatever was sent: keep the label set to the form
    # "ABC^A01" and short.
    shown = message_type if len(message_type) <= 8 and message_type.replace("^", "").isalnum() \
        else "other"
    HL7_MESSAGES.labels(shown or "unparsed", ack_code).inc()
