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
``OTEL_EXPORTER_PROMETHEUS_HOST|PORT`` scrape endpoint (default ``localhost:9464``) of a
                                       process that serves no endpoints of its own (a worker
                                       with ``LLMPIPE_HEALTH_PORT`` serves ``/metrics`` there)
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_OTLP_HEADERS`` ...: read by the SDK itself.
``LLMPIPE_TRACE_CONTENT``              ``true`` records prompts and completions, redacted
``LLMPIPE_GENAI_PROVIDER``             ``gen_ai.provider.name`` (default ``openai``)

The Prometheus reader is the SDK's pull reader on a registry of this telemetry's own: it
aggregates what the instruments record and builds the text only when scraped
(:mod:`pipeline.observability.endpoints` serves it).

Every provider's resource carries ``service.instance.id``: a new UUID per process unless
``OTEL_RESOURCE_ATTRIBUTES`` names one, so two replicas never export identical series.

One :class:`Telemetry` is current per process. ``configure_observability()`` builds it from
the environment on first use and also installs it as the OpenTelemetry global, so any
third-party instrumentation exports to the same place; :func:`install` swaps in another
one (tests, the overhead benchmark) without touching the globals, which can be set once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
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
from prometheus_client import CollectorRegistry

from pipeline.errors import LlmpipeError
from pipeline.observability import endpoints
from pipeline.observability.metrics import GatedMeterProvider, PipelineMetrics, Readers
from pipeline.observability.redact import DEFAULT_REDACTOR, Redactor
from pipeline.observability.spans import PropagatingTracerProvider

log = logging.getLogger("llmpipe.observability")

SCOPE_NAME = "llmpipe"
DEFAULT_SERVICE_NAME = "llmpipe"
HTTP_PROTOCOL = "http/protobuf"
GRPC_PROTOCOL = "grpc"
TRUE = frozenset({"1", "true", "yes", "on"})
INSTANCE_ID = "service.instance.id"


class ObservabilityConfigError(LlmpipeError, ValueError):
    """An ``OTEL_*`` value we cannot honour; raised at start-up, not at first export."""


class _NoReaders:
    recording = False


_NO_READERS = _NoReaders()


@dataclass
class Telemetry:
    """Providers plus the llmpipe-specific switches every instrumentation point needs."""

    tracer_provider: trace.TracerProvider
    meter_provider: otel_metrics.MeterProvider
    trace_content: bool = False
    genai_provider: str = "openai"
    redactor: Redactor = field(default_factory=lambda: DEFAULT_REDACTOR)
    prometheus: CollectorRegistry | None = None
    """What ``/metrics`` serves: set when a :class:`PrometheusReader` is among the readers."""
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    """``service.instance.id`` of this telemetry's resource, which the JSON logs carry too."""
    tracer: trace.Tracer = field(init=False)
    metrics: PipelineMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer(SCOPE_NAME)
        # A provider that can say it has no reader (ours, or the no-op one) lets the
        # instruments skip recording; any other is taken to have one.
        readers: Readers | None = None
        if isinstance(self.meter_provider, GatedMeterProvider):
            readers = self.meter_provider
        elif isinstance(self.meter_provider, otel_metrics.NoOpMeterProvider):
            readers = _NO_READERS
        self.metrics = PipelineMetrics(self.meter_provider.get_meter(SCOPE_NAME), readers)

    @property
    def records_spans(self) -> bool:
        """Whether spans are recorded (some processor will see them). When not, a span is
        only its context: callers skip attributes, and spans nothing would ever show."""
        provider = self.tracer_provider
        if isinstance(provider, PropagatingTracerProvider):
            return provider.recording
        return not isinstance(provider, trace.NoOpTracerProvider)

    @property
    def carries_trace_context(self) -> bool:
        """Whether trace context is read from inputs and carried to outputs: always, but
        with the SDK disabled (``OTEL_SDK_DISABLED``: no trace ids at all)."""
        return not isinstance(self.tracer_provider, trace.NoOpTracerProvider)

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


_process_instance_id: str | None = None


def instance_id() -> str:
    """The ``service.instance.id`` of this process: its current telemetry's, else the one
    ``configure_observability`` will give it (``OTEL_RESOURCE_ATTRIBUTES`` or a UUID made
    once). A log line written before the telemetry is built names the same instance as
    the spans and metrics after, and asking never builds the telemetry as a side effect."""
    telemetry = _current
    return telemetry.instance_id if telemetry is not None else _process_default(os.environ)


