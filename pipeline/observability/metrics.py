"""Every instrument llmpipe records, built once per meter provider.

Why a class instead of module-level instruments: a meter provider's readers are fixed when
it is built, so tests (and the overhead benchmark) need a fresh provider with an in-memory
reader per run. :class:`PipelineMetrics` is cheap to build against any provider, and the
process-wide one lives in :mod:`pipeline.observability.setup` next to the tracer.

Who records what:

* the stage runner: one :meth:`PipelineMetrics.record_decision` per input message (routes,
  reasons, terminal outcomes, fallbacks, reviews, dead letters, validation failures, stage
  and end-to-end latency) and the in-flight and consumer-lag gauges;
* the retry layer: one :meth:`PipelineMetrics.record_model_call` per attempt (the GenAI
  duration and token histograms) and the retries;
* the resilience layer, the control listener and the review service call the module
  functions at the bottom (:func:`record_breaker_change` is a ready-made
  ``on_state_change`` listener).

Attributes always carry the prompt name and version when they are known, because "did
version 3 make things worse than version 2" is the question these numbers answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from pipeline.contract import topology
from pipeline.contract.envelopes import PromptRef
from pipeline.digits import ascii_int
from pipeline.observability import semconv as sc

log = logging.getLogger("llmpipe.metrics")

Attributes = dict[str, str | int]
LagSource = Callable[[], Iterable[tuple[Mapping[str, str | int], int]]]
"""Returns ``(attributes, lag)`` pairs; called from the metric reader's thread."""
ErrorRateSource = Callable[[], Mapping[tuple[str, int], float]]
"""Returns the estimated accepted-error rate by (prompt, version); reader's thread."""

# Escalations from the settle stage that mean "the model's output failed our checks"
# (force_review is an operator's choice, not a failure).
OUTPUT_VALIDATION_REASONS = frozenset({"invalid_output", "refusal", "low_confidence"})
# (high_risk, burn_in and audit send *valid* answers to a person: they are policies, too.)


def prompt_attributes(prompt: PromptRef | None) -> Attributes:
    if prompt is None:
        return {}
    return {sc.GEN_AI_PROMPT_NAME: prompt.name, sc.GEN_AI_PROMPT_VERSION: prompt.version}


class Readers(Protocol):
    """Whether any metric reader will see what is recorded (see :class:`GatedMeterProvider`)."""

    recording: bool


class _Always:
    recording = True


class GatedMeterProvider(MeterProvider):
    """The SDK meter provider, saying whether it has a reader (``recording``).

    With no reader (the default: ``OTEL_METRICS_EXPORTER`` unset) the SDK still builds a
    measurement for every ``add`` and ``record`` (attributes copied and checked, the time
    read, the context looked up) and hands it to nobody: a tenth of a worker's CPU per
    request. :class:`PipelineMetrics` skips that while ``recording`` is false; adding a
    reader (``add_metric_reader``) turns it on, like the tracer's span processors.
    """

    def __init__(
        self, metric_readers: Sequence[MetricReader] = (), resource: Resource | None = None
    ) -> None:
        super().__init__(metric_readers=metric_readers, resource=resource)
        self._readers = len(metric_readers)
        self.recording = self._readers > 0

    def add_metric_reader(self, metric_reader: MetricReader) -> None:
        super().add_metric_reader(metric_reader)
        self._readers += 1
        self.recording = True

    def remove_metric_reader(self, metric_reader: MetricReader) -> None:
        super().remove_metric_reader(metric_reader)
        self._readers = max(0, self._readers - 1)
        self.recording = self._readers > 0


