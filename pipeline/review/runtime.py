"""Wiring: store, topic follower, transactional publisher and service, started and stopped
as one unit (used by ``llmpipe review serve`` and by the tests that need the real thing).
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading

from pipeline.config import Settings
from pipeline.observability.hooks import watch_accepted_error
from pipeline.prompts.registry import PromptRegistry
from pipeline.review.calibration import accepted_error_rates
from pipeline.review.kafka_io import TopicFollower, TransactionalPublisher
from pipeline.review.model import Clock, system_clock
from pipeline.review.service import ReviewService
from pipeline.review.store import SqlReviewStore, StoreUnavailable, open_store
from pipeline.transport.registry import codec_for

log = logging.getLogger("llmpipe.review")


def new_instance_id() -> str:
    """A review instance id unique without configuration: host name plus 32 random bits.

    Two instances started with defaults therefore never share a Kafka transactional id
    (they would fence each other's transactions). A restart gets a new id; the pending
    decisions of the old one are taken over once it is marked stopped or falls silent.
    """
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class ReviewRuntime:
    def __init__(
        self,
        settings: Settings,
        db_url: str | None = None,
        *,
        registry: PromptRegistry | None = None,
        clock: Clock = system_clock,
        lease_ms: int = 10 * 60_000,
        sla_ms: int = 60 * 60_000,
        instance: str | None = None,
        maintenance_interval_s: float = 5.0,
        orphan_after_ms: int = 60_000,
    ) -> None:
        self.settings = settings
        self.instance = instance or new_instance_id()
        """Configured (stable across restarts: a restart fences its predecessor at once)
        or generated (unique per process)."""
        self.clock = clock
        self.store: SqlReviewStore = open_store(db_url or settings.review_db)
        codec = codec_for(settings)
        self.follower = TopicFollower(settings, self.store, codec, clock)
        self.publisher = TransactionalPublisher(settings, self.instance)
        registry = registry or PromptRegistry.load(settings.prompts_dir)
        self.service = ReviewService(
            self.store,
            registry,
            self.publisher,
            self.follower,
            settings.topic,
            clock,
            codec=codec,
            lease_ms=lease_ms,
            sla_ms=sla_ms,
            instance=self.instance,
            orphan_after_ms=orphan_after_ms,
        )
        names = registry.names()
        self._unwatch = watch_accepted_error(
            lambda: accepted_error_rates(self.store.calibration_rows, names)
        )
        self._interval_s = maintenance_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, ready_timeout_s: float = 30.0) -> bool:
        """Start everything; True when the queue caught up with Kafka within the timeout.

        If it did not, serving starts anyway (reads work, decisions answer 503) and the
        maintenance thread keeps trying.
        """
        before = self.store.register_instance(self.instance, self.clock())
        if before is not None and before.stopped_ms is None:
            log.warning(
                "review instance id %s was already running (last seen %d ms ago): if that "
                "process still runs, the two fence each other's Kafka transactions; give "
                "every instance its own id",
                self.instance,
                self.clock() - before.last_seen_ms,
            )
        log.info(
            "review instance %s (transactional id %s)",
            self.instance,
            self.publisher.transactional_id,
        )
        self.publisher.start()
        self.follower.start()
        ready = self.service.become_ready(ready_timeout_s)
        self._thread = threading.Thread(target=self._maintain, name="review-outbox", daemon=True)
        self._thread.start()
        return ready

    def _maintain(self) -> None:
        """Retry what a crash or an outage left undone: readiness, then pending decisions;
        heartbeat so other instances know this one is alive."""
        in_touch_since: int | None = self.clock()
        while not self._stop.wait(self._interval_s):
            try:
                now = self.clock()
                self.store.heartbeat(self.instance, now)
                in_touch_since = now if in_touch_since is None else in_touch_since
                if not self.service.ready:
                    self.service.become_ready(self._interval_s)
                else:
                    long_enough = now - in_touch_since >= self.service.orphan_after_ms
                    self.service.deliver_pending(take_over_silent=long_enough)
            except StoreUnavailable as exc:
                in_touch_since = None
                log.warning("review maintenance waits for the database: %s", exc)
            except Exception:
                log.exception("review maintenance failed; retrying")

    def stop(self) -> None:
        self._unwatch()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.follower.stop()
        self.publisher.close()
        try:
            self.store.instance_stopped(self.instance, self.clock())
        except StoreUnavailable as exc:  # then it is taken over once it looks silent
            log.warning("could not record that instance %s stopped: %s", self.instance, exc)
        self.store.close()
