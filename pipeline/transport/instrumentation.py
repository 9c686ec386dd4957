"""Traces and metrics of a stage runner: the observability hook the runner calls.

The runner (:mod:`pipeline.transport.runner`) moves messages and commits; everything it
reports goes through :class:`StageInstrumentation`, so the Kafka loop stays short and this
module is the one place that knows span names, attributes and which metric a decision
feeds. Unit tests of the runner's offset logic pass :class:`NoInstrumentation`.

Each message's CONSUMER span is started inside that message's own task, as a child of the
``traceparent`` it arrived with, so concurrent messages never share a span context. Every
output gets a PRODUCER span whose context is what travels on in ``traceparent``, which
links the hops of one request into one trace. It ends when the output is handed to the
next commit, so it carries no broker offset (the output gets one only when written).
Metrics are recorded when the output is committed (so they count what a
``read_committed`` reader downstream can actually see), with the message's span as
context, so latency samples carry the trace as an exemplar.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from pipeline.contract.decisions import DeadLetter, Decision, end_to_end_s
from pipeline.observability import semconv as sc
from pipeline.observability.context import (
    MessageScope,
    enter_scope,
    leave_scope,
    message_scope,
    parse_prompt_ref,
)
from pipeline.observability.metrics import PipelineMetrics, prompt_attributes
from pipeline.observability.propagation import (
    TRACEPARENT,
    inject,
    parent_context,
    passed_on,
    span_headers,
)
from pipeline.observability.setup import current
from pipeline.transport import headers as h
from pipeline.transport.message import Inbound

log = logging.getLogger("llmpipe.runner")

MAX_KEY_ATTRIBUTE_CHARS = 256
LagSamples = list[tuple[dict[str, str | int], int]]


class MessageTrace(Protocol):
    """What the runner reports about one message, from its own task."""

    def decided(self, decision: Decision) -> None: ...

    def failed(self, exc: BaseException) -> None: ...

    def output_trace(
        self, logical_topic: str, topic: str, key: bytes | None, route: str, request_id: str | None
    ) -> dict[str, str]: ...

    def committed(self, decision: Decision) -> None: ...


class Instrumentation(Protocol):
    def message(self, inbound: Inbound) -> contextlib.AbstractContextManager[MessageTrace]: ...

    def watch_lag(self, source: Callable[[], LagSamples]) -> Callable[[], None]: ...

    def lag_attributes(self, topic: str, partition: int) -> dict[str, str | int]: ...


def _key_text(key: bytes) -> str:
    return key[:MAX_KEY_ATTRIBUTE_CHARS].decode("utf-8", "replace")


class _SpanTrace:
    def __init__(
        self,
        owner: StageInstrumentation,
        inbound: Inbound,
        span: Span,
        scope: MessageScope,
        context: Context | None = None,
        carried: dict[str, str] | None = None,
    ) -> None:
        self._owner = owner
        self._inbound = inbound
        self._span = span
        self._scope = scope
        self._context = context
        """A context holding ``span``, when the caller made one already."""
        self._carried = carried
        """Unrecorded: the headers that carry ``span``'s context on, if known already."""
        self._started = time.perf_counter()
        self._recording = span.is_recording()

    def decided(self, decision: Decision) -> None:
        """What the stage decided; what the headers already told the span is not set twice."""
        if not self._recording:
            return
        span, scope = self._span, self._scope
        span.set_attribute(sc.ROUTE, decision.route)
        if decision.reason:
            span.set_attribute(sc.REASON, decision.reason)
        if decision.request_id and decision.request_id != scope.request_id:
            span.set_attribute(sc.REQUEST_ID, decision.request_id)
        prompt = decision.prompt
        if prompt is not None:
            if (prompt.name, prompt.version) != (scope.prompt_name, scope.prompt_version):
                for name, value in prompt_attributes(prompt).items():
                    span.set_attribute(name, value)
            span.set_attribute(sc.PROMPT_ARM, prompt.arm)
        if isinstance(decision, DeadLetter):
            span.set_attribute(sc.ERROR_TYPE, decision.error_class)

    def failed(self, exc: BaseException) -> None:
        self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))

    def output_trace(
        self,
        logical_topic: str,
        topic: str,
        key: bytes | None,
        route: str,
        request_id: str | None,
    ) -> dict[str, str]:
        """A PRODUCER span for one output; its context is the next hop's parent.

        Stage, prompt and reason are on its parent (the consumer span) and not repeated:
        the SDK validates and the exporter encodes every attribute of every span, which is
        most of what tracing costs per message. Unrecorded, no span of this hop is ever
        seen, so none is started for the output: the message's context (the upstream
        ``traceparent``, see :class:`_UnrecordedMessage`) is the next hop's parent, the
        same headers for all its outputs (a producer span there was 4 % of a worker's CPU
        for an id nobody reads). Callers only read the headers returned.
        """
        if not self._recording:
            if self._carried is None:
                self._carried = span_headers(self._span.get_span_context())
            return self._carried
        attributes: dict[str, Any] = {
            sc.MESSAGING_SYSTEM: sc.MESSAGING_SYSTEM_KAFKA,
            sc.MESSAGING_OPERATION_TYPE: sc.OPERATION_SEND,
            sc.MESSAGING_OPERATION_NAME: sc.OPERATION_SEND,
            sc.MESSAGING_DESTINATION_NAME: topic,
            sc.ROUTE: route,
        }
        if key is not None:
            attributes[sc.MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(key)
        if request_id:
            attributes[sc.REQUEST_ID] = request_id
        span = self._owner.tracer.start_span(
            sc.producer_span_name(logical_topic),
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            return inject()

    def committed(self, decision: Decision) -> None:
        """Metrics once the output is committed; a metrics bug never undoes a message."""
        if not self._owner.metrics.recording:
            return
        context = self._context or trace.set_span_in_context(self._span)
        token = otel_context.attach(context)
        try:
            self._owner.metrics.record_decision(
                self._owner.stage,
                decision.route,
                decision.reason,
                decision.prompt,
                duration_s=time.perf_counter() - self._started,
                error_class=decision.error_class,
                result_source=decision.result_source,
                end_to_end_s=end_to_end_s(decision, self._inbound.timestamp_ms),
                copies=decision.copies,
            )
        except Exception:
            log.exception("stage %s: recording metrics failed", self._owner.stage)
        finally:
            otel_context.detach(token)


class StageInstrumentation:
    """Spans, scope and metrics for one stage's runner (OTel, from the current telemetry)."""

    def __init__(self, stage: str, group: str, metrics: PipelineMetrics | None = None) -> None:
        telemetry = current()
        self._telemetry = telemetry
        self.stage = stage
        self.group = group
        self.tracer = telemetry.tracer
        self.carries_trace_context = telemetry.carries_trace_context
        self.metrics = metrics or telemetry.metrics

    def message(self, inbound: Inbound) -> contextlib.AbstractContextManager[MessageTrace]:
        """The message's span and scope, current while it is processed (in its own task)."""
        if self._telemetry.records_spans:
            return self._recorded(inbound)
        return _UnrecordedMessage(self, inbound)

    def scope(self, inbound: Inbound) -> MessageScope:
        prompt = parse_prompt_ref(h.text(inbound.headers, h.PROMPT))
        return MessageScope(self.stage, h.text(inbound.headers, h.REQUEST_ID), *prompt)

    @contextlib.contextmanager
    def _recorded(self, inbound: Inbound) -> Iterator[MessageTrace]:
        scope = self.scope(inbound)
        self.metrics.stage_started(self.stage)
        try:
            # Started inside the message's own task: span and scope are its alone.
            with (
                message_scope(scope),
                self.tracer.start_as_current_span(
                    sc.consumer_span_name(self.stage),
                    context=parent_context(inbound.headers.get(TRACEPARENT)),
                    kind=trace.SpanKind.CONSUMER,
                    attributes=self._consumer_attributes(inbound, scope),
                    record_exception=False,
                ) as span,
            ):
                yield _SpanTrace(self, inbound, span, scope)
        finally:
            self.metrics.stage_finished(self.stage)

    def _consumer_attributes(self, inbound: Inbound, scope: MessageScope) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            sc.MESSAGING_SYSTEM: sc.MESSAGING_SYSTEM_KAFKA,
            sc.MESSAGING_OPERATION_TYPE: sc.OPERATION_PROCESS,
            sc.MESSAGING_OPERATION_NAME: sc.OPERATION_PROCESS,
            sc.MESSAGING_DESTINATION_NAME: inbound.topic,
            sc.MESSAGING_CONSUMER_GROUP_NAME: self.group,
            sc.MESSAGING_DESTINATION_PARTITION_ID: str(inbound.partition),
            sc.MESSAGING_KAFKA_OFFSET: inbound.offset,
            sc.STAGE: self.stage,
            **scope.prompt_attributes(),
        }
        if inbound.key is not None:
            attributes[sc.MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(inbound.key)
        if inbound.value is not None:
            attributes[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(inbound.value)
        if scope.request_id is not None:
            attributes[sc.REQUEST_ID] = scope.request_id
        return attributes

    def watch_lag(self, source: Callable[[], LagSamples]) -> Callable[[], None]:
        return self.metrics.watch_lag(source)

    def lag_attributes(self, topic: str, partition: int) -> dict[str, str | int]:
        return {
            sc.STAGE: self.stage,
            sc.MESSAGING_CONSUMER_GROUP_NAME: self.group,
            sc.MESSAGING_DESTINATION_NAME: topic,
            sc.MESSAGING_DESTINATION_PARTITION_ID: str(partition),
        }


class _UnrecordedMessage:
    """:meth:`StageInstrumentation.message` while spans are not recorded (no exporter, or
    the SDK disabled).

    No span of this hop would ever be seen, so none is started: the upstream
    ``traceparent`` stays the current context and goes on unchanged on every output.
    That keeps a mixed fleet's trace whole: a later hop that does record parents its
    spans on the last span anyone recorded, where a span id made up here would be the
    parent of that span and exist nowhere. A request that arrives without one starts a
    trace here (a root span context), so its results and log lines still carry a trace
    id. With the SDK disabled nothing is read or carried: no trace ids at all.

    The context and the message scope are set and reset directly: no attributes, no
    generator context managers, one context attach. Most messages take this path, so
    it is kept to what the trace ids on results, log lines and outputs need.
    """

    __slots__ = ("_context_token", "_inbound", "_owner", "_scope_token")

    def __init__(self, owner: StageInstrumentation, inbound: Inbound) -> None:
        self._owner = owner
        self._inbound = inbound

    def __enter__(self) -> MessageTrace:
        owner, inbound = self._owner, self._inbound
        scope = owner.scope(inbound)
        carried: dict[str, str] = {}
        if owner.carries_trace_context:
            context, carried = passed_on(inbound.headers.get(TRACEPARENT))
            if carried:
                span = trace.get_current_span(context)
            else:
                span = owner.tracer.start_span(
                    sc.consumer_span_name(owner.stage), context, kind=trace.SpanKind.CONSUMER
                )
                context = trace.set_span_in_context(span, context)
                carried = span_headers(span.get_span_context())
        else:
            span, context = trace.INVALID_SPAN, Context()
        owner.metrics.stage_started(owner.stage)
        self._scope_token = enter_scope(scope)
        self._context_token = otel_context.attach(context)
        return _SpanTrace(owner, inbound, span, scope, context, carried)

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self._context_token)
        leave_scope(self._scope_token)
        self._owner.metrics.stage_finished(self._owner.stage)


class _Silent:
    def decided(self, decision: Decision) -> None:
        return None

    def failed(self, exc: BaseException) -> None:
        return None

    def output_trace(
        self,
        logical_topic: str,
        topic: str,
        key: bytes | None,
        route: str,
        request_id: str | None,
    ) -> dict[str, str]:
        return {}

    def committed(self, decision: Decision) -> None:
        return None


class NoInstrumentation:
    """Reports nothing: for unit tests of the runner's Kafka logic."""

    @contextlib.contextmanager
    def message(self, inbound: Inbound) -> Iterator[MessageTrace]:
        yield _Silent()

    def watch_lag(self, source: Callable[[], LagSamples]) -> Callable[[], None]:
        return lambda: None

    def lag_attributes(self, topic: str, partition: int) -> dict[str, str | int]:
        return {}
