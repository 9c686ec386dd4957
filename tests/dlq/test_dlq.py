"""Dead-letter operations against the real broker: provenance, replay, resume, poison, reparse.

No test sleeps to synchronise: each waits for a condition on a topic (with a deadline) by
consuming it, and every replay run is bounded by the end offsets it saw when it started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from typer.testing import CliRunner

from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import (
    Completion,
    PromptRef,
    Request,
    Result,
    Usage,
    ValidatedRequest,
    utc_now,
)
from pipeline.contract.topology import ROUTE_AUDIT
from pipeline.control.state import ControlState
from pipeline.dlq import engine
from pipeline.dlq.cli import dlq_app
from pipeline.dlq.model import DeadLetterView, build_filter
from pipeline.dlq.render import inspect_json
from pipeline.dlq.reparse import REPARSE_SOURCE, ReparseSelector
from pipeline.dlq.replay import REPLAY_SOURCE, ReplaySelector
from pipeline.harness.environment import create_topics, worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import VERSION, mixed_requests, plan_request
from pipeline.prompts.registry import PromptRegistry
from pipeline.transport import headers as h
from pipeline.transport.reader import SourceRecord, partitions, reader_consumer, scan, to_record
from tests.support import make_settings, produce, running_worker

pytestmark = pytest.mark.kafka

ALL_REASONS = {
    "decode_error",
    "missing_request_id",
    "invalid_envelope",
    "unknown_prompt",
    "unknown_prompt_version",
    "invalid_variables",
    "too_large",
}
# Reasons decided after the request id was read from the body: the stage sets x-request-id.
# The others are decided before (bytes that do not decode, no id, oversized bytes are refused
# unread on purpose); their id is the key, which is what the ledger and the tools fall back to.
ID_FROM_BODY = {"invalid_envelope", "unknown_prompt", "unknown_prompt_version", "invalid_variables"}
# Only a resolved prompt version has a ref and a hash to put in x-prompt / x-prompt-hash.
PROMPT_RESOLVED = {"invalid_variables"}
Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


# -- helpers --------------------------------------------------------------------------------


def traceparent(n: int) -> bytes:
    return f"00-{n:032x}-{n:016x}-01".encode()


def trace_id(value: bytes | None) -> str:
    assert value is not None
    return value.decode().split("-")[1]


class TopicTail:
    """A topic read from the beginning, kept in memory: the test's view of what was produced."""

    def __init__(self, settings: Settings, logical: str) -> None:
        self.topic = settings.topic(logical)
        self.records: list[SourceRecord] = []
        self._consumer = reader_consumer(settings)
        self._parts = partitions(self._consumer, self.topic)
        self._consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self._parts]
        )

    def poll(self) -> None:
        for message in self._consumer.consume(num_messages=500, timeout=0.2):
            if message.error() is None:
                self.records.append(to_record(message))

    def wait_for(
        self, condition: Callable[[TopicTail], bool], what: str, timeout: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            self.poll()

    def catch_up(self) -> None:
        """Read up to the end offsets as of now (what is acknowledged is there)."""
        ends = {
            p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p))[1]
            for p in self._parts
        }

        def caught_up(tail: TopicTail) -> bool:
            # The position, not the last offset seen: transaction markers (every stage
            # commits transactionally) take offsets that are never delivered.
            tps = [TopicPartition(self.topic, p) for p, end in ends.items() if end > 0]
            return all(tp.offset >= ends[tp.partition] for tp in self._consumer.position(tps))

        self.wait_for(caught_up, f"{self.topic} up to {ends}")

    def by_id(self, header: str | None = None) -> Counter[str]:
        return Counter(
            r.request_id or "-" for r in self.records if header is None or header in r.headers_map
        )

    def close(self) -> None:
        self._consumer.close()


@contextmanager
def tail(settings: Settings, logical: str) -> Iterator[TopicTail]:
    t = TopicTail(settings, logical)
    try:
        yield t
    finally:
        t.close()


def request(rid: str, prompt: str = "ticket_triage", n: int = 0, **fields: Any) -> Message:
    answer = {"label": "billing", "priority": "normal", "summary": "Customer was charged twice."}
    body: dict[str, Any] = {
        "request_id": rid,
        "prompt": prompt,
        "variables": {
            "subject": "Charged twice",
            "body": f"My card was charged twice. [[answer:{json.dumps(answer)}]] [[fake:valid]]",
        },
        **fields,
    }
    headers = [("content-type", b"application/json"), ("traceparent", traceparent(n + 1))]
    return rid.encode(), json.dumps(body).encode(), headers


