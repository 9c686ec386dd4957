"""The review service against the real broker: rebuild from topics, exactly-once delivery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.contract.envelopes import Correction, Result, ReviewDecision
from pipeline.review.kafka_io import PublishError, read_to_end
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from pipeline.review.training import training_records
from tests.review.test_review_support import FakeClock, escalation, registry, review_message
from tests.support import produce

pytestmark = pytest.mark.kafka

FIXED = {"label": "bug", "priority": "high", "summary": "Dashboard takes 40 s since the release."}


@contextmanager
def running(settings: Settings, db: Path, clock: FakeClock) -> Iterator[ReviewRuntime]:
    runtime = ReviewRuntime(
        settings, f"sqlite:///{db}", registry=registry(), clock=clock, maintenance_interval_s=60
    )
    try:
        assert runtime.start(ready_timeout_s=30), "review queue did not catch up with Kafka"
        yield runtime
    finally:
        runtime.stop()


def publish_items(settings: Settings, *request_ids: str, **kwargs: Any) -> None:
    base = datetime(2030, 1, 1, 11, 0, tzinfo=UTC)
    produce(
        settings,
        "llm.review",
        [
            review_message(
                settings, escalation(rid, escalated_at=base + timedelta(minutes=i), **kwargs)
            )
            for i, rid in enumerate(request_ids)
        ],
    )


def topic(settings: Settings, name: str, cls: Any) -> list[Any]:
    return [envelope for envelope, _ in read_to_end(settings, name, cls, timeout_s=20)]


def open_ids(runtime: ReviewRuntime) -> list[str]:
    return [i.request_id for i in runtime.service.queue(QueueFilter())]


def test_queue_is_rebuilt_from_the_topics_after_the_database_is_lost(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    clock = FakeClock()
    publish_items(kafka_settings, "a", "b", "c")
    db = tmp_path / "review.db"
    with running(kafka_settings, db, clock) as first:
        assert open_ids(first) == ["a", "b", "c"]
        first.service.claim("b", "alice")
        outcome = first.service.decide("b", "alice", "edit", output_text=json.dumps(FIXED))
        assert outcome.delivered
        first.service.claim("c", "alice")
        assert first.service.decide("c", "alice", "reject", reason="not a ticket").delivered
        assert open_ids(first) == ["a"]

    db.unlink()
    with running(kafka_settings, db, clock) as second:
        assert open_ids(second) == ["a"]
        rebuilt = second.store.decision("b")
        assert rebuilt is not None and rebuilt.state == "published"
        assert rebuilt.decision.output == FIXED and rebuilt.decision.reviewer == "alice"
        assert [a.action for a in second.store.audit_trail("b")] == ["decision:edit"]
        # a late retry of the same decision finds it and produces nothing
        assert second.service.decide("b", "bob", "approve").duplicate

    results = topic(kafka_settings, "llm.results", Result)
    assert [(r.request_id, r.source, r.reviewer, r.output) for r in results] == [
        ("b", "human", "alice", FIXED)
    ]
    corrections = topic(kafka_settings, "llm.corrections", Correction)
    assert [(c.request_id, c.corrected_output) for c in corrections] == [("b", FIXED)]
    decisions = topic(kafka_settings, "llm.review.decisions", ReviewDecision)
    assert sorted((d.request_id, d.action) for d in decisions) == [("b", "edit"), ("c", "reject")]

    # the correction is training data: rendered prompt messages + the corrected answer
    (record,) = training_records(corrections, registry())
    assert record["messages"][-1] == {
        "role": "assistant",
        "content": json.dumps(FIXED, separators=(",", ":")),
    }
    assert record["messages"][0]["role"] == "system"
    assert "Slow dashboard" in record["messages"][-2]["content"]


def test_a_crash_after_producing_does_not_produce_again(
    kafka_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Produced and committed, then the process died before the database heard of it."""
    clock = FakeClock()
    publish_items(kafka_settings, "a")
    db = tmp_path / "review.db"
    with running(kafka_settings, db, clock) as first:
        first.follower.stop()  # so nothing but the restart can learn what was produced
        first.service.claim("a", "alice")

        def crash(decision_id: str, now_ms: int) -> None:
            raise KeyboardInterrupt("killed between produce and database write")

        monkeypatch.setattr(first.store, "mark_published", crash)
        with pytest.raises(KeyboardInterrupt):
            first.service.decide("a", "alice", "approve")
        monkeypatch.undo()
        stored = first.store.decision("a")
        assert stored is not None and stored.state == "pending" and not stored.on_topic

    with running(kafka_settings, db, clock) as second:
        stored = second.store.decision("a")
        assert stored is not None and stored.state == "published"
        assert second.service.stats.published == 0

    assert [r.request_id for r in topic(kafka_settings, "llm.results", Result)] == ["a"]
    assert len(topic(kafka_settings, "llm.review.decisions", ReviewDecision)) == 1


def test_a_crash_before_producing_is_delivered_once_on_restart(
    kafka_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    publish_items(kafka_settings, "a")
    db = tmp_path / "review.db"
    with running(kafka_settings, db, clock) as first:
        first.service.claim("a", "alice")

        def broker_down(messages: Any) -> None:
            raise PublishError("broker unavailable")

        monkeypatch.setattr(first.publisher, "publish", broker_down)
        outcome = first.service.decide("a", "alice", "clarify", question="Which dashboard?")
        assert not outcome.delivered
        monkeypatch.undo()
        # a double click after the failure: still the same single decision
        assert first.service.decide("a", "alice", "approve").duplicate

    with running(kafka_settings, db, clock) as second:
        stored = second.store.decision("a")
        assert stored is not None and stored.state == "published"
        assert second.service.stats.published == 1

    (result,) = topic(kafka_settings, "llm.results", Result)
    assert result.status == "needs_clarification" and result.output == {
        "question": "Which dashboard?"
    }
    assert len(topic(kafka_settings, "llm.review.decisions", ReviewDecision)) == 1
