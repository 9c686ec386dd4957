"""Dead-letter tooling rules that need no broker: selection, headers, limits, markers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.contract.envelopes import PromptRef
from pipeline.dlq import model
from pipeline.dlq.engine import (
    PlanItem,
    _limit_stops,
    fingerprint,
    marker_value,
    parse_marker,
)
from pipeline.dlq.model import DeadLetterView, build_filter, parse_time, raw_preview, to_ms
from pipeline.dlq.render import inspect_json
from pipeline.dlq.replay import REPLAY_SOURCE, ReplaySelector, replayed_headers
from pipeline.dlq.stats import collect
from pipeline.transport import headers as h
from pipeline.transport.reader import SourceRecord

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
PREFIX = "u."


def dead_letter(
    offset: int,
    *,
    reason: str = "unknown_prompt",
    stage: str = "validate",
    value: bytes | None = None,
    request_id: str | None = "r-1",
    prompt: PromptRef | None = None,
    original: dict[str, bytes] | None = None,
    timestamp: datetime = NOW,
    partition: int = 0,
    message: str = "unknown prompt 'nope'",
) -> SourceRecord:
    body = {"request_id": request_id, "prompt": "nope", "variables": {"a": 1}}
    headers = h.dead_letter_headers(
        original if original is not None else {"content-type": b"application/json"},
        topic=f"{PREFIX}llm.requests",
        partition=2,
        offset=40 + offset,
        timestamp_ms=to_ms(timestamp) - 5,
        group=f"{PREFIX}llmpipe.validate",
        stage=stage,
        reason=reason,
        error_class="UnknownPromptError",
        error_message=message,
        attempts=1,
        request_id=request_id,
        prompt=prompt,
        now=timestamp,
    )
    return SourceRecord(
        topic=f"{PREFIX}llm.dlq",
        partition=partition,
        offset=offset,
        timestamp_ms=to_ms(timestamp),
        key=(request_id or "k").encode(),
        value=value if value is not None else json.dumps(body).encode(),
        headers=tuple(headers),
    )


def test_replayed_headers_keep_everything_bump_the_count_and_mark_the_source() -> None:
    record = dead_letter(0, original={"traceparent": b"00-aa-bb-01", "x-ordered": b"1"})
    bumped = replayed_headers(record.headers, 0, b"g|t|0|0")
    names = [k for k, _ in bumped]
    assert names[: len(record.headers)] == [k for k, _ in record.headers]
    assert dict(bumped)[h.DLQ_REPLAY_COUNT] == b"1"
    assert dict(bumped)[REPLAY_SOURCE] == b"g|t|0|0"
    for name, value in record.headers:
        if name != h.DLQ_REPLAY_COUNT:
            assert dict(bumped)[name] == value
    again = replayed_headers(bumped, 1, b"g|t|0|9")
    assert dict(again)[h.DLQ_REPLAY_COUNT] == b"2"
    assert [v for k, v in again if k == REPLAY_SOURCE] == [b"g|t|0|9"]


def test_a_replayed_message_that_fails_again_keeps_its_history() -> None:
    first = dead_letter(0, timestamp=NOW - timedelta(hours=3))
    replayed = h.as_map(replayed_headers(first.headers, 0, b"g|t|0|0"))
    refailed = h.as_map(
        h.dead_letter_headers(
            replayed,
            topic="t",
            partition=0,
            offset=1,
            timestamp_ms=0,
            group="g",
            stage="validate",
            reason="unknown_prompt",
            error_class="E",
            error_message="m",
            attempts=1,
            request_id="r-1",
            prompt=None,
            now=NOW,
        )
    )
    assert refailed[h.DLQ_REPLAY_COUNT] == b"1"
    assert refailed[h.DLQ_FIRST_FAILURE] == first.headers_map[h.DLQ_FIRST_FAILURE]
    assert REPLAY_SOURCE not in refailed, "the recovery marker must not outlive its replay"


def test_filters_select_on_every_dimension() -> None:
    ref = PromptRef(name="ticket_triage", version=2, hash="sha256:x")
    records = [
        dead_letter(0),
        dead_letter(1, reason="invalid_variables", prompt=ref, message="body is required"),
        dead_letter(2, stage="settle", reason="unknown_prompt_version", request_id="r-2"),
        dead_letter(3, timestamp=NOW - timedelta(days=2), request_id="r-3"),
    ]
    facts = [DeadLetterView(r).facts() for r in records]

    def picked(**kwargs: Any) -> list[int]:
        selection = build_filter(now=NOW, **kwargs)
        return [r.offset for r, f in zip(records, facts, strict=True) if selection.matches(f)]

    assert picked() == [0, 1, 2, 3]
    assert picked(reasons=["invalid_variables"]) == [1]
    assert picked(stages=["settle"]) == [2]
    assert picked(prompt="ticket_triage", version=2) == [1]
    assert picked(prompt="nope") == [0, 2, 3]  # read from the request when x-prompt is absent
    assert picked(since="1d") == [0, 1, 2]
    assert picked(until="1d") == [3]
    assert picked(request_ids=["r-2", "r-3"]) == [2, 3]
    assert picked(grep="BODY IS") == [1]
    assert picked(grep="unknownprompterror", reasons=["unknown_prompt"]) == [0, 3]


def test_times_are_iso_or_ages_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_time("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_time("2025-03-01T10:00:00", NOW) == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_time("2025-03-01T10:00:00Z", NOW) == datetime(2025, 3, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday", NOW)
    with pytest.raises(ValueError, match="not before"):
        build_filter(since="1h", until="2h", now=NOW)


def test_undecodable_values_are_shown_escaped_and_truncated() -> None:
    record = dead_letter(0, reason="decode_error", value=b"\xff\x00\x1b[31m" + b"x" * 500)
    shown = inspect_json(DeadLetterView(record))
    assert shown["decoded"] is None
    assert shown["raw"]["length"] == 507
    assert "\x1b" not in shown["raw"]["repr"], "terminal escapes must never be printed raw"
    assert shown["raw"]["repr"].startswith("b'\\xff\\x00\\x1b[31m")
    assert shown["raw"]["hex"].startswith("ff 00 1b")
    assert raw_preview(None)["length"] == 0
    decoded = inspect_json(DeadLetterView(dead_letter(1)))
    assert decoded["decoded"]["prompt"] == "nope" and "raw" not in decoded


def test_limit_cuts_partitions_at_offsets_oldest_first() -> None:
    def item(partition: int, offset: int, minute: int, action: str = "send") -> PlanItem:
        ts = to_ms(NOW + timedelta(minutes=minute))
        return PlanItem(("t", partition, offset), ts, action, "", "d")  # type: ignore[arg-type]

    items = [
        item(0, 0, 0),
        item(0, 1, 5, "refuse"),
        item(0, 2, 6),
        item(1, 0, 1),
        item(1, 3, 2),
        item(1, 4, 9),
    ]
    ranges = {("t", 0): (0, 10), ("t", 1): (0, 10), ("t", 2): (0, 10)}
    assert _limit_stops(ranges, items, None) == {("t", 0): 10, ("t", 1): 10, ("t", 2): 10}
    # Oldest three sends: p0@0 (0 min), p1@0 (1), p1@3 (2). The next send of each partition
    # is where that partition stops, so nothing selected is ever committed unsent.
    assert _limit_stops(ranges, items, 3) == {("t", 0): 2, ("t", 1): 4, ("t", 2): 10}
    assert _limit_stops(ranges, items, 0) == {("t", 0): 0, ("t", 1): 0, ("t", 2): 10}


def test_markers_round_trip_and_fingerprints_track_the_selection_only() -> None:
    record = dead_letter(7, partition=2)
    assert parse_marker(marker_value("my|group", record)) == ("my|group", "u.llm.dlq", 2, 7)
    assert parse_marker(b"garbage") is None
    settings = Settings(topic_prefix=PREFIX)

    def fp(**kwargs: Any) -> str:
        options = {"group": "g", **kwargs}
        selection = options.pop("selection", build_filter(reasons=["a"], now=NOW))
        return fingerprint(ReplaySelector(settings, selection, **options))

    assert fp() == fp()
    assert fp() != fp(selection=build_filter(reasons=["b"], now=NOW))
    assert fp() != fp(to="llm.other")
    assert fp() != fp(max_replays=5)
    assert fp() != fp(force=True)
    # A relative age is part of the spelled selection, not its resolved instant, so the same
    # command can resume later.
    assert fp(selection=build_filter(since="2h", now=NOW)) == fp(
        selection=build_filter(since="2h", now=NOW + timedelta(minutes=30))
    )


def test_replay_selector_refuses_poison_and_routes_to_the_original_topic() -> None:
    settings = Settings(topic_prefix=PREFIX)
    selector = ReplaySelector(settings, build_filter(now=NOW), group="g", max_replays=2)
    fresh = dead_letter(0)
    item = selector.consider(fresh)
    assert item is not None and item.action == "send"
    assert item.destination == f"{PREFIX}llm.requests"
    [out] = selector.outgoing(fresh, item)
    assert (out.topic, out.partition, out.key, out.value) == (
        f"{PREFIX}llm.requests",
        2,
        fresh.key,
        fresh.value,
    )
    poison = SourceRecord(
        fresh.topic,
        0,
        1,
        fresh.timestamp_ms,
        fresh.key,
        fresh.value,
        replayed_headers(replayed_headers(fresh.headers, 0, b"m"), 1, b"m"),
    )
    refused = selector.consider(poison)
    assert refused is not None and refused.action == "refuse"
    assert "replayed 2 times" in refused.note
    forced = ReplaySelector(settings, build_filter(now=NOW), group="g", max_replays=2, force=True)
    assert (forced.consider(poison) or item).action == "send"
    moved = ReplaySelector(settings, build_filter(now=NOW), group="g", to="llm.scratch")
    moved_item = moved.consider(fresh)
    assert moved_item is not None
    assert moved.outgoing(fresh, moved_item)[0].partition is None  # key-hashed elsewhere


def test_stats_group_by_reason_stage_prompt_oldest_first() -> None:
    ref = PromptRef(name="ticket_triage", version=2, hash="sha256:x")
    records = [
        dead_letter(0, timestamp=NOW - timedelta(minutes=5)),
        dead_letter(1, timestamp=NOW - timedelta(days=3), reason="invalid_variables", prompt=ref),
        dead_letter(2, timestamp=NOW - timedelta(hours=2)),
        dead_letter(3, timestamp=NOW - timedelta(days=9), reason="invalid_variables", prompt=ref),
    ]
    stats = collect(records, build_filter(now=NOW), NOW)
    assert stats.total == 4
    assert [(g.reason, g.prompt, g.count) for g in stats.groups] == [
        ("invalid_variables", "ticket_triage@2", 2),
        ("unknown_prompt", "nope@latest", 2),
    ]
    summary = stats.as_dict(NOW)
    assert summary["by_age"] == {"< 1h": 1, "1h-24h": 1, "1d-7d": 1, ">= 7d": 1}
    assert summary["oldest_age_s"] == 9 * 86_400


def test_huge_requests_are_clipped_before_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = json.dumps({"request_id": "r", "prompt": "p", "variables": {"body": "x" * 1_200_000}})
    record = dead_letter(0, reason="too_large", value=huge.encode())
    redacted: list[int] = []
    redact_text = model.DEFAULT_REDACTOR.text

    def recording(text: str) -> str:
        redacted.append(len(text))
        return redact_text(text)

    monkeypatch.setattr(model.DEFAULT_REDACTOR, "text", recording)
    shown = inspect_json(DeadLetterView(record))
    # The redactor saw the body, and only its clipped form (not the megabyte).
    assert redacted and max(redacted) <= model.MAX_SHOWN_CHARS + 100, max(redacted)
    body = shown["decoded"]["variables"]["body"]
    assert body.startswith("x" * 100) and body.endswith("[1198000 more characters]")