def synthetic_dead_letters(
    settings: Settings, ids: list[str], reason: str, start: int = 0
) -> list[Message]:
    """Dead letters as the validate stage writes them (same header builder), without a worker."""
    out: list[Message] = []
    for i, rid in enumerate(ids, start):
        key, value, original = request(rid, prompt="no_such_prompt", n=i)
        headers = h.dead_letter_headers(
            dict(original),
            topic=settings.topic("llm.requests"),
            partition=i % 6,
            offset=i,
            timestamp_ms=int(time.time() * 1000),
            group=settings.group("validate"),
            stage="validate",
            reason=reason,
            error_class="UnknownPromptError",
            error_message="unknown prompt 'no_such_prompt'",
            attempts=1,
            request_id=rid,
            prompt=None,
        )
        out.append((key, value, headers))
    return out


def replay(
    settings: Settings,
    group: str,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    **filters: Any,
) -> tuple[engine.Plan, engine.RunReport | None]:
    selector = ReplaySelector(settings, build_filter(**filters), group=group)
    the_plan = engine.plan(
        settings,
        selector,
        sources=[settings.topic("llm.dlq")],
        group=group,
        limit=limit,
        dry_run=dry_run,
    )
    if dry_run:
        return the_plan, None
    return the_plan, engine.execute(settings, selector, the_plan)


def committed(settings: Settings, group: str, logical: str) -> list[int]:
    consumer = reader_consumer(settings, group)
    try:
        topic = settings.topic(logical)
        parts = [TopicPartition(topic, p) for p in partitions(consumer, topic)]
        return [tp.offset for tp in consumer.committed(parts, timeout=10)]
    finally:
        consumer.close()


def copy_prompts(target: Path) -> Path:
    shutil.copytree(REPO_ROOT / "prompts", target)
    return target


# -- 1. provenance --------------------------------------------------------------------------


def test_dead_letters_of_every_reason_carry_full_provenance(kafka_settings: Settings) -> None:
    settings = kafka_settings
    faults = [
        "too_large",
        "garbage_bytes",
        "missing_id",
        "unknown_prompt",
        "unknown_version",
        "invalid_variables",
    ]
    planned = mixed_requests(36, seed=4, weights=dict.fromkeys(faults, 1.0), prefix="prov")
    messages: list[Message] = [
        (p.key, p.value, [*p.headers, ("traceparent", traceparent(i + 1))])
        for i, p in enumerate(planned)
    ]
    expected = {p.request_id: p.expected_reason for p in planned}
    for n, fields in enumerate(
        ({"variables": "not an object"}, {"prompt": ""}, {"deadline": "soon"})
    ):
        rid = f"prov-envelope-{n}"
        key, value, headers = request(rid, n=100 + n)
        body = {**json.loads(value or b"{}"), **fields}
        messages.append((key, json.dumps(body).encode(), headers))
        expected[rid] = "invalid_envelope"
    sent = {key.decode(): (key, value, headers) for key, value, headers in messages if key}
    with running_worker(settings, stages=("validate",)):
        produce(settings, "llm.requests", messages)
        ledger = read_terminal(settings, list(expected), timeout_s=30)
    assert not ledger.missing and not ledger.duplicates
    assert {ledger.first(rid).reason for rid in expected} == ALL_REASONS

    with tail(settings, "llm.requests") as originals:
        originals.catch_up()
        by_position = {(r.partition, r.offset): r for r in originals.records}
    registry = PromptRegistry.load(settings.prompts_dir)
    dead = list(scan(settings, [settings.topic("llm.dlq")]))
    cli, env = CliRunner(), worker_environment(settings)
    garbage = cli.invoke(dlq_app, ["inspect", "--reason", "decode_error", "--json"], env=env)
    assert garbage.exit_code == 0, garbage.output
    shown_lines = [json.loads(line) for line in garbage.stdout.splitlines()]
    assert shown_lines and all(x["raw"]["hex"] and x["decoded"] is None for x in shown_lines)
    wide = {**env, "COLUMNS": "200"}
    table = cli.invoke(dlq_app, ["inspect", "--grep", "required property"], env=wide)
    invalid = sum(1 for reason in expected.values() if reason == "invalid_variables")
    assert table.exit_code == 0 and f"{invalid} dead letters" in table.stdout
    assert table.stdout.count("invalid_variables") == invalid
    assert len(dead) == len(expected)
    for record in dead:
        rid = record.request_id or "-"
        assert rid in expected, rid
        hdrs = record.headers_map
        reason = expected[rid]
        missing = [name for name in h.DLQ_HEADERS if name not in hdrs]
        assert not missing, f"{reason}: missing {missing}"
        view = DeadLetterView(record)
        assert (view.reason, view.stage, view.replay_count, view.attempts) == (
            reason,
            "validate",
            0,
            1,
        )
        assert view.consumer_group == settings.group("validate")
        assert view.original_topic == settings.topic("llm.requests")
        assert view.first_failure_at is not None and view.error_class and view.error_message
        # Replayable by construction: the provenance points at the original, byte for byte.
        original = by_position[(view.original_partition or 0, view.original_offset or 0)]
        assert (original.key, original.value) == (record.key, record.value)
        assert view.original_timestamp_ms == original.timestamp_ms
        key, value, headers = sent[rid]
        assert (record.key, record.value) == (key, value)
        sent_headers = dict(headers)
        if "content-type" in sent_headers:
            assert hdrs["content-type"] == sent_headers["content-type"]
        # The dead letter continues the request's trace (a child span of the original).
        assert trace_id(hdrs.get("traceparent")) == trace_id(sent_headers["traceparent"])
        if reason in ID_FROM_BODY:
            assert hdrs[h.REQUEST_ID] == rid.encode(), reason
        else:
            assert h.REQUEST_ID not in hdrs and record.key == rid.encode(), reason
        if reason in PROMPT_RESOLVED:
            prompt = registry.get("ticket_triage", VERSION)
            assert hdrs[h.PROMPT] == prompt.ref.encode()
            assert hdrs[h.PROMPT_HASH] == prompt.content_hash.encode()
        shown = inspect_json(view)
        if reason == "decode_error":
            assert shown["decoded"] is None and shown["raw"]["length"] == len(record.value or b"")
        elif reason in {"unknown_prompt", "unknown_prompt_version", "invalid_variables"}:
            assert shown["decoded"]["request_id"] == rid


