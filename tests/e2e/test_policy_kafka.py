"""Review policy against the real broker: burn-in counted across workers and restarts, audit
samples delivered and copied, corrections on audit items."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from pipeline.config import Settings
from pipeline.contract.envelopes import (
    BurnInClaim,
    Correction,
    Escalation,
    Request,
    Result,
    ReviewDecision,
)
from pipeline.control.burn_in import BURN_IN_TOPIC
from pipeline.harness.environment import create_topics, worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import Ledger, read_terminal
from pipeline.review.calibration import calibrate, samples_from_kafka
from pipeline.review.cli import review_app
from pipeline.review.kafka_io import read_to_end
from pipeline.review.model import QueueFilter
from pipeline.review.runtime import ReviewRuntime
from pipeline.stages.policy import audit_bucket
from pipeline.transport import headers as h
from pipeline.transport.batch import Message
from tests.policy_support import ANSWER, NAME, prompt_ref, write_prompts
from tests.support import make_settings, produce, running_worker

pytestmark = pytest.mark.kafka


def fenced(request_id: str) -> bool:
    """A third of the answers come in a code fence, which costs them some confidence."""
    return audit_bucket("fence", request_id) < 3333


def requests(
    ids: list[str], answer: dict[str, object] = ANSWER, mix: bool = False
) -> list[Message]:
    """Requests whose fake-model answer is fixed and confident (logprobs near zero); with
    ``mix``, the fenced third scores about 0.90 instead of about 0.95."""
    messages: list[Message] = []
    for request_id in ids:
        body = f"Please refund order {request_id}. [[answer:{json.dumps(answer)}]]"
        if mix and fenced(request_id):
            body += " [[fake:fenced]]"
        request = Request(
            request_id=request_id, prompt=NAME, variables={"subject": "Refund", "body": body}
        )
        value = request.model_dump_json().encode()
        messages.append((request_id.encode(), value, [("content-type", b"application/json")]))
    return messages


def wait_for_settle_members(
    settings: Settings, count: int, known: frozenset[str] = frozenset(), timeout_s: float = 180
) -> frozenset[str]:
    """Until the settle group has ``count`` members that each own partitions, exactly one of
    them new when ``known`` is given (the broker may still list a stopped worker for a while);
    returns their ids."""
    admin = AdminClient(settings.kafka_client_config())
    group = settings.group("settle")
    deadline = time.monotonic() + timeout_s
    owners: dict[str, int] = {}
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
        owners = {m.member_id: len(m.assignment.topic_partitions) for m in described.members}
        fresh = len(set(owners) - known)
        if len(owners) == count and all(owners.values()) and (not known or fresh == 1):
            return frozenset(owners)
        time.sleep(0.2)
    raise AssertionError(f"settle group never had {count} fresh members with partitions: {owners}")


def wait_terminal(settings: Settings, ids: list[str], timeout_s: float = 120) -> Ledger:
    ledger = read_terminal(settings, ids, timeout_s=timeout_s, settle_s=1)
    assert not ledger.missing, f"never reached a terminal topic: {sorted(ledger.missing)[:10]}"
    return ledger


@pytest.mark.timeout(900)
def test_burn_in_of_20_holds_exactly_the_first_20_across_two_workers_and_a_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    registry = write_prompts(tmp_path, {"burn_in": {"answers": 20}})
    first = [f"b1-{i:02d}" for i in range(12)]
    second = [f"b2-{i:02d}" for i in range(18)]
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, prompts_dir=tmp_path / "prompts"
        )
        create_topics(settings)
        with running_worker(settings) as worker_a:
            with running_worker(settings) as worker_b:
                first_members = wait_for_settle_members(settings, 2)
                produce(settings, "llm.requests", requests(first))
                wait_terminal(settings, first)
            both = [w.burn_in.claimed if w.burn_in else 0 for w in (worker_a, worker_b)]
            assert all(both), f"both workers must have counted answers, got {both}"
            # worker b is gone; it comes back as a new process would, from the topic alone
            with running_worker(settings) as worker_b2:
                assert worker_b2.burn_in is not None
                restarted_saw = worker_b2.burn_in.book.count(prompt_ref(registry))
                assert restarted_saw == len(first), "a restarted worker reads the count back"
                wait_for_settle_members(settings, 2, known=first_members)
                produce(settings, "llm.requests", requests(second))
                ledger = wait_terminal(settings, first + second)
        everything = first + second
        claims = [c.request_id for c, _ in read_to_end(settings, BURN_IN_TOPIC, BurnInClaim)]
        order = list(dict.fromkeys(claims))  # first claim per request, in the topic's order
        assert set(order) <= set(everything)
        assert len(order) >= 20, f"only {len(order)} answers were claimed"

        # The 21st answer after everything above: burn-in is over, delivered directly.
        late = ["b3-late"]
        with running_worker(settings):
            produce(settings, "llm.requests", requests(late))
            late_ledger = wait_terminal(settings, late)

    assert not ledger.duplicates, f"delivered twice: {ledger.duplicates}"
    routes = {rid: (ledger.first(rid).outcome, ledger.first(rid).reason) for rid in everything}
    held = {rid for rid, route in routes.items() if route == ("review", "burn_in")}
    delivered = {rid for rid, route in routes.items() if route == ("result:model", None)}
    assert len(held) == 20, f"{len(held)} held for burn-in: {Counter(routes.values())}"
    assert held | delivered == set(everything), Counter(routes.values())
    assert held == set(order[:20]), "the held answers must be exactly the first 20 claims"
    assert all(rid in delivered for rid in order[20:]), "claims after the 20th are delivered"
    assert late_ledger.first("b3-late").outcome == "result:model"
    after = [c.request_id for c, _ in read_to_end(settings, BURN_IN_TOPIC, BurnInClaim)]
    assert "b3-late" not in after, "once burn-in is over, no answer needs a claim"
    print("burn-in: held", len(held), "delivered", len(delivered), "claims", len(claims))


def reviewer_says(request_id: str) -> str:
    """A deterministic stand-in for a reviewer: it corrects about 1 in 5 of the fenced
    (less confident) answers and 1 in 50 of the others."""
    share = 2000 if fenced(request_id) else 200
    return "edit" if audit_bucket("reviewer", request_id) < share else "approve"


@pytest.mark.timeout(1200)
def test_audit_share_10_percent_of_1000_accepted_requests(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = write_prompts(tmp_path, {"audit": {"share": 0.1, "supersede": True}})
    ids = [f"audit-{i:04d}" for i in range(1000)]
    predicted = {rid for rid in ids if audit_bucket(NAME, rid) < 1000}
    assert 70 < len(predicted) < 130
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, prompts_dir=tmp_path / "prompts"
        )
        create_topics(settings)
        with running_worker(settings):
            produce(settings, "llm.requests", requests(ids, mix=True))
            ledger = wait_terminal(settings, ids, timeout_s=600)

    # Every request delivered once, as the model's result; no reviewer has acted yet.
    assert not ledger.duplicates, f"delivered twice: {ledger.duplicates}"
    assert Counter(ledger.first(rid).outcome for rid in ids) == {"result:model": 1000}
    assert not list(read_to_end(settings, "llm.review.decisions", ReviewDecision))
    # Exactly the predicted audit copies, each after (never instead of) its result.
    copies = list(read_to_end(settings, "llm.review", Escalation))
    audited = Counter(esc.validated.request.request_id for esc, _ in copies)
    assert set(audited) == predicted and set(audited.values()) == {1}
    assert all(esc.reason == "audit" for esc, _ in copies)
    assert {h.text(headers, h.ROUTE) for _, headers in copies} == {"audit"}
    results = {
        r.request_id: r
        for r, _ in read_to_end(settings, "llm.results", Result)
        if r.source == "model"
    }
    for esc, _ in copies:
        result = results[esc.validated.request.request_id]
        assert esc.output == result.output and esc.confidence == result.confidence

    # Reviewers give their verdicts; corrections are published, and supersede the result.
    db = f"sqlite:///{tmp_path / 'review.db'}"
    runtime = ReviewRuntime(settings, db, registry=registry, maintenance_interval_s=60)
    try:
        assert runtime.start(ready_timeout_s=60), "review queue did not catch up with Kafka"
        assert {i.request_id for i in runtime.service.queue(QueueFilter(limit=1000))} == predicted
        fixed = {**ANSWER, "label": "account", "summary": "Asks how to log in."}
        for rid in sorted(predicted):
            assert runtime.service.claim(rid, "alice").ok
            action = reviewer_says(rid)
            text = json.dumps(fixed) if action == "edit" else None
            outcome = runtime.service.decide(rid, "alice", action, output_text=text)
            assert outcome.delivered, rid
    finally:
        runtime.stop()
    edited = {rid for rid in predicted if reviewer_says(rid) == "edit"}
    assert edited, "the synthetic reviewer must correct some answers"
    corrections = {c.request_id: c for c, _ in read_to_end(settings, "llm.corrections", Correction)}
    assert set(corrections) == edited
    assert all(corrections[rid].corrected_output == fixed for rid in edited)
    assert all(corrections[rid].original_output == results[rid].output for rid in edited)
    human = [r for r, _ in read_to_end(settings, "llm.results", Result) if r.source == "human"]
    assert sorted(r.request_id for r in human) == sorted(edited)  # approvals add no result
    assert {r.reason for r in human} == {"audit_correction"}
    decisions = [d for d, _ in read_to_end(settings, "llm.review.decisions", ReviewDecision)]
    assert sorted(d.request_id for d in decisions) == sorted(predicted)

    # Calibration from this run's verdicts, as an operator runs it.
    samples = samples_from_kafka(settings, NAME)
    assert len(samples) == len(predicted)
    assert sum(not s.correct for s in samples) == len(edited)
    (report,) = calibrate(NAME, samples, registry, target=0.02)
    out = Path(os.environ.get("LLMPIPE_CALIBRATION_OUT", tmp_path / "calibration"))
    for name, value in worker_environment(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LLMPIPE_PROMPTS_DIR", str(tmp_path / "prompts"))
    monkeypatch.setenv("COLUMNS", "110")
    shown = CliRunner().invoke(
        review_app, ["calibration", NAME, "--target", "0.02", "--plots", str(out)]
    )
    assert shown.exit_code == 0, shown.output
    print(shown.output)
    assert " ".join(report.message.split()) in " ".join(shown.output.split())
    for plot in (f"{NAME}-v1-reliability.png", f"{NAME}-v1-threshold.png"):
        assert (out / plot).stat().st_size > 10_000
