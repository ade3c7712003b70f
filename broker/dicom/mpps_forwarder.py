"""The road to downstream MPPS SCPs: forward-queue rows sent as N-CREATE / N-SET over DICOM.

The queue decides what is due (``broker.mpps_forward.deliverable``: per destination and MPPS
instance in the order written, after any backoff); this module associates once per
destination and run, sends, and judges the answer (PS3.7 C.4, PS3.4 F.7.2):
- Success or Warning marks the row sent; so does 0x0111 Duplicate SOP Instance to an
  N-CREATE: the downstream holds the instance already (an earlier try whose response was
  lost, or a modality that also reports there), and the N-SETs can follow;
- any other status is a refusal: retried with backoff, dead-lettered after max_attempts;
- an unreachable peer, an aborted association or a missing response delay the rows; a
  permanent A-ASSOCIATE-RJ or no accepted MPPS context dead-letters the batch at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from broker import mpps_forward
from broker.config import DicomConfig, MppsDestination
from broker.delivery import Outcome, RetryPolicy
from broker.dicom.mpps_scu import MppsScuError, associate, send_request
from broker.models import MppsForwardOperation
from broker.mpps import DUPLICATE_SOP_INSTANCE
from broker.store import Store
from broker.tls import ContextSource, expected_server_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForwardReport:
    sent: int = 0
    failed: int = 0

    def __add__(self, other: ForwardReport) -> ForwardReport:
        return ForwardReport(self.sent + other.sent, self.failed + other.failed)


@dataclass(frozen=True, slots=True)
class _Pending:
    id: int
    sop_instance_uid: str
    operation: str
    dataset_json: str | None


class MppsForwarder:
    """Delivers the forward queue to every configured destination; one run at a time."""

    def __init__(self, store: Store, dicom: DicomConfig, *, batch_size: int,
                 tls: dict[str, ContextSource] | None = None) -> None:
        self._store = store
        self._destinations = tuple(dicom.mpps_forward)
        # Destination key -> its TLS context, for the destinations with TLS enabled.
        self._tls = dict(tls or {})
        self._calling_aet = dicom.ae_title
        self._timeout = dicom.mpps_forward_timeout_seconds
        self._batch_size = batch_size
        self._policy = RetryPolicy(dicom.mpps_forward_retry_initial_seconds,
                                   dicom.mpps_forward_retry_max_seconds,
                                   dicom.mpps_forward_max_attempts)

    def run_once(self) -> ForwardReport:
        report = ForwardReport()
        for destination in self._destinations:
            with mpps_forward.destination_lock(self._store, destination.key) as ours:
                if ours:
                    report += self._run_destination(destination)
                else:
                    log.debug("MPPS forward to %s: another broker is delivering",
                              destination.key)
        return report

    def _pending(self, destination: MppsDestination) -> list[_Pending]:
        with self._store.reading() as session:
            return [_Pending(row.id, row.sop_instance_uid, row.operation, row.dataset_json)
                    for row in mpps_forward.deliverable(session, destination.key,
                                                        self._batch_size)]

    def _run_destination(self, destination: MppsDestination) -> ForwardReport:
        rows = self._pending(destination)
        if not rows:
            return ForwardReport()
        source = self._tls.get(destination.key)
        tls = ((source.context, expected_server_name(destination.tls, destination.host))
               if source is not None else None)
        try:
            assoc = associate(destination.host, destination.port,
                              called_aet=destination.ae_title, calling_aet=self._calling_aet,
                              timeout=self._timeout, tls=tls)
        except MppsScuError as exc:
            # The whole batch waits (or dies) together: the next run does not knock on a
            # closed door once per row.
            outcome = Outcome.REJECTED if exc.permanent else Outcome.UNREACHABLE
            for row in rows:
                self._record_failure(destination, row, outcome, str(exc))
            return ForwardReport(failed=len(rows))
        try:
            return self._send_batch(assoc, destination, rows)
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_batch(self, assoc: Association, destination: MppsDestination,
                    rows: Sequence[_Pending]) -> ForwardReport:
        sent = failed = 0
        held: set[str] = set()  # instances with a failure in this run: their later rows wait
        for row in rows:
            if row.sop_instance_uid in held:
                continue
            result = self._deliver(assoc, destination, row)
            if result is None:
                with self._store.writing() as session:
                    mpps_forward.mark_sent(session, row.id)
                sent += 1
                log.info("MPPS forward sent id=%d uid=%s %s to %s", row.id,
                         row.sop_instance_uid, row.operation, destination.key)
                continue
            outcome, reason = result
            self._record_failure(destination, row, outcome, reason)
            failed += 1
            held.add(row.sop_instance_uid)
            if outcome == Outcome.UNREACHABLE:
                break  # the association is gone; the rest would fail the same way
        return ForwardReport(sent, failed)

    def _deliver(self, assoc: Association, destination: MppsDestination,
                 row: _Pending) -> tuple[str, str] | None:
        """Send one row; None when the downstream took it, else (outcome, reason)."""
        create = row.operation == MppsForwardOperation.CREATE
        if row.dataset_json is None:
            return Outcome.REJECTED, "the dataset could not be kept on reception: nothing to send"
        try:
            dataset = Dataset.from_json(row.dataset_json)
        except Exception as exc:
            return Outcome.REJECTED, f"the kept dataset cannot be read: {exc}"
        try:
            answer = send_request(assoc, dataset, row.sop_instance_uid, create=create)
        except (MppsScuError, RuntimeError) as exc:  # RuntimeError: association already gone
            return Outcome.UNREACHABLE, str(exc)
        except ValueError as exc:  # pynetdicom could not encode the dataset
            return Outcome.REJECTED, f"cannot send the dataset: {exc}"
        if code_to_category(answer.status) in (STATUS_SUCCESS, STATUS_WARNING):
            return None
        if create and answer.status == DUPLICATE_SOP_INSTANCE:
            log.info("MPPS forward uid=%s: %s already holds the instance (0x0111), taken as "
                     "delivered", row.sop_instance_uid, destination.key)
            return None
        comment = f": {answer.error_comment}" if answer.error_comment else ""
        return (Outcome.NEGATIVE, f"{destination.ae_title} answered the N-"
                f"{'CREATE' if create else 'SET'} with 0x{answer.status:04X}{comment}")

    def _record_failure(self, destination: MppsDestination, row: _Pending, outcome: str,
                        reason: str) -> None:
        with self._store.writing() as session:
            state = mpps_forward.record_failure(session, row.id, reason, outcome=outcome,
                                                policy=self._policy)
        log.warning("MPPS forward not delivered id=%d uid=%s %s to %s (now %s): %s", row.id,
                    row.sop_instance_uid, row.operation, destination.key, state, reason)
