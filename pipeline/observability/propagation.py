"""Tracing context helpers shared by stages and transport.

The W3C ``traceparent`` header carries one trace per request across every Kafka hop; the
transport extracts it into the current context before a stage runs and injects it into
every message the stage produces. Providers, exporters and metrics are configured in
:mod:`pipeline.observability.setup`; this module keeps the small API the stages, the
transport and the review service already use.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.observability.setup import configure_observability, current

PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"


def configure_tracing() -> None:
    """Kept for existing callers: configures tracing *and* metrics from ``OTEL_*``."""
    configure_observability()


def tracer() -> trace.Tracer:
    """The current telemetry's tracer (tests swap it with ``observability.setup.install``)."""
    return current().tracer


def extract(headers: Iterable[tuple[str, bytes | None]]) -> Context:
    """The upstream span as a parent context; an absent or malformed header starts a trace."""
    carrier = {
        k.lower(): v.decode("latin-1")
        for k, v in headers
        if v is not None and k.lower() == TRACEPARENT
    }
    return PROPAGATOR.extract(carrier)


def inject(context: Context | None = None) -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) of the current span, or of ``context``'s."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context)
    return carrier


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
