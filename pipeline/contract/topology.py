"""The pipeline's shape, written once: every topic, every route and every stage.

Anything that needs to know where a message goes or what it holds reads this module: the
worker (which stages exist, what each consumes), the stage logic (where to send a
decision), the DLQ tools (what a dead letter's value is, where to replay it), the prompt
test harness (which stage follows a decision), ``llmpipe trace`` (the order and meaning of
a request's hops), the ledger (where a request ends) and the metrics (which routes are
terminal). Nothing else spells a topic name.

Names are *logical*: ``Settings.topic`` adds the deployment's prefix. Topic configuration
(partitions, retention, compaction) lives in ``topics/*.yaml``; the stage logic lives in
``pipeline/stages/`` and the handler each stage runs in ``pipeline/stages/table.py``
(which sits above the stages, so the names here stay in the lowest layer).

The tables are plain dicts read at call time, never copied at import, so a test can add a
throw-away stage or route with ``monkeypatch.setitem`` and see every reader pick it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.contract.envelopes import (
    Completion,
    ControlEvent,
    Correction,
    Envelope,
    Escalation,
    FleetEvent,
    Request,
    Result,
    ReviewDecision,
    ValidatedRequest,
)

# -- topics (logical names) -------------------------------------------------------------
REQUESTS = "llm.requests"
VALIDATED = "llm.stage.validated"
COMPLETIONS = "llm.stage.completions"
FALLBACK = "llm.fallback"
REVIEW = "llm.review"
REVIEW_DECISIONS = "llm.review.decisions"
RESULTS = "llm.results"
CORRECTIONS = "llm.corrections"
DLQ = "llm.dlq"
CONTROL = "llm.control"
FLEET = "llm.fleet"

# -- routes: where a stage decision sends a message ------------------------------------
ROUTE_VALIDATED = "validated"
ROUTE_COMPLETION = "completion"
ROUTE_RESULT = "result"
ROUTE_FALLBACK = "fallback"
ROUTE_REVIEW = "review"
ROUTE_DEAD_LETTER = "dead_letter"
ROUTE_AUDIT = "audit"
"""Not a topic's route: an audit copy of an accepted result on ``llm.review`` (a verdict is
wanted, the request is already done; see ``Emit.also``)."""

# -- stages -----------------------------------------------------------------------------
VALIDATE = "validate"
MODEL = "model"
SETTLE = "settle"
FALLBACK_STAGE = "fallback"


@dataclass(frozen=True)
class Topic:
    """One topic: what its values are and what a message there means for a request.

    ``envelope`` is ``None`` for ``llm.dlq``, whose values are the refused bytes as they
    arrived. ``route`` names the route a stage decision takes to produce here (``None``:
    no stage produces here; requests, human decisions, corrections and control come from
    outside the stage runners). ``terminal`` marks where a request's journey ends.
    ``step`` is the timeline label ``llmpipe trace`` shows; ``None`` keeps the topic out
    of request timelines (control events belong to no request).
    """

    name: str
    envelope: type[Envelope] | None
    route: str | None = None
    terminal: bool = False
    step: str | None = None


@dataclass(frozen=True)
class Stage:
    """One stage: a consumer group on ``input_topic`` whose messages hold
    ``input_envelope`` (also what the value of a dead letter from this stage is).

    ``outputs`` wires the stage: each outcome the stage logic names (``result``,
    ``fallback``, ...; the route names of the default topics) to the topic it is produced
    to. Stages ask :func:`output` instead of naming topics, so a stage inserted after
    another one is wired here, not in the other stage's code. Every stage may also
    dead-letter. A ``raw`` stage is handed the bytes as they arrived and decodes them
    itself: for validate, decoding is part of the validation."""

    name: str
    input_topic: str
    input_envelope: type[Envelope]
    outputs: Mapping[str, str]
    raw: bool = False


# In pipeline order: ``llmpipe trace`` breaks timestamp ties with it.
TOPICS: dict[str, Topic] = {
    t.name: t
    for t in (
        Topic(REQUESTS, Request, step="request received"),
        Topic(VALIDATED, ValidatedRequest, ROUTE_VALIDATED, step="validated"),
        Topic(COMPLETIONS, Completion, ROUTE_COMPLETION, step="model answered"),
        Topic(FALLBACK, Escalation, ROUTE_FALLBACK, step="sent to fallback"),
        Topic(REVIEW, Escalation, ROUTE_REVIEW, terminal=True, step="sent to review"),
        Topic(REVIEW_DECISIONS, ReviewDecision, step="human decision"),
        Topic(RESULTS, Result, ROUTE_RESULT, terminal=True, step="result"),
        Topic(CORRECTIONS, Correction, step="correction"),
        Topic(DLQ, None, ROUTE_DEAD_LETTER, terminal=True, step="dead letter"),
        Topic(CONTROL, ControlEvent),
        Topic(FLEET, FleetEvent),
    )
}

# In pipeline order: the worker's default ``--stages``.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            VALIDATE,
            REQUESTS,
            Request,
            {ROUTE_VALIDATED: VALIDATED, ROUTE_FALLBACK: FALLBACK},
            raw=True,
        ),
        Stage(
            MODEL,
            VALIDATED,
            ValidatedRequest,
            {ROUTE_COMPLETION: COMPLETIONS, ROUTE_FALLBACK: FALLBACK},
        ),
        Stage(
            SETTLE,
            COMPLETIONS,
            Completion,
            {ROUTE_RESULT: RESULTS, ROUTE_FALLBACK: FALLBACK, ROUTE_REVIEW: REVIEW},
        ),
        Stage(
            FALLBACK_STAGE,
            FALLBACK,
            Escalation,
            {ROUTE_RESULT: RESULTS, ROUTE_REVIEW: REVIEW},
        ),
    )
}


class UnknownRoute(LookupError):
    """A topic no stage decision may produce to (a programming error, not user input)."""


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


def output(stage: str, outcome: str) -> str:
    """The topic ``stage`` produces an ``outcome`` to."""
    try:
        return STAGES[stage].outputs[outcome]
    except KeyError:
        raise UnknownRoute(f"stage {stage!r} has no output {outcome!r}") from None


def route_of(topic: str) -> str:
    """The route a decision producing to ``topic`` takes."""
    route = TOPICS[topic].route if topic in TOPICS else None
    if route is None:
        raise UnknownRoute(f"no route produces to {topic!r}")
    return route


def topic_of(route: str) -> str:
    """The topic a route produces to."""
    for topic in TOPICS.values():
        if topic.route == route:
            return topic.name
    raise UnknownRoute(f"unknown route {route!r}")


def terminal_routes() -> frozenset[str]:
    return frozenset(t.route for t in TOPICS.values() if t.terminal and t.route is not None)


def terminal_topics() -> tuple[str, ...]:
    """Where a request's journey ends: exactly one of these holds each request."""
    return tuple(t.name for t in TOPICS.values() if t.terminal)


def journey_topics() -> tuple[str, ...]:
    """Every topic a request's messages can be on, in pipeline order."""
    return tuple(t.name for t in TOPICS.values() if t.step is not None)


def stage_reading(topic: str) -> Stage | None:
    """The stage that consumes ``topic``, if any (a terminal topic has none)."""
    for stage in STAGES.values():
        if stage.input_topic == topic:
            return stage
    return None


def decoded_inputs() -> frozenset[str]:
    """The topics stages read as envelopes through the codec (every input but a raw
    stage's): what the runner asks the codec to remember when it encodes outputs."""
    return frozenset(stage.input_topic for stage in STAGES.values() if not stage.raw)
