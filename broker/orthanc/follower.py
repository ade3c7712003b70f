"""The job that follows an Orthanc's change feed and hands each stable study to the core.

Per run, page by page: read up to ``PAGE`` changes, fetch the main tags of each
``StableStudy`` among them (network, outside any transaction), then record every arrival and
move the feed cursor past the page in ONE transaction. A crash, a restart or an Orthanc
outage between two pages repeats nothing that was committed and skips nothing that was not.

Only one broker follows a given database's feeds at a time (``Store.exclusive``); the cursor
is also moved compare-and-set, so two followers could never both count a change.
"""

from __future__ import annotations

import logging
import time

from broker.config import OrthancConfig
from broker.domain import StatusReporting, StudyAction, StudyArrival
from broker.orthanc.client import OrthancClient, OrthancError
from broker.store import Store
from broker.studies import FeedMoved, advance_feed, feed_position, record_study_arrival, start_feed

log = logging.getLogger(__name__)

PAGE = 100
MAX_PAGES_PER_RUN = 50  # bounds one run; the next run goes on from the cursor
MAX_BACKOFF_SECONDS = 30.0


class OrthancFollower:
    def __init__(self, store: Store, config: OrthancConfig, reporting: StatusReporting,
                 ) -> None:
        assert config.url is not None
        self.store = store
        self.config = config
        self.reporting = reporting
        self.on_study = StudyAction(config.on_study)
        self.client = OrthancClient(config.url, username=config.username,
                                    password=config.password, timeout=config.timeout_seconds)
        self.source = self.client.url
        self._failures = 0
        self._next_try = 0.0  # time.monotonic() before which a run does nothing (backoff)

    @property
    def lock_name(self) -> str:
        return "orthanc-feed"

    def run_once(self) -> int:
        """Follow the feed as far as it goes now; returns the stable studies handled."""
        if time.monotonic() < self._next_try:
            return 0
        with self.store.exclusive(self.lock_name) as mine:
            if not mine:
                return 0  # another broker on this database follows the feed
            try:
                handled = self._follow()
            except OrthancError as exc:
                self._failed(exc)
                return 0
        if self._failures:
            log.info("Orthanc at %s answers again (after %d failed tries)", self.source,
                     self._failures)
            self._failures = 0
        return handled

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if self._failures == 1:
            # Once per outage: an Orthanc down for a night must not fill the log.
            log.warning("Orthanc change feed not read, retrying with backoff (at most %.0f s): "
                        "%s", MAX_BACKOFF_SECONDS, exc)
        delay = min(MAX_BACKOFF_SECONDS,
                    self.config.poll_seconds * 2 ** min(self._failures - 1, 10))
        self._next_try = time.monotonic() + delay

    def _start_position(self) -> int:
        with self.store.reading() as session:
            position = feed_position(session, self.source)
        if position is not None:
            return position
        # Never followed: what Orthanc already holds is history (unless from_start).
        start = 0 if self.config.from_start else self.client.last_change()
        with self.store.writing() as session:
            if feed_position(session, self.source) is None:
                start_feed(session, self.source, start)
                log.info("following the change feed of Orthanc at %s from change %d%s",
                         self.source, start, " (its start)" if not start else "")
            else:
                start = feed_position(session, self.source) or 0
        return start

    def _follow(self) -> int:
        position = self._start_position()
        handled = 0
        for _ in range(MAX_PAGES_PER_RUN):
            page = self.client.changes(position, PAGE)
            if page.last < position and not page.changes:
                log.warning("Orthanc at %s restarted its change feed (at %d, the broker was at "
                            "%d): its database was replaced? Following it from its start",
                            self.source, page.last, position)
                with self.store.writing() as session:
                    advance_feed(session, self.source, position, 0)
                position = 0
                continue
            arrivals: list[StudyArrival] = []
            for change in page.changes:
                if change.change_type != "StableStudy":
                    continue
                study = self.client.study(change.resource_id)
                if study is None:
                    log.info("study %s was deleted from Orthanc before it was read",
                             change.resource_id)
                    continue
                arrivals.append(study)
            new_position = max([position, page.last, *(c.seq for c in page.changes)])
            if new_position != position or arrivals:
                try:
                    with self.store.writing() as session:
                        for study in arrivals:
                            record_study_arrival(session, study, on_study=self.on_study,
                                                 policy=self.reporting)
                        advance_feed(session, self.source, position, new_position)
                except FeedMoved as exc:
                    log.warning("change feed page not recorded: %s", exc)
                    return handled
                handled += len(arrivals)
                position = new_position
            if page.done or not page.changes:
                break
        return handled
