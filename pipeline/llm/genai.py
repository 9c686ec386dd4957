"""GenAI spans and metrics around model calls, following the OpenTelemetry GenAI conventions.

Two levels, because they answer different questions:

* :func:`chat_span` wraps the model-call stage's logical call ("what did answering this
  request cost": the answer's model, finish reason and token usage, or the error that
  sent the request to the fallback path);
* :func:`attempt_span` wraps each attempt inside the retry layer ("what did the provider
  see": one span and one ``gen_ai.client.operation.duration`` sample per HTTP call, so a
  request that needed three tries shows three, with each failure's ``error.type``).
  Re-asks from the settle stage go through the retry layer too, so they are counted
  without the settle stage knowing about telemetry.

Prompts and completions are only recorded when ``LLMPIPE_TRACE_CONTENT=true``, and then
only after redaction: traces are kept longer and read more widely than the data itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pipeline.contract.envelopes import PromptRef
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.observability import semconv as sc
from pipeline.observability.context import current_scope
from pipeline.observability.setup import Telemetry, current

Attributes = dict[str, str | int]


def error_type(exc: BaseException) -> str:
    """Low-cardinality ``error.type``.

    A refusal by our own policy (circuit open, local rate limit, budget) is named by its
    class, so a dashboard can tell "the provider failed" from "we chose not to call";
    a provider failure is named by its kind (``timeout``, ``server_error`` ...).
    """
    if isinstance(exc, ModelError):
        return type(exc).__name__ if exc.local else exc.kind
    return type(exc).__qualname__


def _request_attributes(telemetry: Telemetry, request: ChatRequest) -> Attributes:
    return {
        sc.GEN_AI_OPERATION_NAME: sc.GEN_AI_OPERATION_CHAT,
        sc.GEN_AI_PROVIDER_NAME: telemetry.genai_provider,
        sc.GEN_AI_REQUEST_MODEL: request.model,
    }


def _scope_attributes() -> Attributes:
    scope = current_scope()
    if scope is None:
        return {}
    attrs = scope.prompt_attributes()
    if scope.request_id is not None:
        attrs[sc.REQUEST_ID] = scope.request_id
    return attrs


def _record_answer(span: Span, telemetry: Telemetry, answer: ChatCompletion) -> None:
    span.set_attribute(sc.GEN_AI_RESPONSE_MODEL, answer.model)
    span.set_attribute(sc.GEN_AI_USAGE_INPUT_TOKENS, answer.prompt_tokens)
    span.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, answer.completion_tokens)
    if answer.finish_reason:
        span.set_attribute(sc.GEN_AI_RESPONSE_FINISH_REASONS, [answer.finish_reason])
    if answer.cost_usd is not None:
        span.set_attribute(sc.COST_USD, answer.cost_usd)
    span.set_attribute(sc.STRUCTURED_OUTPUT, answer.structured_output)
    if telemetry.trace_content:
        span.set_attribute(
            sc.GEN_AI_OUTPUT_MESSAGES,
            telemetry.redact_json(
                [
                    {
                        "role": "assistant",
                        "parts": [{"type": "text", "content": answer.text}],
                        "finish_reason": answer.finish_reason,
                    }
                ]
            ),
        )


def _record_error(span: Span, telemetry: Telemetry, exc: BaseException) -> None:
    """Never the raw message: a provider's error text can echo the prompt back."""
    span.set_attribute(sc.ERROR_TYPE, error_type(exc))
    span.set_status(Status(StatusCode.ERROR, telemetry.redactor.text(str(exc))[:256]))


class ChatObservation:
    """Handed to the caller of :func:`chat_span` to report the answer it got."""

    def __init__(self, span: Span, telemetry: Telemetry) -> None:
        self._span = span
        self._telemetry = telemetry

    def answered(self, answer: ChatCompletion) -> None:
        _record_answer(self._span, self._telemetry, answer)
        self._span.set_attribute(sc.ATTEMPTS, answer.attempts)