class PipelineMetrics:
    def __init__(self, meter: Meter, readers: Readers | None = None) -> None:
        """``readers`` says whether anything reads the instruments (by default: always);
        while nothing does, the recording methods return at once."""
        self._readers: Readers = readers if readers is not None else _Always()
        self.operation_duration = meter.create_histogram(
            sc.GEN_AI_CLIENT_OPERATION_DURATION,
            unit="s",
            description="Duration of each model call (one per attempt).",
            explicit_bucket_boundaries_advisory=sc.GEN_AI_DURATION_BUCKETS,
        )
        self.token_usage = meter.create_histogram(
            sc.GEN_AI_CLIENT_TOKEN_USAGE,
            unit="{token}",
            description="Input and output tokens per model call.",
            explicit_bucket_boundaries_advisory=sc.GEN_AI_TOKEN_BUCKETS,
        )
        self.requests = meter.create_counter(
            sc.REQUESTS, unit="{request}", description="Requests by terminal route and reason."
        )
        self.stage_messages = meter.create_counter(
            sc.STAGE_MESSAGES, unit="{message}", description="Stage decisions by route."
        )
        self.stage_duration = meter.create_histogram(
            sc.STAGE_DURATION,
            unit="s",
            description="Time one stage spent on one message, produce included.",
            explicit_bucket_boundaries_advisory=sc.LATENCY_BUCKETS,
        )
        self.stage_in_flight = meter.create_up_down_counter(
            sc.STAGE_IN_FLIGHT, unit="{message}", description="Messages being processed."
        )
        self.request_duration = meter.create_histogram(
            sc.REQUEST_DURATION,
            unit="s",
            description="End to end: request received to terminal message produced.",
            explicit_bucket_boundaries_advisory=sc.LATENCY_BUCKETS,
        )
        self.validation_failures = meter.create_counter(
            sc.VALIDATION_FAILURES,
            unit="{failure}",
            description="Input refusals and output check failures by rule.",
        )
        self.fallbacks = meter.create_counter(
            sc.FALLBACKS, unit="{request}", description="Requests sent to the fallback worker."
        )
        self.reviews = meter.create_counter(
            sc.REVIEWS, unit="{request}", description="Requests sent to human review."
        )
        self.dead_letters = meter.create_counter(
            sc.DEAD_LETTERS, unit="{message}", description="Messages dead-lettered."
        )
        self.model_retries = meter.create_counter(
            sc.MODEL_RETRIES, unit="{retry}", description="Model call attempts after the first."
        )
        self.model_cost = meter.create_counter(
            sc.MODEL_COST,
            unit="USD",
            description="What model calls cost, by prompt name, version and model "
            "(calls whose model has no known price are not counted).",
        )
        self.model_in_flight = meter.create_up_down_counter(
            sc.MODEL_IN_FLIGHT, unit="{call}", description="Model calls waiting for an answer."
        )
        self.breaker_transitions = meter.create_counter(
            sc.BREAKER_TRANSITIONS, unit="{transition}", description="Circuit breaker changes."
        )
        self.rate_limit_waits = meter.create_counter(
            sc.RATE_LIMIT_WAITS, unit="{wait}", description="Calls that waited for a rate limit."
        )
        self.rate_limit_wait_duration = meter.create_histogram(
            sc.RATE_LIMIT_WAIT_DURATION,
            unit="s",
            description="Time spent waiting for a rate-limit slot or tokens.",
            explicit_bucket_boundaries_advisory=sc.LATENCY_BUCKETS,
        )
        self.rate_limit_rejections = meter.create_counter(
            sc.RATE_LIMIT_REJECTIONS,
            unit="{call}",
            description="Calls refused locally because the limit could not fit the deadline.",
        )
        self.control_changes = meter.create_counter(
            sc.CONTROL_CHANGES, unit="{change}", description="Flag and pin changes applied."
        )
        self.distribution_shifts = meter.create_counter(
            sc.DISTRIBUTION_SHIFTS,
            unit="{shift}",
            description="Output distributions that moved beyond their declared bound.",
        )
        self.human_decisions = meter.create_counter(
            sc.HUMAN_DECISIONS, unit="{decision}", description="Reviewer decisions by action."
        )
        self.audit_verdicts = meter.create_counter(
            sc.AUDIT_VERDICTS,
            unit="{verdict}",
            description="Reviewer verdicts on audit samples of accepted answers.",
        )
        self._lock = threading.Lock()
        self._error_sources: list[ErrorRateSource] = []
        meter.create_observable_gauge(
            sc.ACCEPTED_ERROR_RATE,
            callbacks=[self._observe_accepted_error],
            unit="{ratio}",
            description="Share of audited accepted answers a reviewer did not approve.",
        )
        self._breakers: dict[str, int] = {}
        self._lag_sources: dict[int, LagSource] = {}
        self._next_source = 0
        meter.create_observable_gauge(
            sc.BREAKER_STATE_GAUGE,
            callbacks=[self._observe_breakers],
            unit="{state}",  # not "1": Prometheus would append "_ratio" to the name
            description="Breaker state: 0 closed, 1 half-open, 2 open.",
        )
        meter.create_observable_gauge(
            sc.CONSUMER_LAG,
            callbacks=[self._observe_lag],
            unit="{message}",
            description="High watermark minus the stage consumer's position.",
        )

    @property
    def recording(self) -> bool:
        """Whether anything reads what is recorded: callers skip building values if not."""
        return self._readers.recording

    # -- stage runner -------------------------------------------------------------------

    def record_decision(
        self,
        stage: str,
        route: str,
        reason: str | None,
        prompt: PromptRef | None,
        *,
        duration_s: float,
        error_class: str | None = None,
        result_source: str | None = None,
        end_to_end_s: float | None = None,
        copies: Sequence[tuple[str, str | None]] = (),
    ) -> None:
        """Everything one stage decision tells us, recorded after the output is durable.

        Plain values, not the decision itself: observability sits below the stages and
        their contract, and a caller that is not a stage runner can record too. ``copies``
        are the ``(route, reason)`` of messages produced alongside (audit copies for
        review); they are never terminal."""
        if not self._readers.recording:
            return
        prompt_attrs = prompt_attributes(prompt)
        routed: Attributes = {sc.STAGE: stage, sc.ROUTE: route}
        if reason:
            routed[sc.REASON] = reason
        self.stage_messages.add(1, {**routed, **prompt_attrs})
        self.stage_duration.record(duration_s, {sc.STAGE: stage, sc.ROUTE: route})
        if route == topology.ROUTE_DEAD_LETTER:
            self.dead_letters.add(1, {**routed, sc.ERROR_TYPE: error_class or "", **prompt_attrs})
            if stage == topology.VALIDATE:
                self.validation_failures.add(
                    1, {**routed, sc.RULE: error_class or "", **prompt_attrs}
                )
        elif route == topology.ROUTE_FALLBACK:
            self.fallbacks.add(1, {**routed, **prompt_attrs})
        elif route == topology.ROUTE_REVIEW:
            self.reviews.add(1, {**routed, **prompt_attrs})
        if stage == topology.SETTLE and reason in OUTPUT_VALIDATION_REASONS:
            self.validation_failures.add(1, {**routed, sc.RULE: reason or "", **prompt_attrs})
        for copy_route, copy_reason in copies:
            copied: Attributes = {sc.STAGE: stage, sc.ROUTE: copy_route}
            if copy_reason:
                copied[sc.REASON] = copy_reason
            self.stage_messages.add(1, {**copied, **prompt_attrs})
            self.reviews.add(1, {**copied, **prompt_attrs})
        if route not in topology.terminal_routes():
            return
        outcome: Attributes = {sc.ROUTE: route, **prompt_attrs}
        if reason:
            outcome[sc.REASON] = reason
        if result_source is not None:
            outcome[sc.RESULT_SOURCE] = result_source
        self.requests.add(1, outcome)
        if end_to_end_s is not None:
            self.request_duration.record(end_to_end_s, outcome)

    def stage_started(self, stage: str) -> None:
        if not self._readers.recording:
            return
        self.stage_in_flight.add(1, {sc.STAGE: stage})

    def stage_finished(self, stage: str) -> None:
        if not self._readers.recording:
            return
        self.stage_in_flight.add(-1, {sc.STAGE: stage})

    def watch_lag(self, source: LagSource) -> Callable[[], None]:
        """Report a consumer's lag until the returned function is called."""
        with self._lock:
            key = self._next_source
            self._next_source += 1
            self._lag_sources[key] = source

        def unregister() -> None:
            with self._lock:
                self._lag_sources.pop(key, None)

        return unregister

    # -- model calls ----------------------------------------------------------------------

    def record_model_call(
        self,
        attributes: Mapping[str, str | int],
        *,
        duration_s: float,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """One attempt; ``attributes`` are the GenAI ones (model, provider, prompt, error)."""
        if not self._readers.recording:
            return
        attrs = dict(attributes)
        self.operation_duration.record(duration_s, attrs)
        if cost_usd is not None:
            self.model_cost.add(cost_usd, attrs)
        if input_tokens is not None:
            self.token_usage.record(
                input_tokens, {**attrs, sc.GEN_AI_TOKEN_TYPE: sc.GEN_AI_TOKEN_TYPE_INPUT}
            )
        if output_tokens is not None:
            self.token_usage.record(
                output_tokens, {**attrs, sc.GEN_AI_TOKEN_TYPE: sc.GEN_AI_TOKEN_TYPE_OUTPUT}
            )

    def record_retry(self, attributes: Mapping[str, str | int]) -> None:
        if not self._readers.recording:
            return
        self.model_retries.add(1, dict(attributes))

    def model_call_started(self, attributes: Mapping[str, str | int]) -> None:
        if not self._readers.recording:
            return
        self.model_in_flight.add(1, dict(attributes))

    def model_call_finished(self, attributes: Mapping[str, str | int]) -> None:
        if not self._readers.recording:
            return
        self.model_in_flight.add(-1, dict(attributes))

    # -- resilience, control, review -----------------------------------------------------

    def breaker_state_changed(self, name: str, old: Any, new: Any) -> None:
        """Matches the resilience layer's ``StateListener(name, old, new)``."""
        old_s, new_s = str(old), str(new)
        with self._lock:
            self._breakers[name] = sc.BREAKER_STATE_VALUES.get(new_s, -1)
        self.breaker_transitions.add(
            1,
            {sc.BREAKER_NAME: name, sc.BREAKER_PREVIOUS_STATE: old_s, sc.BREAKER_STATE: new_s},
        )

    def rate_limit_waited(self, model: str, waited_s: float) -> None:
        attrs: Attributes = {sc.GEN_AI_REQUEST_MODEL: model}
        self.rate_limit_waits.add(1, attrs)
        self.rate_limit_wait_duration.record(max(0.0, waited_s), attrs)

    def rate_limit_rejected(self, model: str) -> None:
        self.rate_limit_rejections.add(1, {sc.GEN_AI_REQUEST_MODEL: model})

    def control_changed(self, key: str) -> None:
        """``flag:force_review:ticket_triage`` -> kind flag, name force_review, scope ..."""
        kind, _, rest = key.partition(":")
        name, _, scope = rest.partition(":") if kind == "flag" else (rest, "", "")
        attrs: Attributes = {sc.CONTROL_KIND: kind or "unknown", sc.CONTROL_NAME: name}
        if scope:
            attrs[sc.CONTROL_SCOPE] = scope
        self.control_changes.add(1, attrs)

    def distribution_shifted(self, prompt_ref: str, signal: str) -> None:
        name, _, version = prompt_ref.partition("@")
        attrs: Attributes = {sc.GEN_AI_PROMPT_NAME: name, sc.MONITOR_SIGNAL: signal}
        number = ascii_int(version)
        if number is not None:
            attrs[sc.GEN_AI_PROMPT_VERSION] = number
        self.distribution_shifts.add(1, attrs)

    def audit_verdict(self, verdict: str, prompt: PromptRef | None = None) -> None:
        self.audit_verdicts.add(1, {sc.AUDIT_VERDICT: verdict, **prompt_attributes(prompt)})

    def watch_accepted_error(self, source: ErrorRateSource) -> Callable[[], None]:
        """Report the estimated accepted-error rate per prompt version from ``source``
        until the returned function is called."""
        with self._lock:
            self._error_sources.append(source)

        def unregister() -> None:
            with self._lock:
                self._error_sources.remove(source)

        return unregister

    def human_decided(self, action: str, prompt: PromptRef | None = None) -> None:
        self.human_decisions.add(1, {sc.REVIEW_ACTION: action, **prompt_attributes(prompt)})

    # -- observable callbacks (run on the metric reader's thread) ----------------------

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            states = dict(self._breakers)
        return [Observation(value, {sc.BREAKER_NAME: name}) for name, value in states.items()]

    def _observe_accepted_error(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._error_sources)
        observations: list[Observation] = []
        for source in sources:
            try:
                observations.extend(
                    Observation(rate, {sc.GEN_AI_PROMPT_NAME: name, sc.GEN_AI_PROMPT_VERSION: v})
                    for (name, v), rate in source().items()
                )
            except Exception:  # a gauge must never break the export of everything else
                log.debug("accepted-error source failed", exc_info=True)
        return observations

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._lag_sources.values())
        observations: list[Observation] = []
        for source in sources:
            try:
                observations.extend(Observation(lag, dict(attrs)) for attrs, lag in source())
            except Exception:  # a gauge must never break the export of everything else
                log.debug("consumer lag source failed", exc_info=True)
        return observations
