"""Build the tracer and meter providers from the standard ``OTEL_*`` variables.

Why our own selection instead of ``opentelemetry-instrument``: the worker must run with no
collector at all (the default exports nothing, yet results still carry trace ids), and an
operator must be able to switch on OTLP over HTTP or gRPC, or the console, with the same
variables every other OpenTelemetry SDK reads. Recognised:

``OTEL_SDK_DISABLED``                  ``true``: no-op tracer and meter (no trace ids either)
``OTEL_TRACES_EXPORTER``               comma list of ``otlp``, ``console``, ``none`` (default:
                                       spans carry trace context but are not recorded)
``OTEL_METRICS_EXPORTER``              ``otlp``, ``console``, ``prometheus``, ``none`` (default)
``OTEL_EXPORTER_OTLP_PROTOCOL``        ``http/protobuf`` (default) or ``grpc``
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL``  per-signal override
``OTEL_EXPORTER_OTLP_ENDPOINT``        base URL; ``/v1/traces`` is appended for HTTP
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``  per-signal URL, used as is
``OTEL_EXPORTER_PROMETHEUS_HOST|PORT`` scrape endpoint (default ``localhost:9464``)
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_OTLP_HEADERS`` ...: read by the SDK itself.
``LLMPIPE_TRACE_CONTENT``              ``true`` records prompts and completions, redacted
``LLMPIPE_GENAI_PROVIDER``             ``gen_ai.provider.name`` (default ``openai``)

The Prometheus reader needs ``opentelemetry-exporter-prometheus`` (not a dependency);
without it the worker logs one warning and carries on.

One :class:`Telemetry` is current per process. ``configure_observability()`` builds it from
the environment on first use and also installs it as the OpenTelemetry global, so any
third-party instrumentation exports to the same place; :func:`install` swaps in another
one (tests, the overhead benchmark) without touching the globals, which can be set once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from pipeline.errors import LlmpipeError
from pipeline.observability.metrics import PipelineMetrics
from pipeline.observability.redact import DEFAULT_REDACTOR, Redactor
from pipeline.observability.spans import PropagatingTracerProvider

log = logging.getLogger("llmpipe.observability")

SCOPE_NAME = "llmpipe"
DEFAULT_SERVICE_NAME = "llmpipe"
HTTP_PROTOCOL = "http/protobuf"
GRPC_PROTOCOL = "grpc"
TRUE = frozenset({"1", "true", "yes", "on"})


class ObservabilityConfigError(LlmpipeError, ValueError):
    """An ``OTEL_*`` value we cannot honour; raised at start-up, not at first export."""


@dataclass
class Telemetry:
    """Providers plus the llmpipe-specific switches every instrumentation point needs."""

    tracer_provider: trace.TracerProvider
    meter_provider: otel_metrics.MeterProvider
    trace_content: bool = False
    genai_provider: str = "openai"
    redactor: Redactor = field(default_factory=lambda: DEFAULT_REDACTOR)
    tracer: trace.Tracer = field(init=False)
    metrics: PipelineMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer(SCOPE_NAME)
        self.metrics = PipelineMetrics(self.meter_provider.get_meter(SCOPE_NAME))

    def force_flush(self, timeout_ms: int = 10_000) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush(timeout_ms)

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            stop = getattr(provider, "shutdown", None)
            if stop is not None:
                stop()

    def redact_json(self, value: Any) -> str:
        """Content for span attributes: redacted first, then JSON (never the reverse)."""
        return json.dumps(self.redactor.value(value), ensure_ascii=False, default=str)


_lock = threading.Lock()
_current: Telemetry | None = None


def current() -> Telemetry:
    """The process's telemetry, configured from ``os.environ`` on first use."""
    telemetry = _current
    return telemetry if telemetry is not None else configure_observability()


def install(telemetry: Telemetry) -> Telemetry | None:
    """Make ``telemetry`` current; returns the previous one so a test can put it back."""
    global _current
    with _lock:
        previous, _current = _current, telemetry
    return previous


def configure_observability(environ: Mapping[str, str] | None = None) -> Telemetry:
    """Idempotent: the first call builds and installs, later calls return the same."""
    global _current
    with _lock:
        if _current is not None:
            return _current
        telemetry = build_telemetry(os.environ if environ is None else environ)
        if isinstance(telemetry.tracer_provider, TracerProvider) and not isinstance(
            trace.get_tracer_provider(), TracerProvider
        ):
            trace.set_tracer_provider(telemetry.tracer_provider)
        if isinstance(telemetry.meter_provider, MeterProvider):
            otel_metrics.set_meter_provider(telemetry.meter_provider)
        _current = telemetry
        return telemetry


