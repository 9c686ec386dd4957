"""Several review instances on one database, without a broker: instance ids, who delivers a
pending decision, and taking over the decisions of an instance that is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from pipeline.review.service import ReviewService
from pipeline.review.store import SqlReviewStore
from tests.review.test_review_store import LEASE_MS, add_items
from tests.review.test_review_support import FakeClock, MemoryKafka, registry

ORPHAN_MS = 60_000


def instance(
    store: SqlReviewStore, clock: FakeClock, name: str, fail_next: int = 0
) -> tuple[ReviewService, MemoryKafka]:
    """One instance: its own publisher (as its own process would have), the shared store."""
    kafka = MemoryKafka(store, fail_next=fail_next)
    service = ReviewService(
        store,
        registry(),
        kafka,
        kafka,
        str,
        clock,
        lease_ms=LEASE_MS,
        instance=name,
        orphan_after_ms=ORPHAN_MS,
    )
    store.register_instance(name, clock())
    assert service.become_ready(1.0)
    return service, kafka


def test_instance_ids_are_unique_by_default_and_stable_when_configured(tmp_path: Path) -> None:
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="x.")
    db = f"sqlite:///{tmp_path / 'review.db'}"
    runtimes = [
        ReviewRuntime(settings, db, registry=registry()),
        ReviewRuntime(settings, db, registry=registry()),
        ReviewRuntime(settings, db, registry=registry(), instance="review-a"),
        ReviewRuntime(settings, db, registry=registry(), instance="review-a"),
    ]
    try:
        ids = [r.publisher.transactional_id for r in runtimes]
        assert ids[0] != ids[1], "two instances with defaults would fence each other"
        assert all(i.startswith("x.llmpipe.review.") for i in ids)
        assert ids[2] == ids[3] == "x.llmpipe.review.review-a"
        assert runtimes[0].service.instance == runtimes[0].instance
    finally:
        for runtime in runtimes:
            runtime.stop()


def test_only_the_owner_delivers_a_pending_decision(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    first, first_kafka = instance(store, clock, "a", fail_next=1)
    second, second_kafka = instance(store, clock, "b")
    first.claim("r1", "alice")
    assert not first.decide("r1", "alice", "approve").delivered
    second.deliver_pending()  # "a" is alive: not b's to deliver
    assert second_kafka.published == []
    stored = store.decision("r1")
    assert stored is not None and stored.state == "pending" and stored.owner == "a"
    first.deliver_pending()
    assert [m.topic for m in first_kafka.published] == ["llm.review.decisions", "llm.results"]
    assert second_kafka.published == [] and second_kafka.fenced == []


@pytest.mark.parametrize("gone", ["stopped", "silent"])
def test_a_gone_instances_decisions_are_taken_over_fenced_and_delivered_once(
    store: SqlReviewStore, clock: FakeClock, gone: str
) -> None:
    add_items(store, "r1", "r2")
    first, first_kafka = instance(store, clock, "a", fail_next=2)
    second, second_kafka = instance(store, clock, "b")
    for rid in ("r1", "r2"):
        first.claim(rid, "alice")
        assert not first.decide(rid, "alice", "reject", reason="spam").delivered
    if gone == "stopped":
        store.instance_stopped("a", clock())
    else:
        clock.advance(milliseconds=ORPHAN_MS - 1)
        store.heartbeat("b", clock())
        second.deliver_pending()
        assert second_kafka.published == [], "taken over before the owner fell silent"
        clock.advance(milliseconds=2)
        store.heartbeat("b", clock())
        second.deliver_pending(take_over_silent=False)  # b itself was just out of touch
        assert second_kafka.published == []
    second.deliver_pending()
    assert second_kafka.fenced == ["a", "a"], "the old owner is fenced before each delivery"
    decisions = [m for m in second_kafka.published if m.topic == "llm.review.decisions"]
    assert len(decisions) == 2
    assert [(d.owner, d.taken_from) for d in store.pending_decisions()] == []
    moved = store.decision("r1")
    assert moved is not None and (moved.owner, moved.taken_from) == ("b", "a")
    # the old owner coming back delivers nothing: the rows are no longer its own
    first.deliver_pending()
    assert first_kafka.published == []
    actions = [a.action for a in store.audit_trail("r1")]
    assert actions[-2:] == ["delivery_taken_over", "delivered"]


def test_review_next_gives_back_the_item_the_reviewer_already_holds(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    """A claim whose answer was lost (a 503 after the commit) must not strand the item."""
    add_items(store, "r1", "r2")
    service, _ = instance(store, clock, "a")
    assert service.claim("r2", "alice").ok
    assert service.claim_next("alice", QueueFilter()) == "r2"
    assert service.claim_next("bob", QueueFilter()) == "r1"
    assert service.claim_next("bob", QueueFilter()) == "r1"
    assert service.claim_next("carol", QueueFilter()) is None
