"""What reviews teach: corrections as fine-tuning data, verdicts as a calibration check.

Both read Kafka (the source of truth) rather than the review database, so they work from
any machine that can reach the cluster, and give the same answer however often the
database was rebuilt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Correction, Escalation, ReviewDecision
from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.review.kafka_io import (
    CORRECTIONS_TOPIC,
    DECISIONS_TOPIC,
    REVIEW_TOPIC,
    read_to_end,
)
from pipeline.review.model import CalibrationRow

ACTIONS = ("approve", "edit", "reject", "clarify")

# -- export ---------------------------------------------------------------------------


def training_records(
    corrections: Iterable[Correction],
    registry: PromptRegistry,
    since: datetime | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """One chat-format record per correction: the prompt as the model saw it, then the
    answer it should have given.

    The messages are re-rendered from the prompt version the request used, so a record
    is skipped (and reported) when that version is not loaded or its content hash
    differs: training on a prompt the model never saw would teach the wrong mapping.
    A request corrected twice (impossible by design, but topics can be replayed)
    contributes its first correction only.
    """
    seen: set[str] = set()
    for correction in corrections:
        if since is not None and correction.decided_at < since:
            continue
        if correction.request_id in seen:
            continue
        seen.add(correction.request_id)
        ref = correction.prompt
        try:
            prompt = registry.get(ref.name, ref.version)
            messages = render_messages(prompt, correction.variables)
        except PromptError as exc:
            if on_skip is not None:
                on_skip(f"{correction.request_id}: {exc}")
            continue
        if prompt.content_hash != ref.hash:
            if on_skip is not None:
                on_skip(
                    f"{correction.request_id}: {ref.ref} here has hash {prompt.content_hash}, "
                    f"the request used {ref.hash}"
                )
            continue
        answer = json.dumps(correction.corrected_output, ensure_ascii=False, separators=(",", ":"))
        yield {
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "metadata": {
                "request_id": correction.request_id,
                "prompt": ref.ref,
                "prompt_hash": ref.hash,
                "reviewer": correction.reviewer,
                "decided_at": correction.decided_at.isoformat(),
                "original_output": correction.original_output,
            },
        }


def read_corrections(
    settings: Settings, on_skip: Callable[[str], None] | None = None
) -> Iterator[Correction]:
    for correction, _ in read_to_end(settings, CORRECTIONS_TOPIC, Correction, on_skip=on_skip):
        yield correction


# -- calibration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    low: float
    high: float
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def approve_rate(self) -> float | None:
        return self.counts["approve"] / self.total if self.total else None


@dataclass(frozen=True)
class Suggestion:
    """The accept threshold that would have misrouted the fewest reviewed items.

    Routing "right" means: an item the reviewer approved is at or above the threshold
    (it did not need a human), anything edited, rejected or clarified is below it.
    """

    threshold: float
    bad_accepts: int
    needless_reviews: int
    total: int

    @property
    def misrouted(self) -> int:
        return self.bad_accepts + self.needless_reviews


@dataclass(frozen=True)
class Calibration:
    prompt: str
    version: int | None
    """None for all versions together."""
    buckets: list[Bucket]
    suggestion: Suggestion | None
    current_accept: float | None
    counts: dict[str, int] = field(default_factory=dict)


def suggest_threshold(
    rows: Iterable[CalibrationRow], bad_accept_cost: float = 1.0
) -> Suggestion | None:
    """Try every observed confidence (and 1.0) as the threshold; keep the cheapest.

    ``bad_accept_cost`` weighs an output that would have gone out unreviewed although a
    reviewer changed it, against a review that was not needed. Ties go to the higher
    threshold: when the data cannot tell, review more.
    """
    data = [(r.confidence, r.action == "approve") for r in rows]
    if not data:
        return None
    best: tuple[float, float, int, int] | None = None
    for threshold in sorted({c for c, _ in data} | {1.0}):
        bad = sum(1 for c, ok in data if c >= threshold and not ok)
        needless = sum(1 for c, ok in data if c < threshold and ok)
        cost = bad * bad_accept_cost + needless
        if best is None or cost <= best[0]:
            best = (cost, threshold, bad, needless)
    assert best is not None
    _, threshold, bad, needless = best
    return Suggestion(round(threshold, 4), bad, needless, len(data))


def buckets_of(rows: Iterable[CalibrationRow], count: int = 10) -> list[Bucket]:
    counts = [dict.fromkeys(ACTIONS, 0) for _ in range(count)]
    for row in rows:
        index = min(count - 1, max(0, int(row.confidence * count)))
        counts[index][row.action if row.action in ACTIONS else "reject"] += 1
    return [Bucket(i / count, (i + 1) / count, c) for i, c in enumerate(counts)]


def calibrate(
    prompt: str,
    rows: list[CalibrationRow],
    registry: PromptRegistry | None = None,
    *,
    buckets: int = 10,
    bad_accept_cost: float = 1.0,
) -> list[Calibration]:
    """All versions together first, then each version (thresholds are per version)."""

    def current(version: int | None) -> float | None:
        if registry is None:
            return None
        try:
            return registry.get(prompt, version).confidence.accept
        except PromptError:
            return None

    def one(version: int | None, subset: list[CalibrationRow]) -> Calibration:
        counts = dict.fromkeys(ACTIONS, 0)
        for row in subset:
            counts[row.action] = counts.get(row.action, 0) + 1
        return Calibration(
            prompt=prompt,
            version=version,
            buckets=buckets_of(subset, buckets),
            suggestion=suggest_threshold(subset, bad_accept_cost),
            current_accept=current(version),
            counts=counts,
        )

    report = [one(None, rows)]
    for version in sorted({r.prompt_version for r in rows}):
        report.append(one(version, [r for r in rows if r.prompt_version == version]))
    return report


def rows_from_kafka(
    settings: Settings, prompt: str, on_skip: Callable[[str], None] | None = None
) -> list[CalibrationRow]:
    """Join review items with their decisions, straight from the two topics."""
    codec = Codec()
    confidence: dict[str, tuple[int, float]] = {}
    for escalation, _ in read_to_end(settings, REVIEW_TOPIC, Escalation, codec, on_skip=on_skip):
        ref = escalation.validated.prompt
        if ref.name == prompt and escalation.confidence is not None:
            request_id = escalation.validated.request.request_id
            confidence.setdefault(request_id, (ref.version, escalation.confidence))
    rows: dict[str, CalibrationRow] = {}
    for decision, _ in read_to_end(
        settings, DECISIONS_TOPIC, ReviewDecision, codec, on_skip=on_skip
    ):
        known = confidence.get(decision.request_id)
        if known is not None and decision.request_id not in rows:
            rows[decision.request_id] = CalibrationRow(known[0], known[1], decision.action)
    return list(rows.values())
