"""Observability: one trace per request across every Kafka hop, GenAI metrics, dashboards.

* :mod:`~pipeline.observability.semconv`: every attribute, span and metric name;
* :mod:`~pipeline.observability.setup`: providers and exporters from ``OTEL_*``;
* :mod:`~pipeline.observability.metrics`: the instruments and the hooks other layers call;
* :mod:`~pipeline.observability.genai`: model-call and per-attempt spans;
* :mod:`~pipeline.observability.context`: the message being worked on, per asyncio task;

See ``docs/observability.md``.
"""

from pipeline.observability.metrics import (
    PipelineMetrics,
    record_breaker_change,
    record_control_change,
    record_human_decision,
    record_rate_limit_rejection,
    record_rate_limit_wait,
)
from pipeline.observability.setup import (
    ObservabilityConfigError,
    Telemetry,
    build_telemetry,
    configure_observability,
    current,
    install,
)

__all__ = [
    "ObservabilityConfigError",
    "PipelineMetrics",
    "Telemetry",
    "build_telemetry",
    "configure_observability",
    "current",
    "install",
    "record_breaker_change",
    "record_control_change",
    "record_human_decision",
    "record_rate_limit_rejection",
    "record_rate_limit_wait",
]
