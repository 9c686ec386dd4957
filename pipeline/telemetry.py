"""Tracing context helpers shared by stages and transport.

The W3C ``traceparent`` header carries one trace per request across every Kafka hop; the
transport extracts it into the current context before a stage runs and injects it into
every message the stage produces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
_configured = False


def configure_tracing() -> None:
    """Install an SDK tracer provider once, so trace ids exist even without an exporter."""
    global _configured
    if _configured:
        return
    _configured = True
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())


def tracer() -> trace.Tracer:
    return trace.get_tracer("llmpipe")


def extract(headers: Iterable[tuple[str, bytes | None]]) -> Context:
    carrier = {
        k.lower(): v.decode("latin-1")
        for k, v in headers
        if v is not None and k.lower() == "traceparent"
    }
    return PROPAGATOR.extract(carrier)


def inject() -> dict[str, str]:
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def header_map(headers: Iterable[tuple[str, bytes | None]]) -> Mapping[str, bytes]:
    return {k.lower(): v for k, v in headers if v is not None}
