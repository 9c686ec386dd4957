"""The stage table's executable half: for each stage in :mod:`pipeline.contract.topology`,
the factory that builds the function it runs on each input.

Why two halves: the topology (names, topics, envelopes, routes) is read by layers below the
stages (metrics, the Kafka edge, the ledger), so it cannot import them; the factories must.
Both are keyed by stage name and ``tests/contract/test_topology.py`` keeps the keys equal.
The worker wraps each step for Kafka; the prompt test harness calls the same steps in
memory, so a prompt is judged by exactly the code production runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.decisions import Decision
from pipeline.control.state import ControlState
from pipeline.observability.redact import Redactor
from pipeline.prompts.registry import PromptRegistry
from pipeline.resilience.breaker import QualityBreaker
from pipeline.stages.fallback import FallbackWorker
from pipeline.stages.model_call import CallingClient, ModelCaller
from pipeline.stages.monitor import DistributionMonitor
from pipeline.stages.policy import BurnInGate
from pipeline.stages.settle import Settler
from pipeline.stages.validate import ContentRules, InputLimits, Validator

Step = Callable[[Any], Decision | Awaitable[Decision]]
"""One stage applied to one input: the decoded input envelope, or a :class:`RawInput`
for a stage whose input is raw (``Stage.raw``)."""


@dataclass(frozen=True)
class RawInput:
    """A message as it arrived, for the stage that decodes (and so validates) it itself."""

    value: bytes | None
    key: bytes | None
    content_type: str | None


@dataclass(frozen=True)
class StageDeps:
    """Everything a stage is built from. The worker fills it from ``Settings``; the prompt
    harness with evaluation defaults (empty control state, no quality breaker)."""

    registry: PromptRegistry
    control: ControlState
    client: CallingClient
    codec: Codec = field(default_factory=Codec)
    redactor: Redactor = field(default_factory=Redactor)
    timeout_cap_s: float = 30.0
    limits: InputLimits = field(default_factory=InputLimits)
    rules: ContentRules = field(default_factory=ContentRules)
    quality: QualityBreaker | None = None
    burn_in: BurnInGate | None = None
    monitor: DistributionMonitor | None = None


def _validate(d: StageDeps) -> Step:
    validator = Validator(d.codec, d.registry, d.control, d.redactor, d.limits, d.rules)

    def step(raw: RawInput) -> Decision:
        return validator(raw.value, raw.key, raw.content_type)

    return step


def _model(d: StageDeps) -> Step:
    return ModelCaller(d.registry, d.client, d.control, d.timeout_cap_s, d.quality)


def _settle(d: StageDeps) -> Step:
    return Settler(
        d.registry, d.control, d.client, d.timeout_cap_s, d.quality, d.burn_in, d.monitor
    )


def _fallback(d: StageDeps) -> Step:
    return FallbackWorker(d.registry, d.control)


HANDLERS: dict[str, Callable[[StageDeps], Step]] = {
    topology.VALIDATE: _validate,
    topology.MODEL: _model,
    topology.SETTLE: _settle,
    topology.FALLBACK_STAGE: _fallback,
}


def build_steps(deps: StageDeps, stages: list[str] | None = None) -> dict[str, Step]:
    """The steps of ``stages`` (default: every stage in the topology), by stage name."""
    return {name: HANDLERS[name](deps) for name in stages or topology.stage_names()}
