"""Plain records passed between the store, the service and the web layer.

They are frozen dataclasses rather than pydantic models because they never cross a wire:
the envelopes they carry are already validated, and the web layer must not be able to
mutate what the store returned.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pipeline.contract.envelopes import Escalation, ReviewDecision

Clock = Callable[[], int]
"""Milliseconds since the epoch. Injected everywhere so tests can move time (lease expiry)."""

DecisionState = Literal["pending", "published"]
"""``pending``: recorded here, not yet known to be on Kafka; ``published``: it is."""

DECISION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:llmpipe:review-decision")


def system_clock() -> int:
    return time.time_ns() // 1_000_000


def decision_id_for(request_id: str) -> str:
    """One decision per request, ever: the id is a function of the request id.

    Deriving it (instead of drawing a random one) is what makes a retried, double-clicked
    or re-driven decision the *same* decision everywhere: the database's primary key,
    the ``x-decision-id`` header downstream consumers can dedupe on, and the check
    against the decisions topic all agree without any coordination.
    """
    return str(uuid.uuid5(DECISION_NAMESPACE, request_id))


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def datetime_to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


@dataclass(frozen=True)
class TopicPosition:
    """Where a consumer stands in one partition: the next offset to read."""

    topic: str
    partition: int
    next_offset: int


@dataclass(frozen=True)
class IncomingItem:
    """One ``llm.review`` message, decoded, with what the transport told us about it."""

    escalation: Escalation
    key: bytes | None
    traceparent: str | None
    topic: str
    partition: int
    offset: int

    @property
    def request_id(self) -> str:
        return self.escalation.validated.request.request_id


@dataclass(frozen=True)
class StoredDecision:
    decision: ReviewDecision
    state: DecisionState
    on_topic: bool
    recorded_at_ms: int
    published_at_ms: int | None
    owner: str | None = None
    """The instance that delivers it (pending decisions always have one)."""
    taken_from: str | None = None
    """The owner it was taken over from, fenced before delivery."""


@dataclass(frozen=True)
class InstanceRow:
    """A review service instance as the shared database knows it."""

    instance: str
    started_ms: int
    last_seen_ms: int
    stopped_ms: int | None


@dataclass(frozen=True)
class ReviewItem:
    """A review item as the UI sees it: the escalation, its claim and its decision if any."""

    escalation: Escalation
    key: bytes | None
    traceparent: str | None
    first_seen_ms: int
    claimed_by: str | None
    lease_until_ms: int | None
    decision: StoredDecision | None

    @property
    def request_id(self) -> str:
        return self.escalation.validated.request.request_id

    @property
    def escalated_at_ms(self) -> int:
        return datetime_to_ms(self.escalation.escalated_at)

    def holder(self, now_ms: int) -> str | None:
        """Who holds a live lease now; an expired lease counts as nobody's."""
        if self.claimed_by is None or self.lease_until_ms is None:
            return None
        return self.claimed_by if self.lease_until_ms > now_ms else None

    def age_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.escalated_at_ms)


QueueSort = Literal["age", "-age", "confidence", "-confidence", "reason"]
"""``age``: oldest first (the order an SLA is breached in); ``confidence``: least sure
first; a leading ``-`` reverses; ``reason`` groups by reason, oldest first within one."""
QUEUE_SORTS: tuple[QueueSort, ...] = ("age", "-age", "confidence", "-confidence", "reason")


@dataclass(frozen=True)
class QueueFilter:
    prompt: str | None = None
    version: int | None = None
    reason: str | None = None
    min_age_ms: int | None = None
    """Only items at least this old (e.g. "what is about to breach the SLA")."""
    max_age_ms: int | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    sort: QueueSort = "age"
    limit: int = 200


@dataclass(frozen=True)
class QueueFacets:
    """The distinct values the filter drop-downs offer."""

    prompts: list[str]
    versions: list[int]
    reasons: list[str]


@dataclass(frozen=True)
class AuditEntry:
    at_ms: int
    actor: str
    request_id: str
    action: str
    detail: str


ClaimStatus = Literal["claimed", "renewed", "taken_over", "held", "decided", "missing"]


@dataclass(frozen=True)
class ClaimOutcome:
    status: ClaimStatus
    holder: str | None
    lease_until_ms: int | None
    previous_holder: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("claimed", "renewed", "taken_over")


@dataclass(frozen=True)
class CalibrationRow:
    """A reviewed item reduced to what calibration needs."""

    prompt_version: int
    confidence: float
    action: str
    reason: str


@dataclass(frozen=True)
class SessionRow:
    """A logged-in session as stored: who, under which password, since when, last seen."""

    user: str
    fingerprint: str
    created_ms: int
    last_seen_ms: int
