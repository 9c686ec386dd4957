"""``llmpipe prompts shadow``: replay recent production requests on a candidate version.

Before a candidate gets canary traffic, the cheapest evidence is how it
would have answered the requests the serving version just answered. The
shadow run reads them from ``llm.stage.validated`` (which records the
version that served each one) and their outcomes from the terminal topics,
runs the candidate on the same variables through the same stage code as
the workers (:mod:`pipeline.evaluation.harness`), and compares.

It is read-only towards the pipeline by construction: consumers are
assigned partitions directly and never commit (so no consumer group's
position moves), and no producer is created, so nothing can reach
``llm.results`` or any other topic. The model *is* called, once per
replayed request plus re-asks, so ``--limit`` bounds the cost.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import Escalation, Result, ValidatedRequest
from pipeline.contract.topology import DLQ, FALLBACK, RESULTS, REVIEW, VALIDATED
from pipeline.evaluation.harness import ROUTES, Outcome, StageHarness
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.model_call import CallingClient
from pipeline.transport import headers as h
from pipeline.transport import reader

OUTCOME_TOPICS = (RESULTS, REVIEW, FALLBACK, DLQ)
NOT_FOUND = "not found"
# Look a little before the oldest sampled request: a clock skew between
# producers must not hide its outcome.
_OUTCOME_SLACK_MS = 60_000


@dataclass(frozen=True)
class Served:
    """One production request as the serving version saw it, and where it ended."""

    validated: ValidatedRequest
    timestamp_ms: int
    outcome: Outcome | None = None

    @property
    def request_id(self) -> str:
        return self.validated.request.request_id


@dataclass(frozen=True)
class ArmStats:
    """Summary of one arm; ``None`` means "no data" (not zero) so the table can say so."""

    label: str
    requests: int
    found: int
    answer_valid: int
    routes: Counter[str]
    confidence_mean: float | None
    confidence_p50: float | None
    confidence_p90: float | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def answer_valid_rate(self) -> float | None:
        return self.answer_valid / self.found if self.found else None

    @property
    def tokens_per_request(self) -> float | None:
        return (self.prompt_tokens + self.completion_tokens) / self.found if self.found else None


@dataclass(frozen=True)
class Difference:
    request_id: str
    serving: Outcome | None
    candidate: Outcome


@dataclass(frozen=True)
class ShadowReport:
    name: str
    candidate: int
    serving: ArmStats
    shadow: ArmStats
    compared: int
    agreeing: int
    differences: list[Difference] = field(default_factory=list)


# -- pure parts ----------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile: always a value that occurred, which reads better for scores."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def arm_stats(label: str, outcomes: Sequence[Outcome | None]) -> ArmStats:
    found = [o for o in outcomes if o is not None]
    scores = [o.confidence for o in found if o.confidence is not None]
    routes: Counter[str] = Counter(o.route for o in found)
    missing = len(outcomes) - len(found)
    if missing:
        routes[NOT_FOUND] = missing
    return ArmStats(
        label=label,
        requests=len(outcomes),
        found=len(found),
        answer_valid=sum(1 for o in found if o.answer_valid),
        routes=routes,
        confidence_mean=sum(scores) / len(scores) if scores else None,
        confidence_p50=percentile(scores, 0.5),
        confidence_p90=percentile(scores, 0.9),
        prompt_tokens=sum(o.usage.prompt_tokens for o in found),
        completion_tokens=sum(o.usage.completion_tokens for o in found),
    )


def same_answer(a: Outcome | None, b: Outcome | None) -> bool:
    """Same route and the same delivered output; confidence and tokens may differ."""
    if a is None or b is None:
        return False
    return a.route == b.route and _canonical(a.output) == _canonical(b.output)


def serving_label(served: Sequence[Served]) -> str:
    """E.g. ``ticket_triage@1 (control) x40, @2 (canary) x10``: what actually served the sample."""
    counts = Counter((s.validated.prompt.version, s.validated.prompt.arm) for s in served)
    if not counts:
        return "serving"
    name = served[0].validated.prompt.name
    parts = [f"@{v} ({arm}) x{n}" for (v, arm), n in sorted(counts.items())]
    return name + ", ".join(parts)


def compare(
    name: str,
    candidate: int,
    served: Sequence[Served],
    shadow: Mapping[str, Outcome],
    samples: int = 5,
) -> ShadowReport:
    """Compare what served (from Kafka) with what the candidate did, request by request."""
    differences = [
        Difference(s.request_id, s.outcome, shadow[s.request_id])
        for s in served
        if s.request_id in shadow and not same_answer(s.outcome, shadow[s.request_id])
    ]
    compared = sum(1 for s in served if s.outcome is not None and s.request_id in shadow)
    agreeing = sum(
        1 for s in served if s.request_id in shadow and same_answer(s.outcome, shadow[s.request_id])
    )
    return ShadowReport(
        name=name,
        candidate=candidate,
        serving=arm_stats(serving_label(served), [s.outcome for s in served]),
        shadow=arm_stats(
            f"{name}@{candidate} (shadow)",
            [shadow[s.request_id] for s in served if s.request_id in shadow],
        ),
        compared=compared,
        agreeing=agreeing,
        differences=differences[:samples],
    )


def resolve_outcome(sightings: Mapping[str, list[Outcome]]) -> Outcome | None:
    """The pipeline's final route for one request, from what each topic holds for it.

    A model or fallback result is final. A review item is the pipeline's
    final route even when a human later answered (that answer is a result
    with source "human", reported as route review). An escalation still on
    ``llm.fallback`` with nothing after it has not settled yet: not found.
    """
    results = sightings.get(RESULTS, [])
    for result in results:
        if result.route in ("result", "fallback"):
            return result
    for topic in (REVIEW, DLQ):
        if sightings.get(topic):
            return sightings[topic][-1]
    return results[-1] if results else None


def report_renderable(report: ShadowReport) -> Group:
    serving, shadow = report.serving, report.shadow
    table = Table(title=f"shadow: {report.name}@{report.candidate} vs serving", expand=False)
    table.add_column("metric")
    table.add_column(serving.label, overflow="fold")
    table.add_column(shadow.label, overflow="fold")
    table.add_row("requests", str(serving.requests), str(shadow.requests))
    table.add_row("outcome found", str(serving.found), str(shadow.found))
    table.add_row(
        "pass rate (valid model answer)",
        _rate(serving.answer_valid, serving.found),
        _rate(shadow.answer_valid, shadow.found),
    )
    for route in (*ROUTES, NOT_FOUND):
        if serving.routes.get(route) or shadow.routes.get(route):
            table.add_row(
                f"route {route}",
                _rate(serving.routes.get(route, 0), serving.requests),
                _rate(shadow.routes.get(route, 0), shadow.requests),
            )
    for metric, attribute in (("mean", "confidence_mean"), ("p50", "confidence_p50")):
        table.add_row(
            f"confidence {metric}",
            _num(getattr(serving, attribute)),
            _num(getattr(shadow, attribute)),
        )
    table.add_row("confidence p90", _num(serving.confidence_p90), _num(shadow.confidence_p90))
    table.add_row(
        "tokens (prompt + completion)",
        f"{serving.prompt_tokens} + {serving.completion_tokens}",
        f"{shadow.prompt_tokens} + {shadow.completion_tokens}",
    )
    table.add_row(
        "tokens per request",
        _num(serving.tokens_per_request, 0),
        _num(shadow.tokens_per_request, 0),
    )
    table.add_row(
        "same route and output",
        f"{report.agreeing} of {report.compared}",
        "",
    )
    parts: list[Any] = [table]
    if report.differences:
        diff = Table(title=f"differing outputs (first {len(report.differences)})", expand=False)
        diff.add_column("request", overflow="fold")
        diff.add_column("serving", overflow="fold")
        diff.add_column("candidate", overflow="fold")
        for d in report.differences:
            diff.add_row(d.request_id, _brief(d.serving), _brief(d.candidate))
        parts.append(diff)
    return Group(*parts)


# -- Kafka reading (the bounded reader: assign only, never commit, never produce) -------


def read_served(
    settings: Settings,
    name: str,
    limit: int,
    scan: int = 5_000,
    exclude_version: int | None = None,
    codec: Codec | None = None,
) -> list[Served]:
    """The ``limit`` most recent validated requests for ``name``, newest first.

    Reads at most ``scan`` messages back from the end of each partition, so
    the cost is bounded however long the topic's retention is. Requests
    served by ``exclude_version`` (the candidate, e.g. during a canary) are
    skipped: comparing the candidate with itself says nothing.
    """
    codec = codec or Codec()
    topic = settings.topic(VALIDATED)
    newest: dict[str, Served] = {}
    consumer = reader.reader_consumer(settings)
    try:
        reader.require_broker(consumer, settings)
        ranges = {
            tp: (max(start, end - scan), end)
            for tp, (start, end) in reader.snapshot_ranges(consumer, [topic]).items()
        }
        for record in reader.read_ranges(consumer, ranges):
            if record.value is None:
                continue
            try:
                validated = codec.decode(
                    record.value, ValidatedRequest, record.header(h.CONTENT_TYPE)
                )
            except DecodeError:
                continue
            if validated.prompt.name != name or validated.prompt.version == exclude_version:
                continue
            served = Served(validated, record.timestamp_ms or 0)
            previous = newest.get(served.request_id)
            if previous is None or previous.timestamp_ms <= served.timestamp_ms:
                newest[served.request_id] = served
    finally:
        consumer.close()
    return heapq.nlargest(limit, newest.values(), key=lambda s: s.timestamp_ms)


def read_outcomes(
    settings: Settings, served: Sequence[Served], codec: Codec | None = None
) -> list[Served]:
    """Attach to each request the outcome the pipeline produced for it (None if none yet).

    Starts each partition at the offset of the oldest sampled request's time
    (``offsets_for_times``), not at the beginning, so a long retention does
    not make a shadow run slow.
    """
    if not served:
        return []
    codec = codec or Codec()
    wanted = {s.request_id for s in served}
    since = min(s.timestamp_ms for s in served) - _OUTCOME_SLACK_MS
    logical = {settings.topic(t): t for t in OUTCOME_TOPICS}
    sightings: dict[str, dict[str, list[Outcome]]] = {}
    for record in reader.scan(settings, logical, since_ms=max(since, 0)):
        rid = record.header(h.REQUEST_ID)
        if rid is None or rid not in wanted:
            continue
        topic = logical[record.topic]
        outcome = _decode_outcome(codec, topic, record)
        if outcome is not None:
            sightings.setdefault(rid, {}).setdefault(topic, []).append(outcome)
    return [
        Served(s.validated, s.timestamp_ms, resolve_outcome(sightings.get(s.request_id, {})))
        for s in served
    ]


def _decode_outcome(codec: Codec, topic: str, record: reader.SourceRecord) -> Outcome | None:
    content_type = record.header(h.CONTENT_TYPE)
    value = record.value or b""
    try:
        if topic == RESULTS:
            return Outcome.from_result(codec.decode(value, Result, content_type))
        if topic in (REVIEW, FALLBACK):
            escalation = codec.decode(value, Escalation, content_type)
            return Outcome.from_review(escalation) if topic == REVIEW else None
    except DecodeError:
        return None
    return Outcome(
        route="dead_letter",
        reason=record.header(h.DLQ_REASON),
        detail=record.header(h.DLQ_ERROR_MESSAGE) or "",
    )


# -- running the candidate -----------------------------------------------------------------


async def run_candidate(
    registry: PromptRegistry,
    candidate: PromptVersion,
    served: Iterable[Served],
    client: CallingClient,
    concurrency: int = 8,
    timeout_cap_s: float = 30.0,
) -> dict[str, Outcome]:
    """The candidate's outcome for each request, by request id.

    The deadline is dropped: replayed requests are old, and a passed
    deadline would send every one of them straight to the fallback without
    asking the model, which is not what is being evaluated.
    """
    harness = StageHarness(registry, timeout_cap_s)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(s: Served) -> tuple[str, Outcome]:
        request = s.validated.request.model_copy(
            update={"prompt_version": candidate.version, "deadline": None}
        )
        async with gate:
            return s.request_id, await harness.run(request, client)

    pairs = await asyncio.gather(*(one(s) for s in served))
    return dict(pairs)


async def shadow_run(
    settings: Settings,
    registry: PromptRegistry,
    name: str,
    candidate: int,
    limit: int,
    client: CallingClient,
    scan: int = 5_000,
    samples: int = 5,
    concurrency: int = 8,
) -> ShadowReport:
    """Read, replay and compare; the blocking Kafka reads run in a thread."""
    version = registry.get(name, candidate)
    served = await asyncio.to_thread(read_served, settings, name, limit, scan, candidate)
    served = await asyncio.to_thread(read_outcomes, settings, served)
    outcomes = await run_candidate(
        registry, version, served, client, concurrency, settings.model_timeout_s
    )
    return compare(name, candidate, served, outcomes, samples)


# -- formatting ----------------------------------------------------------------------------


def _canonical(output: dict[str, Any] | None) -> str:
    return json.dumps(output, sort_keys=True, ensure_ascii=False)


def _rate(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.0%})" if total else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _brief(outcome: Outcome | None) -> str:
    if outcome is None:
        return NOT_FOUND
    head = outcome.route + (f" ({outcome.reason})" if outcome.reason else "")
    body = _canonical(outcome.output) if outcome.output is not None else "no output"
    return f"{head}: {body if len(body) <= 240 else body[:239] + '…'}"
