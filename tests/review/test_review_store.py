"""Review store and service without a broker: claims, leases, idempotent decisions."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Correction, Result, ReviewDecision
from pipeline.review.model import QueueFilter, TopicPosition, decision_id_for
from pipeline.review.service import NotClaimed, NotReady, ReviewError, ReviewService
from pipeline.review.store import SqlReviewStore, StoreError, open_store
from pipeline.transport import headers as h
from tests.review.test_review_support import (
    TRACEPARENT,
    FakeClock,
    MemoryKafka,
    escalation,
    incoming,
    registry,
)

LEASE_MS = 10 * 60_000


def make_service(
    store: SqlReviewStore, clock: FakeClock, kafka: MemoryKafka | None = None
) -> tuple[ReviewService, MemoryKafka]:
    kafka = kafka or MemoryKafka(store)
    service = ReviewService(
        store, registry(), kafka, kafka, lambda t: f"p.{t}", clock, lease_ms=LEASE_MS
    )
    assert service.become_ready(1.0)
    return service, kafka


def add_items(store: SqlReviewStore, *request_ids: str, minutes_apart: int = 5) -> None:
    base = datetime(2030, 1, 1, 11, 0, tzinfo=UTC)
    items = [
        incoming(escalation(rid, escalated_at=base + timedelta(minutes=i * minutes_apart)), i)
        for i, rid in enumerate(request_ids)
    ]
    store.apply(items, [], [], 0)


# -- claims and leases ------------------------------------------------------------------


def test_a_claimed_item_cannot_be_claimed_by_another_reviewer(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    first = store.claim("r1", "alice", clock(), LEASE_MS)
    second = store.claim("r1", "bob", clock(), LEASE_MS)
    assert first.status == "claimed" and first.ok
    assert second.status == "held" and not second.ok and second.holder == "alice"
    assert store.claim("r1", "alice", clock(), LEASE_MS).status == "renewed"
    assert store.claim("nope", "alice", clock(), LEASE_MS).status == "missing"


def test_an_expired_lease_frees_the_item(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "r1")
    store.claim("r1", "alice", clock(), LEASE_MS)
    clock.advance(minutes=9, seconds=59)
    assert store.claim("r1", "bob", clock(), LEASE_MS).status == "held"
    clock.advance(seconds=1)
    item = store.item("r1")
    assert item is not None and item.holder(clock()) is None
    taken = store.claim("r1", "bob", clock(), LEASE_MS)
    assert taken.status == "taken_over" and taken.previous_holder == "alice"
    assert [a.action for a in store.audit_trail("r1")] == ["claim:claimed", "claim:taken_over"]


def test_only_the_holder_can_release(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "r1")
    store.claim("r1", "alice", clock(), LEASE_MS)
    assert not store.release("r1", "bob", clock())
    assert store.release("r1", "alice", clock())
    assert store.claim("r1", "bob", clock(), LEASE_MS).status == "claimed"


def test_racing_claims_from_two_connections_have_one_winner(db_url: str, clock: FakeClock) -> None:
    """Two processes (two connections to one database) racing for each of 20 items."""
    stores = [open_store(db_url), open_store(db_url)]
    ids = [f"r{i}" for i in range(20)]
    add_items(stores[0], *ids)
    wins: dict[str, list[str]] = {rid: [] for rid in ids}
    barrier = threading.Barrier(2)

    def reviewer(name: str, store: SqlReviewStore) -> None:
        barrier.wait()
        for rid in ids:
            if store.claim(rid, name, clock(), LEASE_MS).ok:
                wins[rid].append(name)

    threads = [
        threading.Thread(target=reviewer, args=(n, s))
        for n, s in zip(("alice", "bob"), stores, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for opened in stores:
        opened.close()
    assert all(len(w) == 1 for w in wins.values()), wins


def test_queue_is_oldest_first_and_filters(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "early", "late")  # escalated at 11:00 and 11:05
    store.apply(
        [
            incoming(
                escalation(
                    "invoice",
                    prompt="invoice_extract",
                    version=1,
                    output={"invoice_number": "A", "total": 1, "currency": "EUR", "due_date": None},
                    reason="force_review",
                    escalated_at=datetime(2030, 1, 1, 10, 0, tzinfo=UTC),
                ),
                9,
            )
        ],
        [],
        [],
        0,
    )
    everything = [i.request_id for i in store.open_items(QueueFilter(), clock())]
    assert everything == ["invoice", "early", "late"]
    by_prompt = store.open_items(QueueFilter(prompt="ticket_triage", version=2), clock())
    assert [i.request_id for i in by_prompt] == ["early", "late"]
    by_reason = store.open_items(QueueFilter(reason="force_review"), clock())
    assert [i.request_id for i in by_reason] == ["invoice"]
    # at 12:00, "older than 58 minutes" keeps items escalated at or before 11:02
    old = store.open_items(QueueFilter(min_age_ms=58 * 60_000), clock())
    assert [i.request_id for i in old] == ["invoice", "early"]
    assert store.facets().prompts == ["invoice_extract", "ticket_triage"]


def test_items_are_first_wins_and_positions_are_stored(store: SqlReviewStore) -> None:
    first = escalation("r1", reason="low_confidence")
    replayed = escalation("r1", reason="force_review")
    store.apply([incoming(first, 0)], [], [TopicPosition("t", 0, 1)], 0)
    store.apply([incoming(replayed, 5)], [], [TopicPosition("t", 0, 6)], 0)
    item = store.item("r1")
    assert item is not None and item.escalation.reason == "low_confidence"
    assert store.positions() == {("t", 0): 6}


def test_unknown_database_url_is_refused() -> None:
    with pytest.raises(StoreError):
        open_store("mysql://nobody/db")


# -- decisions --------------------------------------------------------------------------


def test_approve_produces_a_decision_and_a_human_result(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    service, kafka = make_service(store, clock)
    service.claim("r1", "alice")
    outcome = service.decide("r1", "alice", "approve")
    assert outcome.delivered and not outcome.duplicate
    assert kafka.topics() == ["p.llm.review.decisions", "p.llm.results"]
    decision_msg, result_msg = kafka.published
    result = Codec().decode(result_msg.value, Result)
    assert result.source == "human" and result.reviewer == "alice" and result.status == "ok"
    assert result.output == escalation("r1").output
    assert result.produced_at == Codec().decode(decision_msg.value, ReviewDecision).decided_at
    headers = dict(result_msg.headers)
    assert headers[h.REQUEST_ID] == b"r1"
    assert headers[h.PROMPT] == b"ticket_triage@2"
    assert headers[h.ROUTE] == b"result"
    assert headers[h.CONTENT_TYPE] == b"application/vnd.llmpipe.avro"
    assert headers["x-decision-id"] == decision_id_for("r1").encode()
    # the trace continues: same trace id as the review item's traceparent
    assert headers[h.TRACEPARENT].split(b"-")[1] == TRACEPARENT.split("-")[1].encode()
    assert result.trace_id == TRACEPARENT.split("-")[1]
    assert result_msg.key == b"r1"


def test_double_decisions_produce_one_result(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "r1")
    service, kafka = make_service(store, clock)
    service.claim("r1", "alice")
    barrier = threading.Barrier(4)
    outcomes = []

    def click() -> None:
        barrier.wait()
        outcomes.append(service.decide("r1", "alice", "approve"))

    threads = [threading.Thread(target=click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    again = service.decide("r1", "alice", "reject", reason="changed my mind")
    assert sorted(o.duplicate for o in outcomes) == [False, True, True, True]
    assert again.duplicate and again.decision.decision.action == "approve"
    assert kafka.topics() == ["p.llm.review.decisions", "p.llm.results"]


def test_edit_is_validated_against_the_output_schema(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    service, kafka = make_service(store, clock)
    service.claim("r1", "alice")
    with pytest.raises(ReviewError) as not_json:
        service.decide("r1", "alice", "edit", output_text="{nope")
    assert "not JSON" in str(not_json.value)
    bad = {"label": "weird", "priority": "normal", "summary": ""}
    with pytest.raises(ReviewError) as invalid:
        service.decide("r1", "alice", "edit", output_text=json.dumps(bad))
    assert any("label" in e for e in invalid.value.errors)
    assert any("summary" in e for e in invalid.value.errors)
    assert kafka.published == [] and store.decision("r1") is None

    fixed = {"label": "bug", "priority": "high", "summary": "Dashboard takes 40 s to load."}
    outcome = service.decide("r1", "alice", "edit", output_text=json.dumps(fixed))
    assert outcome.delivered
    assert kafka.topics() == ["p.llm.review.decisions", "p.llm.results", "p.llm.corrections"]
    correction = Codec().decode(kafka.published[2].value, Correction)
    assert correction.corrected_output == fixed
    assert correction.original_output == escalation("r1").output
    assert correction.variables["subject"] == "Slow dashboard"
    assert Codec().decode(kafka.published[1].value, Result).output == fixed


def test_reject_produces_only_the_decision_and_clarify_asks(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1", "r2")
    service, kafka = make_service(store, clock)
    service.claim("r1", "alice")
    with pytest.raises(ReviewError):
        service.decide("r1", "alice", "reject", reason="  ")
    service.decide("r1", "alice", "reject", reason="spam")
    assert kafka.topics() == ["p.llm.review.decisions"]
    service.claim("r2", "alice")
    service.decide("r2", "alice", "clarify", question="Which dashboard?")
    result = Codec().decode(kafka.published[-1].value, Result)
    assert result.status == "needs_clarification"
    assert result.output == {"question": "Which dashboard?"}


def test_deciding_needs_a_live_claim(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "r1")
    service, kafka = make_service(store, clock)
    with pytest.raises(NotClaimed):
        service.decide("r1", "alice", "approve")
    service.claim("r1", "bob")
    with pytest.raises(NotClaimed):
        service.decide("r1", "alice", "approve")
    clock.advance(minutes=11)
    with pytest.raises(NotClaimed):  # bob's lease expired: nobody holds it
        service.decide("r1", "bob", "approve")
    assert kafka.published == []


def test_decisions_wait_until_the_queue_caught_up(store: SqlReviewStore, clock: FakeClock) -> None:
    add_items(store, "r1")
    kafka = MemoryKafka(store)
    service = ReviewService(store, registry(), kafka, kafka, str, clock)
    with pytest.raises(NotReady):
        service.decide("r1", "alice", "approve")


def test_a_failed_publish_stays_pending_and_is_delivered_once_later(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    service, kafka = make_service(store, clock, MemoryKafka(store, fail_next=1))
    service.claim("r1", "alice")
    outcome = service.decide("r1", "alice", "approve")
    assert not outcome.delivered and kafka.published == []
    assert [d.decision.request_id for d in store.pending_decisions()] == ["r1"]
    service.deliver_pending()
    service.deliver_pending()
    assert kafka.topics() == ["p.llm.review.decisions", "p.llm.results"]
    assert store.pending_decisions() == []
    actions = [a.action for a in store.audit_trail("r1")]
    assert actions == ["claim:claimed", "decide:approve", "delivery_failed", "delivered"]


def test_a_decision_already_on_the_topic_is_not_produced_again(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    """The crash window: produced, then the process died before marking the row.

    The pending row is re-driven, the decisions topic is read up to its end first (here:
    the follower's backlog is applied by ``sync``), the decision is found, nothing is
    produced.
    """
    add_items(store, "r1")
    service, kafka = make_service(store, clock)
    service.claim("r1", "alice")
    decision = build(service, store, "r1", "alice")
    assert store.record_decision(decision, clock(), service.instance)
    kafka.backlog.append(decision)
    service.deliver_pending()
    assert kafka.published == []
    stored = store.decision("r1")
    assert stored is not None and stored.state == "published" and stored.on_topic
    assert store.audit_trail("r1")[-1].detail == "already on the decisions topic"


def test_decisions_rebuilt_from_the_topic_are_audited(
    store: SqlReviewStore, clock: FakeClock
) -> None:
    add_items(store, "r1")
    service, _ = make_service(store, clock)
    decision = build(service, store, "r1", "carol")
    store.apply([], [decision], [], clock())
    assert store.open_items(QueueFilter(), clock()) == []
    trail = store.audit_trail("r1")
    assert [(a.actor, a.action) for a in trail] == [("carol", "decision:approve")]
    assert store.claim("r1", "alice", clock(), LEASE_MS).status == "decided"


def build(
    service: ReviewService, store: SqlReviewStore, request_id: str, who: str
) -> ReviewDecision:
    item = store.item(request_id)
    assert item is not None
    return service._build_decision(item, who, "approve", None, None, None)