def _process_default(environ: Mapping[str, str]) -> str:
    global _process_instance_id
    configured = _resource_attributes(environ).get(INSTANCE_ID)
    if configured:
        return configured
    if _process_instance_id is None:
        _process_instance_id = str(uuid.uuid4())
    return _process_instance_id


endpoints.set_registry_source(lambda: current().prometheus)


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
        environ = os.environ if environ is None else environ
        telemetry = build_telemetry(environ, instance_id=_process_default(environ))
        if isinstance(telemetry.tracer_provider, TracerProvider) and not isinstance(
            trace.get_tracer_provider(), TracerProvider
        ):
            trace.set_tracer_provider(telemetry.tracer_provider)
        if isinstance(telemetry.meter_provider, MeterProvider):
            otel_metrics.set_meter_provider(telemetry.meter_provider)
        _current = telemetry
    serve_prometheus(telemetry, environ)
    return telemetry


def serve_prometheus(telemetry: Telemetry, environ: Mapping[str, str]) -> None:
    """The scrape endpoint of a process that serves no endpoints of its own (a worker with
    ``LLMPIPE_HEALTH_PORT`` already serves ``/metrics`` there)."""
    if telemetry.prometheus is None or endpoints.serving():
        return
    endpoints.serve(
        environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost"),
        int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")),
    )


def build_telemetry(
    environ: Mapping[str, str],
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    instance_id: str | None = None,
) -> Telemetry:
    """Providers as the environment describes, plus any processors/readers given (tests).

    The resource's ``service.instance.id``: ``OTEL_RESOURCE_ATTRIBUTES``', else
    ``instance_id``, else a new UUID (each telemetry built stands for a process of its own).
    The instance id is made here, when the process builds its telemetry, not at import:
    worker processes forked from one parent must not share it."""
    content = _flag(environ, "LLMPIPE_TRACE_CONTENT")
    provider_name = environ.get("LLMPIPE_GENAI_PROVIDER", "").strip() or "openai"
    instance = _resource_attributes(environ).get(INSTANCE_ID) or instance_id or str(uuid.uuid4())
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return Telemetry(
            trace.NoOpTracerProvider(),
            otel_metrics.NoOpMeterProvider(),
            trace_content=False,
            genai_provider=provider_name,
            instance_id=instance,
        )
    resource = _resource(environ, instance)
    # Records spans only once a processor is added (see observability/spans.py): with no
    # exporter, spans carry their context and cost a small fraction of a recorded span.
    tracer_provider = PropagatingTracerProvider(resource=resource)
    for processor in [*span_processors, *span_processors_from_env(environ)]:
        tracer_provider.add_span_processor(processor)
    readers = [*metric_readers, *metric_readers_from_env(environ)]
    meter_provider = GatedMeterProvider(metric_readers=readers, resource=resource)
    scraped = [r.registry for r in readers if isinstance(r, PrometheusReader)]
    return Telemetry(
        tracer_provider,
        meter_provider,
        trace_content=content,
        genai_provider=provider_name,
        prometheus=scraped[0] if scraped else None,
        instance_id=instance,
    )


def _resource(environ: Mapping[str, str], instance: str) -> Resource:
    """``Resource.create`` reads OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES from os.environ;
    we pass the service name and instance id explicitly so a test's ``environ`` wins too."""
    name = environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME
    return Resource.create({"service.name": name, INSTANCE_ID: instance})


def _resource_attributes(environ: Mapping[str, str]) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as the specification writes it: ``k=v,k2=v2``."""
    pairs = (item.split("=", 1) for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))
    return {k.strip(): v.strip() for k, *rest in pairs for v in rest if k.strip()}


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
            readers.append(PrometheusReader())
        else:
            raise ObservabilityConfigError(
                f"OTEL_METRICS_EXPORTER={name!r} is not supported; "
                "use otlp, console, prometheus or none"
            )
    return readers


class PrometheusReader(PrometheusMetricReader):
    """The SDK's Prometheus reader on a registry of its own, not prometheus_client's
    global one: ``/metrics`` serves exactly this telemetry's instruments, and a test (or
    the overhead benchmark) can build several telemetries side by side."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        super().__init__(registry=self.registry)
