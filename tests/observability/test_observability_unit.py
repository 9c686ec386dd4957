"""Observability without a broker: names, exporter selection, task-local spans, per-attempt
GenAI telemetry, the metric hooks, logs, and that the dashboard only asks for what exists."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai_sc
from opentelemetry.semconv._incubating.attributes import messaging_attributes as messaging_sc
from opentelemetry.semconv.attributes import error_attributes
from opentelemetry.trace import SpanKind

from pipeline.cli.trace import parse_since, trace_id_of
from pipeline.config import REPO_ROOT
from pipeline.contract.codec import Codec
from pipeline.contract.decisions import DeadLetter, Decision, Emit, end_to_end_s
from pipeline.contract.envelopes import Escalation, PromptRef, utc_now
from pipeline.contract.topology import FALLBACK, REVIEW, VALIDATED
from pipeline.llm.genai import chat_span
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.observability import semconv as sc
from pipeline.observability.context import MessageScope, current_scope, message_scope
from pipeline.observability.logs import JsonFormatter
from pipeline.observability.metrics import PipelineMetrics
from pipeline.observability.propagation import inject
from pipeline.observability.redact import Redactor
from pipeline.observability.setup import (
    ObservabilityConfigError,
    build_telemetry,
    current,
    install,
    metric_readers_from_env,
    span_processors_from_env,
)
from pipeline.observability.testing import Captured, captured_telemetry, metric_points
from pipeline.resilience.breaker import BreakerConfig, CircuitBreaker
from pipeline.resilience.errors import CircuitOpen
from pipeline.resilience.retry import RetryingClient
from pipeline.transport.runner import Inbound, StageRunner
from tests.stage_support import validated
from tests.support import until
from tests.transport.fake_kafka import FakeBroker, FakeClients

DASHBOARD = REPO_ROOT / "infra" / "grafana" / "dashboards" / "llmpipe.json"


@pytest.fixture
def captured() -> Iterator[Captured]:
    with captured_telemetry() as cap:
        yield cap


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- names --------------------------------------------------------------------------------


def test_our_copies_of_convention_names_match_the_conventions() -> None:
    pairs = {
        sc.GEN_AI_OPERATION_NAME: genai_sc.GEN_AI_OPERATION_NAME,
        sc.GEN_AI_PROVIDER_NAME: genai_sc.GEN_AI_PROVIDER_NAME,
        sc.GEN_AI_REQUEST_MODEL: genai_sc.GEN_AI_REQUEST_MODEL,
        sc.GEN_AI_RESPONSE_MODEL: genai_sc.GEN_AI_RESPONSE_MODEL,
        sc.GEN_AI_USAGE_INPUT_TOKENS: genai_sc.GEN_AI_USAGE_INPUT_TOKENS,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: genai_sc.GEN_AI_USAGE_OUTPUT_TOKENS,
        sc.GEN_AI_RESPONSE_FINISH_REASONS: genai_sc.GEN_AI_RESPONSE_FINISH_REASONS,
        sc.GEN_AI_PROMPT_NAME: genai_sc.GEN_AI_PROMPT_NAME,
        sc.GEN_AI_TOKEN_TYPE: genai_sc.GEN_AI_TOKEN_TYPE,
        sc.GEN_AI_INPUT_MESSAGES: genai_sc.GEN_AI_INPUT_MESSAGES,
        sc.GEN_AI_OUTPUT_MESSAGES: genai_sc.GEN_AI_OUTPUT_MESSAGES,
        sc.GEN_AI_REQUEST_MAX_TOKENS: genai_sc.GEN_AI_REQUEST_MAX_TOKENS,
        sc.GEN_AI_REQUEST_TEMPERATURE: genai_sc.GEN_AI_REQUEST_TEMPERATURE,
        sc.MESSAGING_SYSTEM: messaging_sc.MESSAGING_SYSTEM,
        sc.MESSAGING_OPERATION_TYPE: messaging_sc.MESSAGING_OPERATION_TYPE,
        sc.MESSAGING_OPERATION_NAME: messaging_sc.MESSAGING_OPERATION_NAME,
        sc.MESSAGING_DESTINATION_NAME: messaging_sc.MESSAGING_DESTINATION_NAME,
        sc.MESSAGING_CONSUMER_GROUP_NAME: messaging_sc.MESSAGING_CONSUMER_GROUP_NAME,
        sc.MESSAGING_DESTINATION_PARTITION_ID: messaging_sc.MESSAGING_DESTINATION_PARTITION_ID,
        sc.MESSAGING_KAFKA_OFFSET: messaging_sc.MESSAGING_KAFKA_OFFSET,
        sc.MESSAGING_KAFKA_MESSAGE_KEY: messaging_sc.MESSAGING_KAFKA_MESSAGE_KEY,
        sc.MESSAGING_MESSAGE_BODY_SIZE: messaging_sc.MESSAGING_MESSAGE_BODY_SIZE,
        sc.ERROR_TYPE: error_attributes.ERROR_TYPE,
    }
    assert {ours: theirs for ours, theirs in pairs.items() if ours != theirs} == {}


def test_attribute_names_live_only_in_semconv() -> None:
    """No instrumentation point spells an attribute name itself."""
    literal = re.compile(r"""(?<!getLogger\()["'](?:gen_ai|messaging|llmpipe)\.[a-z_.]+["']""")
    offenders = []
    for path in [
        REPO_ROOT / "pipeline" / "transport" / "runner.py",
        REPO_ROOT / "pipeline" / "transport" / "instrumentation.py",
        REPO_ROOT / "pipeline" / "resilience" / "retry.py",
        REPO_ROOT / "pipeline" / "llm" / "genai.py",
        REPO_ROOT / "pipeline" / "stages" / "model_call.py",
        *sorted((REPO_ROOT / "pipeline" / "observability").glob("*.py")),
    ]:
        if path.name == "semconv.py":
            continue
        offenders += [f"{path.name}: {m}" for m in literal.findall(path.read_text())]
    assert offenders == []


# -- configuration from the environment --------------------------------------------------------


def test_nothing_is_exported_by_default_but_trace_ids_exist() -> None:
    telemetry = build_telemetry({})
    assert span_processors_from_env({}) == [] and metric_readers_from_env({}) == []
    assert isinstance(telemetry.tracer_provider, TracerProvider)
    assert telemetry.trace_content is False
    with telemetry.tracer.start_as_current_span("x") as span:
        assert span.get_span_context().is_valid


@pytest.mark.parametrize(
    ("environ", "exporter_module", "endpoint"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "http://c:4318/v1/traces",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
            },
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
            None,
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9999/custom",
            },
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "http://t:9999/custom",
        ),
    ],
)
def test_otlp_trace_exporter_follows_the_standard_variables(
    environ: dict[str, str], exporter_module: str, endpoint: str | None
) -> None:
    [processor] = span_processors_from_env(environ)
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor._batch_processor._exporter  # type: ignore[attr-defined]
    assert type(exporter).__module__ == exporter_module
    if endpoint is not None:
        assert exporter._endpoint == endpoint
    processor.shutdown()


