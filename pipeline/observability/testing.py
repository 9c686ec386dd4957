"""Capture telemetry in memory, or over real OTLP/HTTP, for tests and the overhead benchmark.

Why here and not in ``tests/``: the benchmark and any future integration suite need the
same capture and the same event-driven waiting. Waiting is on a condition variable that
every span export notifies, never on a sleep, so a slow CI machine makes tests slower, not
flaky.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from pipeline.observability.setup import Telemetry, build_telemetry, install


class WaitableSpanExporter(SpanExporter):
    """An in-memory exporter whose waiters wake on every export."""

    def __init__(self) -> None:
        self._spans: list[ReadableSpan] = []
        self._changed = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def spans(self) -> list[ReadableSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[ReadableSpan]], bool], timeout_s: float = 30.0
    ) -> list[ReadableSpan]:
        """Block until ``predicate(all spans so far)`` holds; raise on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self._spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"spans not as expected after {timeout_s}s")
                self._changed.wait(remaining)
            return list(self._spans)


@dataclass
class Captured:
    telemetry: Telemetry
    spans: WaitableSpanExporter
    metrics: InMemoryMetricReader

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, point)`` for every data point of the named metric."""
        return metric_points(self.metrics.get_metrics_data(), name)


def metric_points(data: MetricsData | None, name: str) -> list[tuple[dict[str, Any], Any]]:
    points: list[tuple[dict[str, Any], Any]] = []
    if data is None:
        return points
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    points.extend(
                        (dict(point.attributes or {}), point) for point in metric.data.data_points
                    )
    return points


@contextmanager
def captured_telemetry(
    *,
    trace_content: bool = False,
    extra_processors: Sequence[SpanProcessor] = (),
) -> Iterator[Captured]:
    """Install telemetry that records into memory for the duration of the block.

    Spans go through a ``SimpleSpanProcessor`` so that a span is visible the moment it
    ends; metrics are read on demand (cumulative), so a test compares values it reads.
    """
    exporter = WaitableSpanExporter()
    reader = InMemoryMetricReader()
    environ = {"LLMPIPE_TRACE_CONTENT": "true" if trace_content else "false"}
    telemetry = build_telemetry(
        environ,
        span_processors=[SimpleSpanProcessor(exporter), *extra_processors],
        metric_readers=[reader],
    )
    previous = install(telemetry)
    try:
        yield Captured(telemetry, exporter, reader)
    finally:
        if previous is not None:
            install(previous)
        telemetry.shutdown()


# -- a real OTLP/HTTP endpoint -----------------------------------------------------------------


@dataclass
class OtlpReceiver:
    """A minimal OTLP/HTTP receiver: ``POST /v1/traces`` decoded, ``/v1/metrics`` counted.

    Decodes with ``opentelemetry.proto`` (shipped with the OTLP exporter), so a test sees
    exactly what a collector would.
    """

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    metric_exports: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/metrics":
                    with receiver._changed:
                        receiver.metric_exports += 1
                    self._reply(ExportMetricsServiceResponse().SerializeToString())
                    return
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver._changed:
                    receiver.requests.append(request)
                    receiver.paths.append(self.path)
                    receiver._changed.notify_all()
                self._reply(ExportTraceServiceResponse().SerializeToString())

            def _reply(self, reply: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Block until ``predicate(spans received so far)`` holds; raise on timeout.

        A batch processor's ``force_flush`` does not wait for an export already running on
        its worker thread, so "flushed" is not "received"; this is.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(spans := self.spans()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"OTLP spans not as expected after {timeout_s}s")
                self._changed.wait(remaining)
            return spans

    def spans(self) -> list[dict[str, Any]]:
        """Every received span as a plain dict: name, ids, kind and decoded attributes."""
        with self._changed:
            requests = list(self.requests)
        out: list[dict[str, Any]] = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        out.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "status_message": span.status.message,
                                "attributes": {a.key: any_value(a.value) for a in span.attributes},
                                "events": [
                                    {a.key: any_value(a.value) for a in event.attributes}
                                    for event in span.events
                                ],
                                "resource": resource,
                            }
                        )
        return out


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@contextmanager
def running_otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def otlp_http_processor(endpoint: str) -> BatchSpanProcessor:
    """A batch processor exporting to ``endpoint`` the way the worker's env config would."""
    from pipeline.observability.setup import otlp_span_exporter

    return BatchSpanProcessor(
        otlp_span_exporter(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            }
        )
    )