# -- 2. replay after the fix ------------------------------------------------------------------


def test_replay_after_the_fix_reaches_results(kafka_bootstrap: str, tmp_path: Path) -> None:
    prompts = copy_prompts(tmp_path / "prompts")
    new_ids = [f"fix-{i}" for i in range(6)]
    others = [
        request("other-0", prompt="no_such_prompt", n=50),
        request("other-1", n=51, prompt_version=9),
    ]
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, model_timeout_s=2.0, prompts_dir=prompts
        )
        create_topics(settings)
        with running_worker(settings):
            produce(
                settings,
                "llm.requests",
                [request(rid, "support_triage", i) for i, rid in enumerate(new_ids)] + others,
            )
            before = read_terminal(settings, [*new_ids, "other-0", "other-1"], timeout_s=30)
        assert {rid: before.first(rid).reason for rid in new_ids} == dict.fromkeys(
            new_ids, "unknown_prompt"
        )

        # The fix ships: the prompt the callers were already using now exists.
        shutil.copytree(prompts / "ticket_triage", prompts / "support_triage")
        for path in (prompts / "support_triage").glob("v*.yaml"):
            path.write_text(path.read_text().replace("name: ticket_triage", "name: support_triage"))

        with running_worker(settings), tail(settings, "llm.requests") as requests:
            group = settings.group("dlq-replay")
            the_plan, report = replay(
                settings, group, reasons=["unknown_prompt"], prompt="support_triage"
            )
            assert the_plan.to_send == 6 and report is not None and report.sent == 6
            assert report.skipped == 2 and report.by_destination == {
                settings.topic("llm.requests"): 6
            }
            results = read_terminal(
                settings, new_ids, timeout_s=30, settle_s=0.5, topics=("llm.results",)
            )
            requests.catch_up()
    assert not results.missing and not results.duplicates and not results.unexpected
    assert results.routes() == {"result:model": 6}
    replayed = [r for r in requests.records if REPLAY_SOURCE in r.headers_map]
    assert sorted(r.request_id or "" for r in replayed) == new_ids
    for record in replayed:
        assert record.headers_map[h.DLQ_REPLAY_COUNT] == b"1"
        assert record.headers_map[h.DLQ_REASON] == b"unknown_prompt"  # history kept
        # The result joined the request's original trace through the dead letter and replay.
        i = new_ids.index(record.request_id or "")
        result_headers = results.first(new_ids[i]).headers
        assert trace_id(result_headers["traceparent"]) == trace_id(traceparent(i + 1))