def test_console_metrics_and_grpc_metrics_and_bad_values() -> None:
    assert [
        type(p).__name__ for p in span_processors_from_env({"OTEL_TRACES_EXPORTER": "console"})
    ] == [SimpleSpanProcessor.__name__]
    readers = metric_readers_from_env(
        {"OTEL_METRICS_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert len(readers) == 2
    assert type(readers[0]._exporter).__module__.endswith("grpc.metric_exporter")  # type: ignore[attr-defined]
    for reader in readers:
        reader.shutdown()
    with pytest.raises(ObservabilityConfigError):
        span_processors_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ObservabilityConfigError):
        span_processors_from_env(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


def test_sdk_disabled_and_content_switch() -> None:
    off = build_telemetry({"OTEL_SDK_DISABLED": "true", "LLMPIPE_TRACE_CONTENT": "true"})
    assert not off.tracer.start_span("x").is_recording() and off.trace_content is False
    on = build_telemetry({"LLMPIPE_TRACE_CONTENT": "TRUE", "OTEL_SERVICE_NAME": "svc"})
    assert on.trace_content is True
    assert on.tracer_provider.resource.attributes["service.name"] == "svc"  # type: ignore[attr-defined]


# -- content -----------------------------------------------------------------------------------


def _chat() -> ChatRequest:
    return ChatRequest(
        model="m", messages=[{"role": "user", "content": "mail me: jane.doe@example.com"}]
    )


def _answer(text: str = '{"ok": true}') -> ChatCompletion:
    return ChatCompletion(text, "m-2025", "stop", 12, 3)


def test_prompts_and_completions_are_off_by_default_and_redacted_when_on() -> None:
    for content in (False, True):
        with captured_telemetry(trace_content=content) as cap:
            with chat_span(_chat(), PromptRef(name="p", version=3, hash="h")) as observed:
                observed.answered(_answer("call +49 170 1234567 now"))
            [span] = cap.spans.spans()
        a = attrs(span)
        assert span.kind is SpanKind.CLIENT and span.name == "chat m"
        assert a[sc.GEN_AI_RESPONSE_MODEL] == "m-2025" and a[sc.GEN_AI_USAGE_INPUT_TOKENS] == 12
        assert (a[sc.GEN_AI_PROMPT_NAME], a[sc.GEN_AI_PROMPT_VERSION]) == ("p", 3)
        if not content:
            assert sc.GEN_AI_INPUT_MESSAGES not in a and sc.GEN_AI_OUTPUT_MESSAGES not in a
            continue
        text = a[sc.GEN_AI_INPUT_MESSAGES] + a[sc.GEN_AI_OUTPUT_MESSAGES]
        assert "jane.doe@example.com" not in text and "1234567" not in text
        assert "[EMAIL]" in text and "[PHONE]" in text
        assert json.loads(a[sc.GEN_AI_INPUT_MESSAGES])[0]["role"] == "user"


# -- per-attempt spans and GenAI metrics ----------------------------------------------------


class Flaky:
    def __init__(self, *outcomes: ChatCompletion | ModelError) -> None:
        self.outcomes = list(outcomes)

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, ModelError):
            raise outcome
        return outcome

    async def aclose(self) -> None:
        return None


def test_each_retry_attempt_is_a_span_and_a_duration_sample(captured: Captured) -> None:
    client = RetryingClient(
        Flaky(ModelError("server_error", "500 for jane@x.io"), _answer()), initial_wait_s=0.001
    )
    scope = MessageScope("model", "r-7", "ticket_triage", 2)

    async def call() -> ChatCompletion:
        with message_scope(scope), chat_span(_chat(), request_id="r-7") as observed:
            answer = await client.complete(_chat())
            observed.answered(answer)
            return answer

    assert asyncio.run(call()).attempts == 2
    spans = captured.spans.spans()
    chat = next(s for s in spans if s.kind is SpanKind.CLIENT)
    first, second = sorted(
        (s for s in spans if s.name == "chat m attempt"), key=lambda s: attrs(s)[sc.ATTEMPT]
    )
    assert first.parent.span_id == second.parent.span_id == chat.context.span_id  # type: ignore[union-attr]
    assert attrs(first)[sc.ERROR_TYPE] == "server_error"
    assert "jane@x.io" not in (first.status.description or "")
    assert sc.ERROR_TYPE not in attrs(second) and attrs(second)[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 3
    assert attrs(first)[sc.REQUEST_ID] == "r-7" and attrs(first)[sc.GEN_AI_PROMPT_VERSION] == 2
    assert attrs(chat)[sc.ATTEMPTS] == 2

    durations = captured.metric_points(sc.GEN_AI_CLIENT_OPERATION_DURATION)
    assert sorted((a.get(sc.ERROR_TYPE, "-"), p.count) for a, p in durations) == [
        ("-", 1),
        ("server_error", 1),
    ]
    for a, point in durations:
        assert a[sc.GEN_AI_OPERATION_NAME] == "chat" and a[sc.GEN_AI_PROVIDER_NAME] == "openai"
        assert (a[sc.GEN_AI_PROMPT_NAME], a[sc.GEN_AI_PROMPT_VERSION]) == ("ticket_triage", 2)
        assert sc.REQUEST_ID not in a, "request ids would explode metric cardinality"
        assert list(point.explicit_bounds) == list(sc.GEN_AI_DURATION_BUCKETS)
    tokens = {
        a[sc.GEN_AI_TOKEN_TYPE]: p for a, p in captured.metric_points(sc.GEN_AI_CLIENT_TOKEN_USAGE)
    }
    assert (tokens["input"].sum, tokens["output"].sum) == (12, 3)
    assert list(tokens["input"].explicit_bounds) == list(sc.GEN_AI_TOKEN_BUCKETS)
    [(_, retries)] = captured.metric_points(sc.MODEL_RETRIES)
    assert retries.value == 1
    assert sum(p.value for _, p in captured.metric_points(sc.MODEL_IN_FLIGHT)) == 0


def test_a_local_refusal_is_named_by_its_class(captured: Captured) -> None:
    client = RetryingClient(Flaky(CircuitOpen("m", retry_after_s=5.0)), max_attempts=1)
    with pytest.raises(CircuitOpen):
        asyncio.run(client.complete(_chat()))
    [span] = captured.spans.spans()
    assert attrs(span)[sc.ERROR_TYPE] == "CircuitOpen"


# -- the runner: every message its own span context ------------------------------------------


def test_concurrent_messages_in_the_runner_never_share_a_span_or_scope(captured: Captured) -> None:
    count = 50
    envelope = validated()
    prompt = envelope.prompt
    mixups: list[str] = []
    broker = FakeBroker()
    for i in range(count):
        parent = f"00-{i + 1:032x}-{i + 1:016x}-01".encode()
        headers = [("x-request-id", f"r-{i}".encode()), ("traceparent", parent)]
        broker.append("in", 0, b"{}", key=f"r-{i}".encode(), headers=headers)

    async def main() -> StageRunner:
        release = asyncio.Event()
        arrived = 0

        async def handler(message: Inbound) -> Decision:
            nonlocal arrived
            rid = message.headers["x-request-id"].decode()
            arrived += 1
            if arrived == count:
                release.set()
            await release.wait()  # every message is in flight at once, interleaved
            scope = current_scope()
            span = trace.get_current_span()
            if scope is None or scope.request_id != rid:
                mixups.append(f"scope {scope} in {rid}")
            if dict(span.attributes).get(sc.REQUEST_ID) != rid:  # type: ignore[attr-defined]
                mixups.append(f"span of another message in {rid}")
            return Emit(VALIDATED, envelope, rid, prompt)

        runner = StageRunner(
            stage="model",
            input_topic="in",
            group="g",
            handler=handler,
            clients=FakeClients(broker, [("in", 0)]),
            codec=Codec(),
            redactor=Redactor(),
            topic_name=lambda t: f"x.{t}",
            max_in_flight=count,
            commit_interval_ms=10,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await until(
            lambda: broker.committed.get(("in", 0), (0, ""))[0] == count, "every offset committed"
        )
        stop.set()
        await task
        return runner

    runner = asyncio.run(main())
    assert mixups == []
    assert runner.stats.max_in_flight_seen == count
    spans = captured.spans.spans()
    consumers = {attrs(s)[sc.REQUEST_ID]: s for s in spans if s.kind is SpanKind.CONSUMER}
    producers = {attrs(s)[sc.REQUEST_ID]: s for s in spans if s.kind is SpanKind.PRODUCER}
    assert len(consumers) == len(producers) == count
    for i in range(count):
        consumer, producer = consumers[f"r-{i}"], producers[f"r-{i}"]
        assert consumer.context.trace_id == i + 1, "continues its own upstream trace"
        assert consumer.parent.span_id == i + 1  # type: ignore[union-attr]
        assert producer.parent.span_id == consumer.context.span_id  # type: ignore[union-attr]
        assert attrs(producer)[sc.MESSAGING_DESTINATION_NAME] == "x.llm.stage.validated"
    assert len(broker.outputs) == count
    for output in broker.outputs:
        header = dict(output.headers)
        rid = header["x-request-id"].decode()
        assert header["traceparent"].decode().split("-")[2] == format(
            producers[rid].context.span_id, "016x"
        ), "the next hop's parent is this message's producer span"
    stage = {a.get(sc.ROUTE): p.value for a, p in captured.metric_points(sc.STAGE_MESSAGES)}
    assert stage == {"validated": count}, "counted once committed"
    assert sum(p.value for _, p in captured.metric_points(sc.STAGE_IN_FLIGHT)) == 0


# -- metric hooks for other layers ------------------------------------------------------------


def test_breaker_listener_control_changes_human_decisions_and_lag() -> None:
    reader = InMemoryMetricReader()
    metrics = PipelineMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    clock = type("Clock", (), {"t": 0.0, "monotonic": lambda self: self.t})()
    breaker = CircuitBreaker(
        "gpt-x",
        BreakerConfig(window_size=2, min_calls=2, open_s=1.0),
        clock=clock,  # type: ignore[arg-type]
        on_state_change=metrics.breaker_state_changed,
    )
    for _ in range(2):
        breaker.record(breaker.acquire(), failed=True)
    data = reader.get_metrics_data()
    [(labels, state)] = metric_points(data, sc.BREAKER_STATE_GAUGE)
    assert labels == {sc.BREAKER_NAME: "gpt-x"} and state.value == 2
    [(labels, moved)] = metric_points(data, sc.BREAKER_TRANSITIONS)
    assert (labels[sc.BREAKER_PREVIOUS_STATE], labels[sc.BREAKER_STATE], moved.value) == (
        "closed",
        "open",
        1,
    )

    metrics.control_changed("flag:force_review:ticket_triage")
    metrics.control_changed("pin:ticket_triage")
    metrics.human_decided("edit", PromptRef(name="p", version=2, hash="h"))
    metrics.rate_limit_waited("m", 0.25)
    unwatch = metrics.watch_lag(lambda: [({sc.STAGE: "model"}, 42)])
    data = reader.get_metrics_data()
    changes = {
        tuple(sorted(a.items())): p.value for a, p in metric_points(data, sc.CONTROL_CHANGES)
    }
    assert changes == {
        (
            (sc.CONTROL_KIND, "flag"),
            (sc.CONTROL_NAME, "force_review"),
            (sc.CONTROL_SCOPE, "ticket_triage"),
        ): 1,
        ((sc.CONTROL_KIND, "pin"), (sc.CONTROL_NAME, "ticket_triage")): 1,
    }
    [(labels, _)] = metric_points(data, sc.HUMAN_DECISIONS)
    assert labels == {
        sc.REVIEW_ACTION: "edit",
        sc.GEN_AI_PROMPT_NAME: "p",
        sc.GEN_AI_PROMPT_VERSION: 2,
    }
    [(_, waited)] = metric_points(data, sc.RATE_LIMIT_WAIT_DURATION)
    assert waited.sum == 0.25
    [(labels, lag)] = metric_points(data, sc.CONSUMER_LAG)
    assert lag.value == 42
    unwatch()
    assert metric_points(reader.get_metrics_data(), sc.CONSUMER_LAG) in ([], [(labels, lag)])


def test_process_wide_hooks_reach_the_installed_telemetry(captured: Captured) -> None:
    from pipeline.observability import record_breaker_change, record_human_decision

    assert current() is captured.telemetry
    record_breaker_change("q", "closed", "half_open")
    record_human_decision("approve")
    assert [p.value for _, p in captured.metric_points(sc.BREAKER_STATE_GAUGE)] == [1]
    assert [p.value for _, p in captured.metric_points(sc.HUMAN_DECISIONS)] == [1]


def test_a_breaker_change_is_one_log_line_an_opening_a_warning(
    captured: Captured, caplog: pytest.LogCaptureFixture
) -> None:
    """Where requests go changes for a whole open interval: operators see it in the log."""
    from pipeline.observability import record_breaker_change

    with caplog.at_level(logging.INFO, logger="llmpipe.breaker"):
        record_breaker_change("m1", "closed", "open")
        record_breaker_change("m1", "open", "half_open")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "circuit breaker m1: closed -> open"),
        (logging.INFO, "circuit breaker m1: open -> half_open"),
    ]


def test_install_returns_the_previous_telemetry() -> None:
    first = build_telemetry({})
    before = install(first)
    try:
        assert current() is first
    finally:
        if before is not None:
            install(before)


# -- logs ----------------------------------------------------------------------------------------


def test_log_lines_carry_trace_and_request_ids_and_are_redacted(captured: Captured) -> None:
    record = logging.LogRecord("llmpipe.t", logging.INFO, __file__, 1, "mail %s", ("a@b.io",), None)
    record.detail = "card 4111 1111 1111 1111"
    record.request_id = "req-11-000123"  # looks like a phone number, but is an identifier
    with (
        message_scope(MessageScope("settle", "req-11-000123", "ticket_triage", 2)),
        captured.telemetry.tracer.start_as_current_span("s") as span,
    ):
        line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "mail [EMAIL]" and line["detail"] == "card [CARD]"
    assert line["request_id"] == "req-11-000123" and line["stage"] == "settle"
    assert line["prompt"] == "ticket_triage@2"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_log_lines_name_the_instance_that_the_spans_and_metrics_name(captured: Captured) -> None:
    record = logging.LogRecord("llmpipe.t", logging.WARNING, __file__, 1, "outage", None, None)
    line = json.loads(JsonFormatter().format(record))
    resource = captured.telemetry.tracer_provider.resource  # type: ignore[attr-defined]
    assert line["service.instance.id"] == resource.attributes["service.instance.id"]


LOG_THEN_CONFIGURE = """
import json, logging
from pipeline.observability import configure_observability
from pipeline.observability.logs import JsonFormatter
def logged():
    record = logging.LogRecord("llmpipe.t", logging.INFO, "", 1, "m", None, None)
    return json.loads(JsonFormatter().format(record))["service.instance.id"]
before = logged()
resource = configure_observability().tracer_provider.resource
print(json.dumps([before, logged(), resource.attributes["service.instance.id"]]))
"""


@pytest.mark.parametrize("configured", [None, "pod-7"])
def test_lines_logged_before_the_telemetry_is_built_name_the_same_instance(
    configured: str | None,
) -> None:
    """A fresh process: its first lines (settings, start-up) come before its telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if configured is not None:
        env["OTEL_RESOURCE_ATTRIBUTES"] = f"service.instance.id={configured},zone=a"
    out = subprocess.run(
        [sys.executable, "-c", LOG_THEN_CONFIGURE],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    before, after, resource = json.loads(out.stdout)
    assert before == after == resource
    assert resource == configured if configured is not None else uuid.UUID(resource)


def test_a_phone_number_next_to_other_digits_is_redacted() -> None:
    assert "+30 100 100 1000" not in Redactor().text("+30 100 100 1000 4000000000000002")


# -- trace CLI helpers ------------------------------------------------------------------------


def test_since_accepts_ages_and_iso_times() -> None:
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_since("90s", now) == datetime(2026, 1, 2, 11, 58, 30, tzinfo=UTC)
    assert parse_since("2h", now) == datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
    assert parse_since("2026-01-01T00:00:00", now) == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an age"):
        parse_since("yesterday", now)
    assert trace_id_of(f"00-{'a' * 32}-{'b' * 16}-01") == "a" * 32
    assert trace_id_of("garbage") is None and trace_id_of(None) is None


def test_inject_outside_a_span_adds_no_header() -> None:
    assert inject() == {}


# -- the dashboard asks only for metrics and labels that exist --------------------------------


def _prometheus_names() -> tuple[set[str], set[str]]:
    """Metric and label names as the collector's Prometheus exporter spells ours."""
    reader = InMemoryMetricReader()
    metrics = PipelineMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    request = validated()
    escalation = Escalation(validated=request, reason="why", escalated_at=utc_now())
    for stage, decision in [
        ("validate", Emit(VALIDATED, request, "r", request.prompt)),
        ("validate", DeadLetter("validate", "too_large", "RequestTooLarge", "big", "r")),
        ("model", Emit(FALLBACK, escalation, "r", request.prompt, "why")),
        ("settle", Emit(REVIEW, escalation, "r", request.prompt, "invalid_output")),
    ]:
        metrics.record_decision(
            stage,
            decision.route,
            decision.reason,
            decision.prompt,
            duration_s=0.1,
            error_class=decision.error_class,
            result_source=decision.result_source,
            end_to_end_s=end_to_end_s(decision, 1),
        )
    metrics.record_model_call({sc.GEN_AI_REQUEST_MODEL: "m"}, duration_s=0.1, input_tokens=1)
    metrics.record_retry({})
    metrics.model_call_started({})
    metrics.stage_started("s")
    metrics.breaker_state_changed("b", "closed", "open")
    metrics.rate_limit_waited("m", 1.0)
    metrics.rate_limit_rejected("m")
    metrics.control_changed("flag:x:y")
    metrics.human_decided("approve")
    metrics.audit_verdict("correct")
    metrics.watch_accepted_error(lambda: {("p", 1): 0.1})
    metrics.watch_lag(lambda: [({}, 1)])
    names: set[str] = set()
    for resource in reader.get_metrics_data().resource_metrics:  # type: ignore[union-attr]
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                base = metric.name.replace(".", "_") + ("_seconds" if metric.unit == "s" else "")
                kind = type(metric.data).__name__
                if kind == "Histogram":
                    names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
                elif kind == "Sum" and metric.data.is_monotonic:  # type: ignore[union-attr]
                    names.add(f"{base}_total")
                else:
                    names.add(base)
    labels = {
        v.replace(".", "_")
        for k, v in vars(sc).items()
        if k.isupper() and isinstance(v, str) and "." in v
    } | {"le"}
    return names, labels


def test_every_dashboard_query_uses_existing_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ] + [dashboard["templating"]["list"][0]["definition"]]
    metrics, labels = _prometheus_names()
    used_metrics: set[str] = set()
    used_labels: set[str] = set()
    for expr in exprs:
        for group in re.findall(r"by \(([^)]*)\)", expr):
            used_labels |= {g.strip() for g in group.split(",")}
        for selector in re.findall(r"\{([^}]*)\}", expr):
            used_labels |= set(re.findall(r"([a-z_]+)\s*(?:=~|!=|=)", selector))
        stripped = re.sub(r"by \([^)]*\)|\{[^}]*\}|label_values\([^,]*,\s*[a-z_]+\)", "", expr)
        used_metrics |= set(re.findall(r"\b(?:llmpipe|gen_ai)_[a-z_]+\b", stripped))
        used_metrics |= set(re.findall(r"label_values\(([a-z_]+)", expr))
    assert used_metrics and used_metrics <= metrics, used_metrics - metrics
    assert used_labels <= labels, used_labels - labels
    assert {p["title"] for p in dashboard["panels"]} >= {
        "Requests by terminal route",
        "Fallback, review and dead-letter rates",
        "End-to-end latency (request received to terminal message)",
        "Tokens per prompt version",
        "Circuit breaker state",
    }


def test_infra_files_parse() -> None:
    import yaml

    for path in [
        REPO_ROOT / "infra" / "otel" / "collector.yaml",
        REPO_ROOT / "infra" / "prometheus" / "prometheus.yml",
        *sorted((REPO_ROOT / "infra" / "grafana" / "provisioning").rglob("*.yaml")),
    ]:
        assert isinstance(yaml.safe_load(Path(path).read_text()), dict), path
    collector = yaml.safe_load((REPO_ROOT / "infra" / "otel" / "collector.yaml").read_text())
    pipelines = collector["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"] == pipelines["metrics"]["receivers"]
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]


@pytest.mark.parametrize(
    "module",
    ["pipeline.resilience.retry", "pipeline.llm.genai", "pipeline.stages.model_call"],
)
def test_modules_import_on_their_own(module: str) -> None:
    """The retry layer, the resilience package and the GenAI helpers once imported each
    other in a loop; each must import first, in a fresh interpreter."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-500:]