class _Unobserved(ChatObservation):
    """What :func:`chat_span` and :func:`attempt_span` hand out when nothing would see the
    span (no span processor) nor the metrics (no metric reader): nothing to build."""

    def __init__(self) -> None:
        self.answer: ChatCompletion | None = None

    def answered(self, answer: ChatCompletion) -> None:
        return None


UNOBSERVED = _Unobserved()


@contextmanager
def chat_span(
    request: ChatRequest, prompt: PromptRef | None = None, request_id: str | None = None
) -> Iterator[ChatObservation]:
    """The model-call stage's logical call: one CLIENT span, attempts nest inside it.

    Unrecorded spans are left out (their only use would be a span id for log lines of a
    span nobody can look up): the message's consumer span stays the current one.
    """
    telemetry = current()
    if not telemetry.records_spans:
        yield UNOBSERVED
        return
    attrs = _request_attributes(telemetry, request)
    attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] = request.max_tokens
    if prompt is not None:
        attrs[sc.GEN_AI_PROMPT_NAME] = prompt.name
        attrs[sc.GEN_AI_PROMPT_VERSION] = prompt.version
    if request_id is not None:
        attrs[sc.REQUEST_ID] = request_id
    with telemetry.tracer.start_as_current_span(
        sc.chat_span_name(request.model),
        kind=SpanKind.CLIENT,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        if request.temperature is not None:
            span.set_attribute(sc.GEN_AI_REQUEST_TEMPERATURE, request.temperature)
        if telemetry.trace_content:
            span.set_attribute(
                sc.GEN_AI_INPUT_MESSAGES,
                telemetry.redact_json(
                    [
                        {
                            "role": m.get("role"),
                            "parts": [{"type": "text", "content": m.get("content")}],
                        }
                        for m in request.messages
                    ]
                ),
            )
        try:
            yield ChatObservation(span, telemetry)
        except ModelError as exc:
            _record_error(span, telemetry, exc)
            span.set_attribute(sc.ATTEMPTS, exc.attempts)
            raise


@contextmanager
def attempt_span(request: ChatRequest, attempt: int) -> Iterator[ChatObservation]:
    """One call to the model endpoint: span, duration and token metrics, in-flight gauge.

    Without a span processor or a metric reader nothing of it would be seen, so nothing
    is built (see :func:`chat_span`).
    """
    telemetry = current()
    metrics = telemetry.metrics
    if not telemetry.records_spans and not metrics.recording:
        yield UNOBSERVED
        return
    base = {**_request_attributes(telemetry, request), **_scope_attributes()}
    metric_attrs = {k: v for k, v in base.items() if k != sc.REQUEST_ID}
    if attempt > 1:
        metrics.record_retry(metric_attrs)
    metrics.model_call_started(metric_attrs)
    started = time.perf_counter()
    with telemetry.tracer.start_as_current_span(
        sc.attempt_span_name(request.model),
        kind=SpanKind.INTERNAL,
        attributes={**base, sc.ATTEMPT: attempt},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        observation = _AttemptObservation(span, telemetry)
        try:
            yield observation
        except BaseException as exc:
            _record_error(span, telemetry, exc)
            metrics.record_model_call(
                {**metric_attrs, sc.ERROR_TYPE: error_type(exc)},
                duration_s=time.perf_counter() - started,
            )
            raise
        finally:
            metrics.model_call_finished(metric_attrs)
        answer = observation.answer
        if answer is not None:
            metrics.record_model_call(
                {**metric_attrs, sc.GEN_AI_RESPONSE_MODEL: answer.model},
                duration_s=time.perf_counter() - started,
                input_tokens=answer.prompt_tokens,
                output_tokens=answer.completion_tokens,
                cost_usd=answer.cost_usd,
            )


class _AttemptObservation(ChatObservation):
    def __init__(self, span: Span, telemetry: Telemetry) -> None:
        super().__init__(span, telemetry)
        self.answer: ChatCompletion | None = None

    def answered(self, answer: ChatCompletion) -> None:
        self.answer = answer
        _record_answer(self._span, self._telemetry, answer)
