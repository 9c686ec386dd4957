"""Helpers shared by the review tests (no tests here): review items, a fake clock,
condition waits with deadlines, and an in-memory stand-in for Kafka."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

from starlette.types import ASGIApp

from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import (
    Escalation,
    PromptRef,
    Request,
    ReviewDecision,
    Usage,
    ValidatedRequest,
    ValidationReport,
)
from pipeline.prompts.registry import PromptRegistry
from pipeline.review.kafka_io import OutboundMessage, PublishError
from pipeline.review.model import IncomingItem, TopicPosition
from pipeline.review.store import ReviewStore
from pipeline.transport import headers as h

T = TypeVar("T")
XSS_SUMMARY = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@cache
def registry() -> PromptRegistry:
    return PromptRegistry.load(REPO_ROOT / "prompts")


class FakeClock:
    """Milliseconds that only move when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        self.now_ms = int(start.timestamp() * 1000)

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, **delta: float) -> None:
        self.now_ms += int(timedelta(**delta).total_seconds() * 1000)


def wait_for(condition: Callable[[], T | None], timeout_s: float = 20.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.05)  # polling interval of a deadline-bounded wait, not a synchronisation


def escalation(
    request_id: str,
    *,
    prompt: str = "ticket_triage",
    version: int = 2,
    output: dict[str, Any] | None = None,
    raw_text: str | None = None,
    confidence: float | None = 0.6,
    reason: str = "low_confidence",
    escalated_at: datetime | None = None,
    variables: dict[str, Any] | None = None,
    components: dict[str, float] | None = None,
) -> Escalation:
    pv = registry().get(prompt, version)
    escalated_at = escalated_at or datetime(2030, 1, 1, 11, 0, tzinfo=UTC)
    if output is None and prompt == "ticket_triage":
        output = {"label": "bug", "priority": "normal", "summary": "Dashboard is slow to load."}
    return Escalation(
        validated=ValidatedRequest(
            request=Request(
                request_id=request_id,
                prompt=prompt,
                variables=variables
                or {"subject": "Slow dashboard", "body": "It takes 40 s.", "customer_tier": "pro"},
                metadata={"tenant": "acme"},
            ),
            prompt=PromptRef(name=prompt, version=version, hash=pv.content_hash),
            received_at=escalated_at - timedelta(seconds=2),
        ),
        reason=reason,
        detail=f"confidence {confidence} below accept threshold 0.75",
        output=output,
        raw_text=raw_text if raw_text is not None else str(output),
        model="gpt-4o-mini",
        confidence=confidence,
        validation=ValidationReport(
            checks=["schema", "rules"],
            warnings=["summary is short"],
            confidence_components=components if components is not None else _components(confidence),
        ),
        usage=Usage(prompt_tokens=120, completion_tokens=30),
        attempts=1,
        escalated_at=escalated_at,
    )


def incoming(esc: Escalation, offset: int = 0) -> IncomingItem:
    request_id = esc.validated.request.request_id
    return IncomingItem(esc, request_id.encode(), TRACEPARENT, "llm.review", 0, offset)


def review_message(
    settings: Settings, esc: Escalation
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """An escalation as the settle stage would produce it onto llm.review."""
    value, content_type = Codec().encode(esc)
    request_id = esc.validated.request.request_id
    headers = h.output_headers(
        request_id,
        esc.validated.prompt,
        "review",
        content_type,
        {"traceparent": TRACEPARENT},
        esc.reason,
    )
    return request_id.encode(), value, headers


class MemoryKafka:
    """Publisher + topic state for tests without a broker.

    ``publish`` records the messages and (like the follower would) applies the decision
    to the store, so the service's verification path sees it as on the topic.
    """

    def __init__(self, store: ReviewStore, fail_next: int = 0) -> None:
        self.store = store
        self.published: list[OutboundMessage] = []
        self.fail_next = fail_next
        self.backlog: list[ReviewDecision] = []
        """Decisions on the "topic" the follower has not read yet; ``sync`` reads them."""
        self._offset = 0
        self.fenced: list[str] = []
        """Instances whose transactional id was fenced (before a takeover delivery)."""

    def begin(self) -> None:
        """One in-memory "producer": always live."""

    def fence(self, instance: str) -> None:
        self.fenced.append(instance)

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise PublishError("broker unavailable (simulated)")
        self.published.extend(messages)
        codec = Codec()
        decisions = [
            codec.decode(m.value, ReviewDecision)
            for m in messages
            if m.topic.endswith("llm.review.decisions")
        ]
        self._offset += 1
        self.store.apply([], decisions, [TopicPosition("llm.review.decisions", 0, self._offset)], 0)

    def sync(self, timeout_s: float) -> bool:
        if self.backlog:
            self.store.apply([], self.backlog, [], 0)
            self.backlog = []
        return True

    def topics(self) -> list[str]:
        return [m.topic for m in self.published]


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """``app`` behind a real uvicorn on a free local port; yields its base URL.

    Forwarding headers are off in uvicorn (as in ``llmpipe review serve``): the app's own
    trusted-proxy setting is what decides whether to believe them.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _components(confidence: float | None) -> dict[str, float]:
    """Components whose product is ``confidence``, named as the scorer names them."""
    if confidence is None:
        return {}
    fmt = 0.95 if confidence <= 0.95 else 1.0
    return {"logprob": round(confidence / fmt, 6), "format": fmt, "hedging": 1.0, "finish": 1.0}
