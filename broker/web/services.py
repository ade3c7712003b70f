"""What the composition root hands the console besides the store and the config: the live
parts of the serve process it reports on or acts through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.audit_trail import AuditTrail


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    up: Callable[[], bool]


@dataclass(frozen=True)
class ConsoleServices:
    # Replays one logged inbound message through the handler in use; returns
    # hl7_listener.replay.ReplayResult.
    replay: Callable[[int], Any]
    # Maps one raw HL7 message with the mapping in use; returns
    # hl7_listener.mapping_report.MappingReport (raises on a message it cannot read).
    mapping_report: Callable[[bytes], Any]
    listeners: list[Listener] = field(default_factory=list)
    open_associations: Callable[[], int] = lambda: 0
    # Converts an Orthanc-style {"Tags": {...}} dataset into an order (broker.item_dataset).
    uid_root: str = "1.2.826.0.1.3680043.10.1491"
    # The audit trail (logins, operator actions); None when audit.enabled is false.
    audit: AuditTrail | None = None
