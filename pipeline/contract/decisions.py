"""What a stage decided for one input message: the contract between stages and the edge.

A decision is either messages to produce (:class:`Emit`) or a dead letter. Keeping this a
value (not a side effect) is what lets the transport produce first and commit after, and
lets tests assert on decisions without a broker. It lives in the contract layer because
both sides read it: stages build decisions, the Kafka edge and the metrics consume them.

One input may produce more than one message: an :class:`Emit` carries the request's one
terminal output plus ``also``, copies that must be written with it, atomically (in the same
transaction as the output and the input offset). Today the only copy is the audit item of
an accepted result (route ``audit`` on ``llm.review``): the result is delivered at once and
a person is asked for a verdict on it. A copy is never terminal; ``Emit.outputs()`` is what
a transport produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pipeline.contract import topology
from pipeline.contract.envelopes import Envelope, Escalation, PromptRef, Result, utc_now


@dataclass(frozen=True)
class Emit:
    topic: str
    envelope: Envelope
    request_id: str
    prompt: PromptRef | None
    reason: str | None = None
    route: str = ""
    """Defaults to the topic's route; only copies (``also``) name another one."""
    also: tuple[Emit, ...] = ()

    def __post_init__(self) -> None:
        if not self.route:
            object.__setattr__(self, "route", topology.route_of(self.topic))

    def outputs(self) -> tuple[Emit, ...]:
        """Everything to produce for this input, the terminal output first."""
        return (self, *self.also)

    @property
    def error_class(self) -> None:
        return None

    @property
    def result_source(self) -> str | None:
        """Who answered (model, fallback, human) when this emits a result."""
        return self.envelope.source if isinstance(self.envelope, Result) else None

    @property
    def copies(self) -> tuple[tuple[str, str | None], ...]:
        """``(route, reason)`` of each copy produced with this output."""
        return tuple((c.route, c.reason) for c in self.also)


@dataclass(frozen=True)
class DeadLetter:
    stage: str
    reason: str
    error_class: str
    message: str
    request_id: str | None = None
    prompt: PromptRef | None = None
    attempts: int = 1

    @property
    def route(self) -> str:
        return topology.ROUTE_DEAD_LETTER

    @property
    def result_source(self) -> None:
        return None

    @property
    def copies(self) -> tuple[tuple[str, str | None], ...]:
        return ()


Decision = Emit | DeadLetter


def end_to_end_s(
    decision: Decision, inbound_timestamp_ms: int | None, now: datetime | None = None
) -> float | None:
    """How long the request has been in the pipeline when this decision is made.

    From ``ValidatedRequest.received_at`` when the envelope has it, else the Kafka
    timestamp of the message being processed (for a dead letter from validate, that is
    the request's own timestamp)."""
    envelope = decision.envelope if isinstance(decision, Emit) else None
    if isinstance(envelope, Result):
        return max(0.0, envelope.latency_ms / 1000)
    current = now or utc_now()
    if isinstance(envelope, Escalation):
        return max(0.0, (current - envelope.validated.received_at).total_seconds())
    if inbound_timestamp_ms is not None and inbound_timestamp_ms > 0:
        return max(0.0, current.timestamp() - inbound_timestamp_ms / 1000)
    return None
