"""The default providers: trace context without recording spans until a processor exists,
and no measurements built until a metric reader exists."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from pipeline.observability import semconv as sc
from pipeline.observability.context import MessageScope, current_scope
from pipeline.observability.metrics import GatedMeterProvider
from pipeline.observability.propagation import extract, inject
from pipeline.observability.setup import build_telemetry, install
from pipeline.observability.spans import PropagatingTracerProvider
from pipeline.transport.instrumentation import StageInstrumentation
from pipeline.transport.message import Inbound


def test_without_an_exporter_spans_carry_context_but_record_nothing() -> None:
    telemetry = build_telemetry({})
    tracer = telemetry.tracer
    with tracer.start_as_current_span("root", attributes={"a": 1}) as root:
        assert not root.is_recording()
        context = root.get_span_context()
        assert context.is_valid and context.trace_flags.sampled
        child = tracer.start_span("child")
        assert child.get_span_context().trace_id == context.trace_id
        assert child.get_span_context().span_id != context.span_id
        carried = inject()
    assert carried["traceparent"].endswith("-01")
    assert context.trace_id != tracer.start_span("another root").get_span_context().trace_id


def test_a_remote_parents_trace_id_flags_and_state_are_kept() -> None:
    tracer = build_telemetry({}).tracer
    unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    span = tracer.start_span("consume", context=extract([("traceparent", unsampled)]))
    own = span.get_span_context()
    assert f"{own.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert not own.trace_flags.sampled and not own.is_remote
    parent = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with trace.use_span(NonRecordingSpan(parent)):
        assert tracer.start_span("x").get_span_context().trace_flags.sampled


def test_a_processor_added_later_makes_every_tracer_record() -> None:
    provider = PropagatingTracerProvider()
    early = provider.get_tracer("early")
    assert not early.start_span("before").is_recording()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with early.start_as_current_span("after", attributes={"k": "v"}) as span:
        assert span.is_recording()
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "after" and dict(finished.attributes or {}) == {"k": "v"}


def _stage_messages(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    return sum(
        point.value
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == sc.STAGE_MESSAGES
        for point in metric.data.data_points
    )


def test_without_a_metric_reader_nothing_is_measured_until_one_is_added() -> None:
    telemetry = build_telemetry({})
    provider = telemetry.meter_provider
    assert isinstance(provider, GatedMeterProvider) and not provider.recording
    metrics = telemetry.metrics
    metrics.record_decision("validate", "valid", None, None, duration_s=0.01)
    reader = InMemoryMetricReader()
    provider.add_metric_reader(reader)
    assert provider.recording
    metrics.record_decision("validate", "valid", None, None, duration_s=0.01)
    metrics.record_decision("validate", "valid", None, None, duration_s=0.01)
    assert _stage_messages(reader) == 2
    provider.remove_metric_reader(reader)
    assert not provider.recording


def test_a_reader_given_at_start_sees_every_measurement() -> None:
    reader = InMemoryMetricReader()
    telemetry = build_telemetry({}, metric_readers=[reader])
    telemetry.metrics.record_decision("validate", "valid", None, None, duration_s=0.01)
    assert _stage_messages(reader) == 1


UPSTREAM = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _inbound(traceparent: str | None) -> Inbound:
    headers = {"x-request-id": b"req-1", "x-prompt": b"ticket_triage@2"}
    if traceparent is not None:
        headers["traceparent"] = traceparent.encode()
    return Inbound("llm.requests", 0, 7, None, b"req-1", b"{}", headers)


@pytest.mark.parametrize("exported", [False, True], ids=["unrecorded", "recorded"])
def test_a_stage_message_continues_the_upstream_trace_whether_recorded_or_not(
    exported: bool,
) -> None:
    exporter = InMemorySpanExporter()
    processors = [SimpleSpanProcessor(exporter)] if exported else []
    previous = install(build_telemetry({}, span_processors=processors))
    try:
        instrumentation = StageInstrumentation("validate", "group")
        with instrumentation.message(_inbound(UPSTREAM)) as message:
            inside = trace.get_current_span().get_span_context()
            scope = current_scope()
            carried = message.output_trace("llm.stage.validated", "t", b"k", "valid", "req-1")
        assert not trace.get_current_span().get_span_context().is_valid
        assert current_scope() is None
        with instrumentation.message(_inbound(None)) as message:
            fresh = trace.get_current_span().get_span_context()
            started = message.output_trace("llm.stage.validated", "t", None, "valid", "req-1")
    finally:
        if previous is not None:
            install(previous)
    assert f"{inside.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert inside.trace_flags.sampled
    assert scope == MessageScope("validate", "req-1", "ticket_triage", 2)
    version, trace_id, span_id, flags = carried["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    if exported:  # this hop's producer span is the next hop's parent
        assert f"{inside.span_id:016x}" != "b7ad6b7169203331"
        assert span_id not in ("b7ad6b7169203331", f"{inside.span_id:016x}")
    else:  # no span of this hop is seen, so none is made: the upstream's goes on
        assert (f"{inside.span_id:016x}", span_id) == ("b7ad6b7169203331", "b7ad6b7169203331")
    assert started["traceparent"].split("-")[1] == f"{fresh.trace_id:032x}" != trace_id
    names = [s.name for s in exporter.get_finished_spans()]
    assert len(names) == (4 if exported else 0)


def _hop(exporter: InMemorySpanExporter | None, traceparent: str | None) -> str:
    """One message through a stage's instrumentation under its own telemetry (recorded
    when given an exporter); the ``traceparent`` its output carries."""
    processors = [SimpleSpanProcessor(exporter)] if exporter is not None else []
    previous = install(build_telemetry({}, span_processors=processors))
    try:
        with StageInstrumentation("stage", "group").message(_inbound(traceparent)) as message:
            return message.output_trace("llm.stage.validated", "t", b"k", "valid", "req-1")[
                "traceparent"
            ]
    finally:
        if previous is not None:
            install(previous)


def test_a_hop_that_records_nothing_keeps_a_mixed_fleets_trace_connected() -> None:
    """Recorded, then unrecorded, then recorded: the third hop's consumer span is a child
    of the first hop's producer span, a span the tracing backend has, not of an id the
    silent hop made up."""
    first, third = InMemorySpanExporter(), InMemorySpanExporter()
    carried = _hop(first, UPSTREAM)
    passed_on = _hop(None, carried)
    assert passed_on == carried
    _hop(third, passed_on)
    (producer,) = [s for s in first.get_finished_spans() if s.kind == trace.SpanKind.PRODUCER]
    (consumer,) = [s for s in third.get_finished_spans() if s.kind == trace.SpanKind.CONSUMER]
    assert consumer.parent is not None and producer.context is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.context is not None
    assert consumer.context.trace_id == producer.context.trace_id


def test_with_the_sdk_disabled_no_trace_context_is_read_or_carried() -> None:
    previous = install(build_telemetry({"OTEL_SDK_DISABLED": "true"}))
    try:
        instrumentation = StageInstrumentation("validate", "group")
        with instrumentation.message(_inbound(UPSTREAM)) as message:
            inside = trace.get_current_span().get_span_context()
            carried = message.output_trace("llm.stage.validated", "t", b"k", "valid", "req-1")
            scope = current_scope()
    finally:
        if previous is not None:
            install(previous)
    assert not inside.is_valid and carried == {}
    assert scope == MessageScope("validate", "req-1", "ticket_triage", 2)