# -- 3. resumable, never twice ------------------------------------------------------------------


def test_a_killed_replay_resumes_and_sends_each_dead_letter_exactly_once(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    selected = [f"kill-{i:03d}" for i in range(40)]
    produce(
        settings,
        "llm.dlq",
        synthetic_dead_letters(settings, selected, "unknown_prompt")
        + synthetic_dead_letters(
            settings, [f"keep-{i}" for i in range(8)], "invalid_variables", start=40
        ),
    )
    env = {**os.environ, **worker_environment(settings)}
    command = [
        sys.executable,
        "-m",
        "pipeline.dlq",
        "replay",
        "--reason",
        "unknown_prompt",
        "--json",
    ]
    with tail(settings, "llm.requests") as destination:
        first = subprocess.Popen(
            [*command, "--rate", "10"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            destination.wait_for(
                lambda t: sum(t.by_id(REPLAY_SOURCE).values()) >= 15, "15 replayed"
            )
        finally:
            first.kill()
            first.wait(10)
        at_kill = sum(destination.by_id(REPLAY_SOURCE).values())
        second = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
        assert second.returncode == 0, second.stderr.decode()
        destination.catch_up()
        counts = destination.by_id(REPLAY_SOURCE)
    report = json.loads(second.stdout.decode().strip().splitlines()[-1])
    print(f"killed after {at_kill} replayed; resumed run: {report}")
    assert at_kill < len(selected), "the first run must be interrupted mid-way"
    assert counts == dict.fromkeys(selected, 1), f"not exactly once: {counts}"
    assert report["sent"] + report["recovered"] <= len(selected) - 10  # the first commit held


class CrashingSelector(ReplaySelector):
    """Dies producing its fourth message: the three before it are produced, never committed."""

    calls = 0

    def outgoing(self, record: SourceRecord, item: engine.PlanItem) -> list[engine.Outgoing]:
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("simulated crash")
        return super().outgoing(record, item)


def test_markers_stop_a_resend_after_a_crash_between_flush_and_commit(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    ids = [f"crash-{i}" for i in range(10)]
    produce(settings, "llm.dlq", synthetic_dead_letters(settings, ids, "unknown_prompt"))
    group = settings.group("dlq-replay")
    sources = [settings.topic("llm.dlq")]
    _, first = replay(settings, group, limit=4)
    assert first is not None and first.sent == 4
    crashing = CrashingSelector(settings, build_filter(), group=group)
    doomed = engine.plan(settings, crashing, sources=sources, group=group)
    assert doomed.last_commit_ms is None, "a clean finish needs no recovery scan"
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.execute(settings, crashing, doomed)
    the_plan, resumed = replay(settings, group)
    assert the_plan.count("recovered") == 3 and the_plan.to_send == 3
    assert resumed is not None and (resumed.sent, resumed.recovered) == (3, 3)
    with tail(settings, "llm.requests") as destination:
        destination.catch_up()
        assert destination.by_id(REPLAY_SOURCE) == dict.fromkeys(ids, 1)
    after, _ = replay(settings, group, dry_run=True)
    assert after.last_commit_ms is None and not after.items


def test_dry_run_produces_and_commits_nothing_and_a_changed_selection_is_refused(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    ids = [f"dry-{i}" for i in range(6)]
    produce(
        settings,
        "llm.dlq",
        synthetic_dead_letters(settings, ids, "unknown_prompt")
        + synthetic_dead_letters(settings, ["dry-other"], "invalid_variables", start=6),
    )
    cli = CliRunner()
    env = worker_environment(settings)
    group = settings.group("dlq-replay")
    dry = cli.invoke(
        dlq_app, ["replay", "--reason", "unknown_prompt", "--dry-run", "--json"], env=env
    )
    assert dry.exit_code == 0, dry.output
    listed = [json.loads(line) for line in dry.stdout.splitlines() if line.startswith("{")]
    assert sorted(item["request_id"] for item in listed) == ids
    assert {item["action"] for item in listed} == {"send"}
    assert committed(settings, group, "llm.dlq") == [-1001] * 3, "a dry run must not move the group"

    limited = cli.invoke(
        dlq_app, ["replay", "--reason", "unknown_prompt", "--limit", "4", "--json"], env=env
    )
    assert limited.exit_code == 0, limited.output
    assert json.loads(limited.stdout.splitlines()[-1])["sent"] == 4
    changed = cli.invoke(dlq_app, ["replay", "--reason", "invalid_variables"], env=env)
    assert changed.exit_code == 2 and "different selection" in changed.output
    rest = cli.invoke(dlq_app, ["replay", "--reason", "unknown_prompt", "--json"], env=env)
    assert json.loads(rest.stdout.splitlines()[-1])["sent"] == 2
    other_group = cli.invoke(
        dlq_app,
        ["replay", "--reason", "invalid_variables", "--group", f"{group}-2", "--json"],
        env=env,
    )
    assert json.loads(other_group.stdout.splitlines()[-1])["sent"] == 1
    with tail(settings, "llm.requests") as destination:
        destination.catch_up()
        assert destination.by_id(REPLAY_SOURCE) == dict.fromkeys([*ids, "dry-other"], 1)
    stats = cli.invoke(dlq_app, ["stats", "--json"], env=env)
    assert json.loads(stats.stdout)["by_reason"] == {"unknown_prompt": 6, "invalid_variables": 1}


# -- 4. poison ----------------------------------------------------------------------------------


def test_a_message_that_keeps_failing_stops_at_the_max_replay_count(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    ids = ["poison-1", "poison-2"]
    group = settings.group("dlq-replay")
    with running_worker(settings, stages=("validate",)), tail(settings, "llm.dlq") as dlq:
        produce(
            settings,
            "llm.requests",
            [request(rid, "no_such_prompt", i) for i, rid in enumerate(ids)],
        )
        for round_ in range(1, 4):

            def failed(t: TopicTail, n: int = round_) -> bool:
                return t.by_id() == dict.fromkeys(ids, n)

            dlq.wait_for(failed, f"{round_} dead letters each")
            the_plan, report = replay(settings, group, reasons=["unknown_prompt"])
            assert report is not None and report.sent == 2, the_plan.items
        dlq.wait_for(lambda t: t.by_id() == dict.fromkeys(ids, 4), "4 dead letters each")
        refused_plan, refused = replay(settings, group, reasons=["unknown_prompt"])
    assert refused_plan.to_send == 0 and refused_plan.count("refuse") == 2
    assert all("replayed 3 times" in item.note for item in refused_plan.items)
    assert refused is not None and refused.sent == 0
    for rid in ids:
        history = [DeadLetterView(r) for r in dlq.records if r.request_id == rid]
        assert sorted(v.replay_count for v in history) == [0, 1, 2, 3]
        assert len({v.first_failure_at for v in history}) == 1, "first failure survives replays"


# -- 5. reparse ---------------------------------------------------------------------------------


def test_reparse_settles_stored_answers_again_without_calling_the_model(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    old = copy_prompts(tmp_path / "old")
    v2 = old / "ticket_triage" / "v2.yaml"
    v2.write_text(v2.read_text().replace("max_length: {summary: 200}", "max_length: {summary: 30}"))
    new = copy_prompts(tmp_path / "new")
    # v9 audits every accepted answer: a re-parsed result brings its audit copy, as a
    # worker's would (the same review policy on every path that settles answers).
    (new / "ticket_triage" / "v9.yaml").write_text(
        (new / "ticket_triage" / "v2.yaml").read_text().replace("version: 2", "version: 9")
        + "review:\n  audit:\n    share: 1.0\n"
    )
    rng, codec = random.Random(3), Codec()
    planned = [plan_request(f"rp-valid-{i}", "valid", rng, codec) for i in range(6)]
    planned += [plan_request(f"rp-hedge-{i}", "hedge", rng, codec) for i in range(2)]
    planned += [plan_request(f"rp-junk-{i}", "invalid_json", rng, codec) for i in range(2)]
    # A completion for a version the settle workers do not know yet (a deploy skew).
    skewed = Completion(
        validated=ValidatedRequest(
            request=Request(
                request_id="rp-skew",
                prompt="ticket_triage",
                prompt_version=9,
                variables={"subject": "Charged twice", "body": "Charged twice in May."},
            ),
            prompt=PromptRef(name="ticket_triage", version=9, hash="sha256:v9", arm="requested"),
            received_at=utc_now(),
        ),
        model="gpt-4o-mini",
        raw_text='{"label": "billing", "priority": "normal", "summary": "Charged twice in May."}',
        usage=Usage(prompt_tokens=10, completion_tokens=10),
        latency_ms=5.0,
        attempts=1,
        completed_at=utc_now(),
    )
    skew_value, skew_type = codec.encode(skewed)
    ids = [p.request_id for p in planned] + ["rp-skew"]
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, model_timeout_s=2.0, prompts_dir=old
        )
        create_topics(settings)
        with running_worker(settings):
            produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
            produce(
                settings,
                "llm.stage.completions",
                [
                    (
                        b"rp-skew",
                        skew_value,
                        [
                            ("content-type", skew_type.encode()),
                            ("x-request-id", b"rp-skew"),
                            ("traceparent", traceparent(77)),
                        ],
                    ),
                ],
            )
            before = read_terminal(settings, ids, timeout_s=30)
        assert {rid: before.first(rid).outcome for rid in ids} == {
            **{p.request_id: "result:fallback" for p in planned},
            "rp-skew": "dead_letter",
        }
        fake.reset_counters()

        settings = settings.model_copy(update={"prompts_dir": new})
        group = settings.group("dlq-reparse")

        def selector() -> ReparseSelector:
            return ReparseSelector(
                settings,
                build_filter(),
                group=group,
                registry=PromptRegistry.load(new),
                control=ControlState(),
            )

        sources = selector().source_topics
        with tail(settings, "llm.results") as results, tail(settings, "llm.review") as review:
            results.catch_up()
            review.catch_up()
            before_counts = (len(results.records), len(review.records))
            dry = engine.plan(settings, selector(), sources=sources, group=group, dry_run=True)
            notes = {i.summary["request_id"]: (i.action, i.note) for i in dry.items}
            assert dry.to_send == 9, notes
            assert {rid: a for rid, (a, _) in notes.items() if a != "send"} == {
                "rp-junk-0": "refuse",
                "rp-junk-1": "refuse",
            }
            results.catch_up()
            review.catch_up()
            assert (len(results.records), len(review.records)) == before_counts, "dry run produced"

            chosen = selector()
            the_plan = engine.plan(settings, chosen, sources=sources, group=group)
            report = engine.execute(settings, chosen, the_plan)
            assert report.sent == 9 and report.refused == 2
            assert fake.counters()["total_calls"] == 0, "re-parsing must never call the model"
            results.wait_for(lambda t: len(t.by_id(REPARSE_SOURCE)) == 7, "7 re-parsed results")
            review.wait_for(
                lambda t: len(t.by_id(REPARSE_SOURCE)) == 3, "2 re-parsed review items + 1 audit"
            )

            env = {**worker_environment(settings), "LLMPIPE_PROMPTS_DIR": str(new)}
            again = CliRunner().invoke(dlq_app, ["reparse", "--json"], env=env)
            assert again.exit_code == 0, again.output
            assert json.loads(again.stdout.splitlines()[-1])["sent"] == 0, "nothing twice"

    reparsed = [r for r in results.records if REPARSE_SOURCE in r.headers_map]
    assert sorted(r.request_id or "" for r in reparsed) == sorted(
        [f"rp-valid-{i}" for i in range(6)] + ["rp-skew"]
    )
    for record in reparsed:
        result = codec.decode(record.value or b"", Result, record.header("content-type"))
        assert (result.source, result.status, result.request_id) == (
            "model",
            "ok",
            record.request_id,
        )
        hdrs = record.headers_map
        assert (
            hdrs[h.ROUTE] == b"result" and hdrs[h.REQUEST_ID] == (record.request_id or "").encode()
        )
        assert (
            hdrs[h.PROMPT] == f"ticket_triage@{9 if record.request_id == 'rp-skew' else 2}".encode()
        )
        assert h.PROMPT_HASH in hdrs and h.CONTENT_TYPE in hdrs
        if record.request_id == "rp-skew":
            assert trace_id(hdrs["traceparent"]) == trace_id(traceparent(77))
            assert result.trace_id == trace_id(traceparent(77))
    reviewed = [r for r in review.records if REPARSE_SOURCE in r.headers_map]
    assert sorted((r.request_id, r.header(h.ROUTE), r.header(h.REASON)) for r in reviewed) == [
        ("rp-hedge-0", "review", "low_confidence"),
        ("rp-hedge-1", "review", "low_confidence"),
        ("rp-skew", ROUTE_AUDIT, "audit"),
    ]
