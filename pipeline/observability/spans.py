"""A tracer provider that records spans only once someone can receive them.

With no span processor (the default: ``OTEL_TRACES_EXPORTER`` unset) the SDK still
builds every span in full (attributes checked and copied, events and links lists, a
lock, start and end times) and then hands it to nobody: about a quarter of a worker's
CPU per request went there. What the pipeline needs from a span when nothing is
exported is its *context*: the trace id stamped on results and log lines, the
``traceparent`` each output carries on, and the sampled flag downstream services see.

:class:`PropagatingTracerProvider` is the SDK provider (same resource, same API, an
``isinstance`` check still holds) whose tracer, while no processor is registered,
returns non-recording spans with that context: the parent's trace id, flags and trace
state, or a new trace (sampled, as the SDK's default sampler would decide) for a root;
a new span id each time. The first ``add_span_processor`` switches it to the SDK's own
recording spans, for every tracer already handed out.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)
from opentelemetry.util.types import Attributes

SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class PropagatingTracerProvider(TracerProvider):
    """See the module docstring."""

    recording = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.recording = True

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _PropagatingTracer(self, super().get_tracer(*args, **kwargs))


def _new_id(bits: int, invalid: int) -> int:
    value = random.getrandbits(bits)
    while value == invalid:
        value = random.getrandbits(bits)
    return value


class _PropagatingTracer(trace.Tracer):
    def __init__(self, provider: PropagatingTracerProvider, recording: trace.Tracer) -> None:
        self._provider = provider
        self._recording = recording

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if self._provider.recording:
            return self._recording.start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        parent = trace.get_current_span(context).get_span_context()
        span_id = _new_id(64, INVALID_SPAN_ID)
        if parent.is_valid:
            own = SpanContext(
                parent.trace_id,
                span_id,
                is_remote=False,
                trace_flags=parent.trace_flags,
                trace_state=parent.trace_state,
            )
        else:
            own = SpanContext(
                _new_id(128, INVALID_TRACE_ID), span_id, is_remote=False, trace_flags=SAMPLED
            )
        return NonRecordingSpan(own)

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API types its own decorator
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current
