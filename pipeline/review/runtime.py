"""Wiring: store, topic follower, transactional publisher and service, started and stopped
as one unit (used by ``llmpipe review serve`` and by the tests that need the real thing).
"""

from __future__ import annotations

import logging
import threading

from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.observability.hooks import watch_accepted_error
from pipeline.prompts.registry import PromptRegistry
from pipeline.review.calibration import accepted_error_rates
from pipeline.review.kafka_io import TopicFollower, TransactionalPublisher
from pipeline.review.model import Clock, system_clock
from pipeline.review.service import ReviewService
from pipeline.review.store import SqlReviewStore, open_store

log = logging.getLogger("llmpipe.review")


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
        instance: str = "0",
        maintenance_interval_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.store: SqlReviewStore = open_store(db_url or settings.review_db)
        codec = Codec(output_format=settings.output_format)
        self.follower = TopicFollower(settings, self.store, codec, clock)
        # Stable per instance (not per process): a restart must fence its predecessor.
        self.publisher = TransactionalPublisher(
            settings, f"{settings.topic_prefix}llmpipe.review.{instance}"
        )
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
        self.publisher.start()
        self.follower.start()
        ready = self.service.become_ready(ready_timeout_s)
        self._thread = threading.Thread(target=self._maintain, name="review-outbox", daemon=True)
        self._thread.start()
        return ready

    def _maintain(self) -> None:
        """Retry what a crash or an outage left undone: readiness, then pending decisions."""
        while not self._stop.wait(self._interval_s):
            try:
                if not self.service.ready:
                    self.service.become_ready(self._interval_s)
                else:
                    self.service.deliver_pending()
            except Exception:
                log.exception("review maintenance failed; retrying")

    def stop(self) -> None:
        self._unwatch()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.follower.stop()
        self.publisher.close()
        self.store.close()