def build_telemetry(
    environ: Mapping[str, str],
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Providers as the environment describes, plus any processors/readers given (tests)."""
    content = _flag(environ, "LLMPIPE_TRACE_CONTENT")
    provider_name = environ.get("LLMPIPE_GENAI_PROVIDER", "").strip() or "openai"
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return Telemetry(
            trace.NoOpTracerProvider(),
            otel_metrics.NoOpMeterProvider(),
            trace_content=False,
            genai_provider=provider_name,
        )
    resource = _resource(environ)
    # Records spans only once a processor is added (see observability/spans.py): with no
    # exporter, spans carry their context and cost a small fraction of a recorded span.
    tracer_provider = PropagatingTracerProvider(resource=resource)
    for processor in [*span_processors, *span_processors_from_env(environ)]:
        tracer_provider.add_span_processor(processor)
    readers = [*metric_readers, *metric_readers_from_env(environ)]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(
        tracer_provider, meter_provider, trace_content=content, genai_provider=provider_name
    )


def _resource(environ: Mapping[str, str]) -> Resource:
    """``Resource.create`` reads OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES from os.environ;
    we pass the service name explicitly so a test's ``environ`` wins too."""
    name = environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME
    return Resource.create({"service.name": name})


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in TRUE


def _names(environ: Mapping[str, str], variable: str) -> list[str]:
    raw = environ.get(variable, "none")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    raw = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or HTTP_PROTOCOL
    ).strip()
    if raw not in (HTTP_PROTOCOL, GRPC_PROTOCOL):
        raise ObservabilityConfigError(
            f"OTLP protocol {raw!r} is not supported; use {HTTP_PROTOCOL} or {GRPC_PROTOCOL}"
        )
    return raw


def _endpoint(environ: Mapping[str, str], signal: str, protocol: str) -> str | None:
    """Per-signal endpoints are used as given; the generic one gets ``/v1/<signal>`` for
    HTTP, as the OTLP exporter specification says."""
    specific = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if specific:
        return specific
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    if protocol == GRPC_PROTOCOL:
        return base
    return f"{base.rstrip('/')}/v1/{signal.lower()}"


def otlp_span_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = _protocol(environ, "TRACES")
    endpoint = _endpoint(environ, "TRACES", protocol)
    if protocol == GRPC_PROTOCOL:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=endpoint)


def otlp_metric_exporter(environ: Mapping[str, str]) -> MetricExporter:
    protocol = _protocol(environ, "METRICS")
    endpoint = _endpoint(environ, "METRICS", protocol)
    if protocol == GRPC_PROTOCOL:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=endpoint)


def span_processors_from_env(environ: Mapping[str, str]) -> list[SpanProcessor]:
    processors: list[SpanProcessor] = []
    for name in _names(environ, "OTEL_TRACES_EXPORTER"):
        if name == "otlp":
            processors.append(BatchSpanProcessor(otlp_span_exporter(environ)))
        elif name == "console":
            # Console output is for a developer watching one request: no batching delay.
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            raise ObservabilityConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none"
            )
    return processors


def metric_readers_from_env(environ: Mapping[str, str]) -> list[MetricReader]:
    readers: list[MetricReader] = []
    for name in _names(environ, "OTEL_METRICS_EXPORTER"):
        if name == "otlp":
            readers.append(PeriodicExportingMetricReader(otlp_metric_exporter(environ)))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "prometheus":
            reader = prometheus_reader(environ)
            if reader is not None:
                readers.append(reader)
        else:
            raise ObservabilityConfigError(
                f"OTEL_METRICS_EXPORTER={name!r} is not supported; "
                "use otlp, console, prometheus or none"
            )
    return readers


def prometheus_reader(environ: Mapping[str, str]) -> MetricReader | None:
    """A scrape endpoint, only when the optional packages are installed.

    Imported by name so that neither mypy nor the import system needs them to exist.
    """
    try:
        exporter: Any = importlib.import_module("opentelemetry.exporter.prometheus")
        client: Any = importlib.import_module("prometheus_client")
    except ImportError:
        log.warning(
            "OTEL_METRICS_EXPORTER=prometheus needs opentelemetry-exporter-prometheus; "
            "metrics are not served"
        )
        return None
    host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    port = int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
    client.start_http_server(port=port, addr=host)
    reader: MetricReader = exporter.PrometheusMetricReader()
    return reader
