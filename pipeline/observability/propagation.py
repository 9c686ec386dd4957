"""Tracing context helpers shared by stages and transport.

The W3C ``traceparent`` header carries one trace per request across every Kafka hop; the
transport extracts it into the current context before a stage runs and injects it into
every message the stage produces. Providers, exporters and metrics are configured in
:mod:`pipeline.observability.setup`; this module keeps the small API the stages, the
transport and the review service already use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.observability.setup import configure_observability, current

PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The form every llmpipe hop writes (version 00, lower-case hex, no trailing fields): read
# directly. Anything else goes through the propagator, which knows the rest of W3C's rules.
_CANONICAL = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def configure_tracing() -> None:
    """Kept for existing callers: configures tracing *and* metrics from ``OTEL_*``."""
    configure_observability()


def tracer() -> trace.Tracer:
    """The current telemetry's tracer (tests swap it with ``observability.setup.install``)."""
    return current().tracer


def extract(headers: Iterable[tuple[str, bytes | None]]) -> Context:
    """The upstream span as a parent context; an absent or malformed header starts a trace.

    Header names are matched case-insensitively, the last one wins."""
    value: bytes | None = None
    for k, v in headers:
        if v is not None and k.lower() == TRACEPARENT:
            value = v
    return parent_context(value)


def parent_context(traceparent: bytes | None) -> Context:
    """:func:`extract` for a ``traceparent`` value already found (a consumed message's
    headers are a lower-cased map: no scan).

    The canonical form is parsed here (the propagator's regex search, getter and checks
    were a third of a message's tracing cost) into exactly the context the propagator
    builds for it; every other value is the propagator's to accept or reject.
    """
    if traceparent is None:
        return Context()
    context = _canonical_context(traceparent)
    if context is not None:
        return context
    return PROPAGATOR.extract({TRACEPARENT: traceparent.decode("latin-1")})


def passed_on(traceparent: bytes | None) -> tuple[Context, dict[str, str]]:
    """For a hop that starts no span of its own: the upstream's context, and the headers
    that carry it on unchanged (the canonical value as it came, with nothing to format;
    any other accepted value as the propagator writes it); empty headers when there is
    no valid upstream span."""
    if traceparent is not None:
        context = _canonical_context(traceparent)
        if context is not None:
            return context, {TRACEPARENT: traceparent.decode("ascii")}
    context = parent_context(traceparent)
    return context, span_headers(trace.get_current_span(context).get_span_context())


def _canonical_context(traceparent: bytes) -> Context | None:
    """The remote parent of a canonical ``traceparent``, as the propagator builds it;
    None for any other value (the propagator's to judge)."""
    match = _CANONICAL.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if not (trace_id.strip(b"0") and span_id.strip(b"0")):
        return None
    parent = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def inject(context: Context | None = None) -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) of the current span, or of ``context``'s."""
    return span_headers(trace.get_current_span(context).get_span_context())


def span_headers(span_context: SpanContext) -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) that carry ``span_context`` to the next hop:
    what the W3C propagator writes for it, formatted here without a context to look it up."""
    if span_context == INVALID_SPAN_CONTEXT:
        return {}
    carrier = {
        TRACEPARENT: f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags:02x}"
    }
    if span_context.trace_state:
        carrier[TRACESTATE] = span_context.trace_state.to_header()
    return carrier


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
