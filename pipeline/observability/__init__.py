"""Observability: one trace per request across every Kafka hop, GenAI metrics, dashboards.

* :mod:`~pipeline.observability.semconv`: every attribute, span and metric name;
* :mod:`~pipeline.observability.setup`: providers and exporters from ``OTEL_*``;
* :mod:`~pipeline.observability.metrics`: the instruments;
* :mod:`~pipeline.observability.hooks`: the process-wide hooks other layers call;
* :mod:`~pipeline.observability.context`: the message being worked on, per asyncio task;
* :mod:`~pipeline.observability.propagation`: ``traceparent`` in and out of Kafka headers;
* :mod:`~pipeline.observability.logs` and :mod:`~pipeline.observability.redact`: JSON logs
  and the redactor every exported text goes through.

Model-call (GenAI) spans are :mod:`pipeline.llm.genai`: they describe the model client,
which sits above this package.

See ``docs/observability.md``.
"""

from pipeline.observability.hooks import (
    record_breaker_change,
    record_control_change,
    record_human_decision,
    record_rate_limit_rejection,
    record_rate_limit_wait,
)
from pipeline.observability.metrics import PipelineMetrics
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
