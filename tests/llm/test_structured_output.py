"""Structured output and request parameters: the bodies llmpipe sends, what the fake does
with them over real HTTP, and what happens when an endpoint refuses a mode."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from pipeline.contract.decisions import Emit
from pipeline.contract.envelopes import Completion, Escalation, Result
from pipeline.contract.topology import COMPLETIONS, FALLBACK, RESULTS
from pipeline.control.state import ControlState
from pipeline.harness.fakellm import FakeLLMServer
from pipeline.llm.openai import OpenAIChatClient, chat_body
from pipeline.llm.protocol import ChatRequest, EndpointOptions, ModelError
from pipeline.llm.structured import StructuredOutput, response_format, strict_decision
from pipeline.resilience.breaker import BreakerState
from pipeline.resilience.endpoints import EndpointConfigError, parse_endpoints
from pipeline.resilience.stack import ResilientClient, StackConfig, build_client
from pipeline.stages.model_call import ModelCaller, chat_request
from pipeline.stages.settle import Settler
from tests.stage_support import GOOD_ANSWER, REGISTRY, validated

STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label", "tags", "when"],
    "properties": {
        "label": {"type": "string", "enum": ["a", "b"]},
        "tags": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {"name": {"type": ["string", "null"], "pattern": "^[a-z]+$"}},
            },
        },
        "when": {"type": "string", "format": "date"},
    },
}
MESSAGES = [{"role": "user", "content": "Reply with JSON."}]


def test_a_closed_fully_required_schema_is_strict() -> None:
    decision = strict_decision(STRICT_SCHEMA)
    assert decision.strict and decision.reasons == ()
    assert decision.explain().startswith("strict")


def test_every_reason_a_schema_is_not_strict_is_named_with_its_path() -> None:
    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {"type": "string", "minLength": 1},
            "b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]},
            "d": {"allOf": [{"type": "string"}], "format": "uri"},
        },
    }
    reasons = strict_decision(schema).reasons
    assert "$ does not set additionalProperties: false" in reasons
    assert "$ has optional properties b, d" in reasons
    assert "$.a uses minLength" in reasons
    assert "$.b does not set additionalProperties: false" in reasons
    assert "$.d uses allOf" in reasons and "$.d uses format 'uri'" in reasons
    assert "non-strict" in strict_decision(schema).explain()


def test_the_shipped_triage_schema_is_non_strict_because_of_its_length_bounds() -> None:
    decision = REGISTRY.get("ticket_triage", 2).strict_output
    assert not decision.strict
    assert decision.reasons == ("$.summary uses maxLength", "$.summary uses minLength")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", None),
        ("json_object", {"type": "json_object"}),
        ("json_object_schema", {"type": "json_object", "schema": STRICT_SCHEMA}),
        (
            "json_schema",
            {
                "type": "json_schema",
                "json_schema": {"name": "triage", "schema": STRICT_SCHEMA, "strict": True},
            },
        ),
    ],
)
def test_the_body_carries_the_mode_the_endpoint_takes(
    mode: StructuredOutput, expected: dict[str, Any] | None
) -> None:
    request = ChatRequest(
        model="m",
        messages=MESSAGES,
        output_schema=STRICT_SCHEMA,
        schema_name="triage",
        schema_strict=True,
        endpoint=EndpointOptions(structured_output=mode),
    )
    assert chat_body(request).get("response_format") == expected
    assert response_format(mode, STRICT_SCHEMA, "triage", True) == expected


def test_the_prompt_overrides_the_endpoints_mode_and_no_schema_means_json_object() -> None:
    request = ChatRequest(
        model="m",
        messages=MESSAGES,
        output_schema=STRICT_SCHEMA,
        structured_output="json_object_schema",
        endpoint=EndpointOptions(structured_output="json_schema"),
    )
    assert chat_body(request)["response_format"]["type"] == "json_object"
    assert "schema" in chat_body(request)["response_format"]
    no_schema = ChatRequest(model="m", messages=MESSAGES, structured_output="json_schema")
    assert chat_body(no_schema)["response_format"] == {"type": "json_object"}


def test_sampling_parameters_go_on_the_wire_only_when_set() -> None:
    plain = chat_body(ChatRequest(model="m", messages=MESSAGES))
    assert plain == {"model": "m", "messages": MESSAGES, "max_tokens": 512, "temperature": 0.0}
    full = chat_body(
        ChatRequest(
            model="m",
            messages=MESSAGES,
            temperature=0.3,
            max_tokens=40,
            logprobs=True,
            seed=7,
            stop=("\n\n",),
            top_p=0.9,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        )
    )
    assert full == {
        "model": "m",
        "messages": MESSAGES,
        "max_tokens": 40,
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logprobs": True,
        "top_logprobs": 0,
        "seed": 7,
        "stop": ["\n\n"],
    }
    modern = EndpointOptions(token_limit_param="max_completion_tokens")
    body = chat_body(ChatRequest(model="m", messages=MESSAGES, endpoint=modern))
    assert body["max_completion_tokens"] == 512 and "max_tokens" not in body


def test_reasoning_models_get_max_completion_tokens_and_no_sampling() -> None:
    sampled = {"temperature": 0.5, "top_p": 0.5, "presence_penalty": 1.0, "logprobs": True}
    by_endpoint = chat_body(
        ChatRequest(
            model="o3-mini",
            messages=MESSAGES,
            temperature=0.5,
            top_p=0.5,
            presence_penalty=1.0,
            logprobs=True,
            seed=1,
            endpoint=EndpointOptions(reasoning=True),
        )
    )
    assert by_endpoint == {
        "model": "o3-mini",
        "messages": MESSAGES,
        "max_completion_tokens": 512,
        "seed": 1,
    }
    assert not set(sampled) & set(by_endpoint)
    by_prompt = chat_body(
        ChatRequest(model="o3-mini", messages=MESSAGES, temperature=None, reasoning_effort="low")
    )
    assert by_prompt["reasoning_effort"] == "low" and "temperature" not in by_prompt


def test_extra_body_adds_fields_endpoint_first_then_prompt_never_model_or_messages() -> None:
    body = chat_body(
        ChatRequest(
            model="m",
            messages=MESSAGES,
            extra_body={"top_k": 20, "min_p": 0.1},
            endpoint=EndpointOptions(extra_body={"top_k": 5, "metadata": {"app": "x"}}),
        )
    )
    assert body["top_k"] == 20 and body["min_p"] == 0.1 and body["metadata"] == {"app": "x"}
    with pytest.raises(EndpointConfigError, match="extra_body may not set model"):
        parse_endpoints(
            '{"m": {"base_url": "http://h/v1", "extra_body": {"model": "x"}}}', "http://d/v1"
        )


def test_endpoint_configuration_is_checked_and_secret_headers_come_from_the_environment() -> None:
    raw = (
        '{"m": {"base_url": "http://gw/v1", "structured_output": "json_object_schema",'
        ' "headers": {"x-team": "support"}, "headers_env": {"x-key": "GW_KEY"},'
        ' "reasoning": true, "token_limit_param": "max_completion_tokens"}}'
    )
    endpoints = parse_endpoints(raw, "http://default/v1")
    options = endpoints.options("m", {"GW_KEY": "s3cret"})
    assert options.structured_output == "json_object_schema" and options.reasoning
    assert options.headers == {"x-team": "support", "x-key": "s3cret"}
    assert "s3cret" not in repr(options)
    with pytest.raises(EndpointConfigError, match="GW_KEY"):
        endpoints.check({})
    with pytest.raises(EndpointConfigError, match="structured_output must be one of"):
        parse_endpoints(
            '{"m": {"base_url": "http://h/v1", "structured_output": "xml"}}', "http://d/v1"
        )
    assert endpoints.options("other").structured_output == "none"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


def _stack(url: str, mode: StructuredOutput, endpoints: str = "") -> ResilientClient:
    return build_client(
        StackConfig(
            endpoints=parse_endpoints(
                endpoints, url, defaults=EndpointOptions(structured_output=mode)
            ),
            initial_wait_s=0.01,
        )
    )


async def test_the_wire_carries_the_endpoints_headers_and_the_prompts_parameters(
    fake: FakeLLMServer,
) -> None:
    raw = (
        f'{{"gpt-4o-mini": {{"base_url": "{fake.url}", "structured_output": "json_schema",'
        ' "headers": {"x-team": "support"}, "extra_body": {"metadata": {"app": "llmpipe"}}}}'
    )
    client = _stack(fake.url, "none", raw)
    pv = REGISTRY.get("ticket_triage", 2)
    try:
        await client.complete(chat_request(pv, MESSAGES, 10.0), models=["gpt-4o-mini"])
    finally:
        await client.aclose()
    [seen] = fake.recent_requests()
    assert seen["headers"]["x-team"] == "support"
    body = seen["body"]
    assert body["metadata"] == {"app": "llmpipe"}
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is False  # minLength: non-strict
    assert body["response_format"]["json_schema"]["schema"] == pv.output_schema


async def test_a_refused_mode_is_reported_once_and_calls_go_on_without_it(
    fake: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.configure(refuse_formats=["json_schema"])
    client = _stack(fake.url, "json_schema")
    request = ChatRequest(model="m", messages=MESSAGES, output_schema=STRICT_SCHEMA)
    try:
        with caplog.at_level(logging.ERROR, logger="pipeline.llm.openai"):
            answers = [await client.complete(request) for _ in range(12)]
    finally:
        await client.aclose()
    assert all(a.structured_output == "none" for a in answers)
    assert [a.attempts for a in answers] == [1] * 12  # the resend is not a retry
    counters = fake.counters()
    assert counters["bad_requests"] == 1 and counters["total_calls"] == 12
    errors = [r for r in caplog.records if "refuses structured_output=json_schema" in r.message]
    assert len(errors) == 1 and "json_object_schema" in errors[0].message
    assert client.breakers.states().get("m", BreakerState.CLOSED) == BreakerState.CLOSED


async def test_a_real_failure_is_not_mistaken_for_a_refused_mode(fake: FakeLLMServer) -> None:
    raw_client = OpenAIChatClient(fake.url, max_connections=1)
    request = ChatRequest(
        model="m",
        messages=[{"role": "user", "content": "[[fake:server_error]]"}],
        output_schema=STRICT_SCHEMA,
        endpoint=EndpointOptions(structured_output="json_object_schema"),
    )
    try:
        with pytest.raises(ModelError) as failure:
            await raw_client.complete(request)
    finally:
        await raw_client.aclose()
    assert failure.value.kind == "server_error" and failure.value.retryable
    assert raw_client.refused == {}


async def test_the_fake_checks_a_strict_schema_like_openai(fake: FakeLLMServer) -> None:
    raw_client = OpenAIChatClient(fake.url, max_connections=1)
    unfit = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = ChatRequest(
        model="m",
        messages=MESSAGES,
        output_schema=unfit,
        schema_strict=True,  # a wrong strict decision must be caught by the server
        endpoint=EndpointOptions(structured_output="json_schema"),
    )
    try:
        answer = await raw_client.complete(request)
    finally:
        await raw_client.aclose()
    assert answer.structured_output == "none"  # 400 naming response_format: resent without
    assert next(iter(raw_client.refused.values())).startswith("400")


@pytest.mark.parametrize("mode", ["json_schema", "json_object_schema"])
@pytest.mark.parametrize(
    "behaviour", ["fenced", "hedge", "invalid_json", "wrong_schema", "garbage"]
)
async def test_the_fake_honours_a_schema_constraint(
    fake: FakeLLMServer, mode: StructuredOutput, behaviour: str
) -> None:
    raw_client = OpenAIChatClient(fake.url, max_connections=1)
    request = ChatRequest(
        model="m",
        messages=[{"role": "user", "content": f"[[fake:{behaviour}]]"}],
        output_schema=STRICT_SCHEMA,
        schema_strict=True,
        endpoint=EndpointOptions(structured_output=mode),
    )
    try:
        answer = await raw_client.complete(request)
    finally:
        await raw_client.aclose()
    Draft202012Validator(STRICT_SCHEMA).validate(json.loads(answer.text))


async def test_the_pipeline_still_catches_what_a_constrained_endpoint_lets_through(
    fake: FakeLLMServer,
) -> None:
    """The fake ignores the schema on purpose; validation, the re-ask and the fallback
    stay on under structured output, so the answer never reaches the results."""
    fake.configure(profile="ignore_schema=1")
    client = _stack(fake.url, "json_object_schema")
    control = ControlState()
    try:
        called = await ModelCaller(REGISTRY, client, control)(validated())
        assert isinstance(called, Emit) and called.topic == COMPLETIONS
        assert isinstance(called.envelope, Completion)
        settled = await Settler(REGISTRY, control, client)(called.envelope)
    finally:
        await client.aclose()
    assert isinstance(settled, Emit) and settled.topic == FALLBACK
    assert settled.reason == "invalid_output"
    assert isinstance(settled.envelope, Escalation)
    bodies = [r["body"] for r in fake.recent_requests()]
    assert len(bodies) == 2  # the answer and its re-ask, both constrained
    assert all(b["response_format"]["type"] == "json_object" for b in bodies)

    fake.configure(profile="valid=1")
    client = _stack(fake.url, "json_object_schema")
    body = f"My invoice charged me twice. [[answer:{json.dumps(GOOD_ANSWER)}]] [[fake:fenced]]"
    try:
        called = await ModelCaller(REGISTRY, client, control)(
            validated({"subject": "Charged twice", "body": body})
        )
        assert isinstance(called, Emit) and isinstance(called.envelope, Completion)
        settled = await Settler(REGISTRY, control, client)(called.envelope)
    finally:
        await client.aclose()
    assert isinstance(settled, Emit) and settled.topic == RESULTS
    assert isinstance(settled.envelope, Result) and settled.envelope.source == "model"
    assert settled.envelope.output == GOOD_ANSWER  # fenced, but the constraint honoured
