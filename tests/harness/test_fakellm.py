"""The fake model over real HTTP: every behaviour, the directive syntax, and robustness.

Synchronisation uses the server's own signals (``wait_in_flight``, response headers), never
sleeps, and timing assertions are one-sided so the suite stays reliable on a loaded CI box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
import typer
from typer.testing import CliRunner

from pipeline.harness.fakellm import (
    FakeLLMServer,
    choose_behavior,
    main,
    minimal_instance,
    parse_behavior,
    parse_profile,
    running_fake_llm,
)
from pipeline.harness.fakellm.behaviors import BehaviorSpec, find_answer
from pipeline.harness.fakellm.cli import fake_llm
from pipeline.harness.fakellm.responses import GARBAGE, INVALID_JSON, REFUSAL, tokenize
from pipeline.harness.fakellm.schema_instance import SchemaInstanceError
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatRequest
from pipeline.observability.context import MessageScope, message_scope

# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
async def srv() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


@pytest.fixture
async def client(srv: FakeLLMServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        yield http


def body_for(content: str, *, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return {"model": "test-model", "messages": messages, "temperature": 0, **extra}


async def chat(
    http: httpx.AsyncClient,
    content: str,
    *,
    system: str | None = None,
    headers: dict[str, str] | None = None,
    client_timeout: float | None = None,
    **extra: Any,
) -> httpx.Response:
    kwargs: dict[str, Any] = {"json": body_for(content, system=system, **extra)}
    if headers:
        kwargs["headers"] = headers
    if client_timeout is not None:
        kwargs["timeout"] = client_timeout
    return await http.post("/chat/completions", **kwargs)


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def raw_post(path: str, body: bytes, extra_headers: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra_headers}\r\n"
    return head.encode() + body


CHAT_BODY = json.dumps(body_for("hello")).encode()


# -- the happy path and response shape -------------------------------------------------------


async def test_valid_response_has_openai_shape(client: httpx.AsyncClient) -> None:
    response = await chat(client, "hello")
    assert response.status_code == 200
    assert response.headers["x-fake-behavior"] == "valid"
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    assert data["model"] == "test-model"
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert json.loads(choice["message"]["content"]) == {"answer": "ok"}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = data["usage"]
    assert usage["prompt_tokens"] == len("hello") // 4 + 1
    assert usage["completion_tokens"] == len(choice["message"]["content"]) // 4 + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_model_name_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/chat/completions",
        json={"model": "gpt-something", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.json()["model"] == "gpt-something"


async def test_max_tokens_truncates_like_a_real_model(client: httpx.AsyncClient) -> None:
    response = await chat(client, '[[answer:{"text": "' + "word " * 100 + '"}]]', max_tokens=5)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 20


async def test_n_returns_several_choices(client: httpx.AsyncClient) -> None:
    response = await chat(client, "hello", n=3)
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]


async def test_content_parts_are_read_for_directives(client: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "[[fake:refusal]]"}]
    response = await client.post(
        "/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": parts}]},
    )
    assert content_of(response) == REFUSAL


# -- each behaviour --------------------------------------------------------------------------


async def test_invalid_json(client: httpx.AsyncClient) -> None:
    text = content_of(await chat(client, "[[fake:invalid_json]]"))
    assert text == INVALID_JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_wrong_schema(client: httpx.AsyncClient) -> None:
    text = content_of(await chat(client, '[[fake:wrong_schema]] [[answer:{"a": 1}]]'))
    assert json.loads(text) == {"unexpected": True}


async def test_refusal(client: httpx.AsyncClient) -> None:
    assert (
        content_of(await chat(client, "[[fake:refusal]]"))
        == "I'm sorry, but I can't help with that."
    )


async def test_hedge_wraps_valid_json_in_prose(client: httpx.AsyncClient) -> None:
    text = content_of(await chat(client, '[[fake:hedge]] [[answer:{"label": "spam"}]]'))
    assert "I think maybe" in text
    assert "not sure" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    start, end = text.index("{"), text.rindex("}") + 1
    assert json.loads(text[start:end]) == {"label": "spam"}


async def test_empty(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:empty]]")
    assert content_of(response) == ""
    assert response.json()["usage"]["completion_tokens"] == 0


async def test_fenced_json_with_prose(client: httpx.AsyncClient) -> None:
    text = content_of(await chat(client, '[[fake:fenced]] [[answer:{"label": "ham"}]]'))
    assert text.startswith("Here is")
    inner = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(inner) == {"label": "ham"}


async def test_garbage(client: httpx.AsyncClient) -> None:
    text = content_of(await chat(client, "[[fake:garbage]]"))
    assert text == GARBAGE
    assert "<script>alert(1)</script>" in text
    assert "\x00" in text
    assert "\x1b" in text


async def test_lone_surrogate_travels_both_ways(client: httpx.AsyncClient) -> None:
    # The fake writes and reads JSON with orjson, which refuses lone surrogates: the json
    # fallback must keep them working (model text with one is a case the pipeline handles).
    text = content_of(await chat(client, '[[answer:{"label": "x\\ud800y"}]]'))
    assert json.loads(text) == {"label": "x\ud800y"}
    raw = json.dumps(body_for("a lone \udc00 in the request")).encode()  # ASCII, escaped
    response = await client.post("/chat/completions", content=raw)
    assert response.status_code == 200, response.text


async def test_slow_honours_the_delay(client: httpx.AsyncClient) -> None:
    started = time.perf_counter()
    response = await chat(client, "[[fake:slow:0.3]]")
    elapsed = time.perf_counter() - started
    assert json.loads(content_of(response)) == {"answer": "ok"}
    assert response.headers["x-fake-behavior"] == "slow:0.3"
    assert elapsed >= 0.25


async def test_hang_holds_until_the_client_gives_up(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await chat(client, "[[fake:hang]]", client_timeout=0.5)
    assert srv.counters()["by_behavior"] == {"hang": 1}
    # The client closed its socket on timeout; the server must notice and free the slot.
    async with asyncio.timeout(5):
        await srv.wait_in_flight(0)
    assert json.loads(content_of(await chat(client, "after the hang"))) == {"answer": "ok"}


async def test_rate_limit_has_retry_after_and_openai_error(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:rate_limit:7]]")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["retry-after-ms"] == "7000"
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "message" in error


async def test_rate_limit_fractional_retry_after(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:rate_limit:0.25]]")
    assert response.status_code == 429
    assert float(response.headers["retry-after"]) == 0.25


async def test_rate_limit_default_retry_after(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:rate_limit]]")
    assert response.headers["retry-after"] == "1"


async def test_server_error(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:server_error]]")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


async def test_reset_is_a_connection_error_and_server_survives(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.TransportError) as excinfo:
        await chat(client, "[[fake:reset]]")
    assert not isinstance(excinfo.value, httpx.TimeoutException)
    assert content_of(await chat(client, "still alive?"))
    counters = srv.counters()
    assert counters["by_behavior"] == {"reset": 1, "valid": 1}
    assert counters["in_flight"] == 0


async def test_reset_sends_rst_on_raw_socket(srv: FakeLLMServer) -> None:
    body = json.dumps(body_for("[[fake:reset]]")).encode()
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(raw_post("/v1/chat/completions", body))
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""


# -- directives, headers, answers --------------------------------------------------------------


async def test_header_selects_behavior(client: httpx.AsyncClient) -> None:
    response = await chat(client, "plain", headers={"x-fake-behavior": "refusal"})
    assert content_of(response) == REFUSAL


async def test_header_params_syntax(client: httpx.AsyncClient) -> None:
    response = await chat(client, "x", headers={"x-fake-behavior": "rate_limit;retry_after=3"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"


async def test_header_beats_directive(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:refusal]]", headers={"x-fake-behavior": "empty"})
    assert content_of(response) == ""


async def test_last_directive_wins_across_messages(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:empty]]", system="[[fake:server_error]]")
    assert content_of(response) == ""


async def test_directive_in_system_message(client: httpx.AsyncClient) -> None:
    response = await chat(client, "user text", system="You are a bot. [[fake:server_error]]")
    assert response.status_code == 500


@pytest.mark.parametrize(
    "header", ["bogus", "slow:abc", "valid:3", "rate_limit;seconds=1", "slow:-1", "slow:times=0"]
)
async def test_bad_header_is_400(client: httpx.AsyncClient, header: str) -> None:
    response = await chat(client, "x", headers={"x-fake-behavior": header})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_bad_directive_is_400(client: httpx.AsyncClient) -> None:
    assert (await chat(client, "[[fake:teleport]]")).status_code == 400


async def test_times_limits_a_directive_to_the_first_requests(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    content = "classify this [[fake:rate_limit:0:times=2]]"
    statuses = [(await chat(client, content)).status_code for _ in range(4)]
    assert statuses == [429, 429, 200, 200]
    # A repair-style conversation keeps the first user message, so it shares the budget.
    repaired = body_for(content)
    repaired["messages"] += [
        {"role": "assistant", "content": "oops"},
        {"role": "user", "content": "fix it"},
    ]
    assert (await client.post("/chat/completions", json=repaired)).status_code == 200
    srv.reset_counters()
    assert (await chat(client, content)).status_code == 429


async def test_times_in_header(client: httpx.AsyncClient) -> None:
    headers = {"x-fake-behavior": "server_error;times=1"}
    assert (await chat(client, "t", headers=headers)).status_code == 500
    assert (await chat(client, "t", headers=headers)).status_code == 200


async def test_answer_block_is_returned_verbatim(client: httpx.AsyncClient) -> None:
    answer = {"label": "spam", "scores": [0.1, 0.9], "nested": {"text": "a ]] b"}}
    content = f"[[fake:valid]] please classify [[answer:{json.dumps(answer)}]] thanks"
    assert json.loads(content_of(await chat(client, content))) == answer


async def test_answer_block_without_directive_and_in_system(client: httpx.AsyncClient) -> None:
    response = await chat(client, "hello", system='[[answer: {"x": 1} ]]')
    assert json.loads(content_of(response)) == {"x": 1}


async def test_answer_block_with_slow(client: httpx.AsyncClient) -> None:
    response = await chat(client, '[[fake:slow:0]] [[answer:["a", "b"]]]')
    assert json.loads(content_of(response)) == ["a", "b"]


async def test_malformed_answer_block_is_400(client: httpx.AsyncClient) -> None:
    assert (await chat(client, "[[answer:{not json}]]")).status_code == 400
    assert (await chat(client, '[[answer:{"a": 1} oops')).status_code == 400


def test_find_answer_none_is_distinguishable() -> None:
    found = find_answer([{"role": "user", "content": "[[answer:null]]"}])
    assert found is not None
    assert found.value is None
    assert find_answer([{"role": "user", "content": "nothing"}]) is None


# -- schema-driven answers -------------------------------------------------------------------

LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["label", "confidence", "tags", "meta"],
    "properties": {
        "label": {"type": "string", "enum": ["spam", "ham"]},
        "confidence": {"type": "number", "minimum": 0.5, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "meta": {
            "type": "object",
            "required": ["count", "ok"],
            "properties": {"count": {"type": "integer", "minimum": 3}, "ok": {"type": "boolean"}},
        },
        "optional": {"type": "string"},
    },
    "additionalProperties": False,
}


async def test_output_schema_line_yields_valid_instance(client: httpx.AsyncClient) -> None:
    system = f"Classify the text.\nOUTPUT_SCHEMA: {json.dumps(LABEL_SCHEMA)}\nBe brief."
    answer = json.loads(content_of(await chat(client, "buy now!!!", system=system)))
    jsonschema.validate(answer, LABEL_SCHEMA)
    assert answer["label"] == "spam"
    assert answer["meta"]["count"] == 3
    assert "optional" not in answer


async def test_answer_block_beats_output_schema(client: httpx.AsyncClient) -> None:
    system = f"OUTPUT_SCHEMA: {json.dumps(LABEL_SCHEMA)}"
    response = await chat(client, '[[answer:{"label": "ham"}]]', system=system)
    assert json.loads(content_of(response)) == {"label": "ham"}


async def test_response_format_schema_is_used(client: httpx.AsyncClient) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": LABEL_SCHEMA}}
    response = await chat(client, "hello", response_format=response_format)
    jsonschema.validate(json.loads(content_of(response)), LABEL_SCHEMA)


async def test_wrong_schema_violates_the_schema(client: httpx.AsyncClient) -> None:
    system = f"OUTPUT_SCHEMA: {json.dumps(LABEL_SCHEMA)}"
    answer = json.loads(content_of(await chat(client, "[[fake:wrong_schema]]", system=system)))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(answer, LABEL_SCHEMA)


SCHEMAS: list[dict[str, Any]] = [
    LABEL_SCHEMA,
    {"type": "string"},
    {"type": "string", "minLength": 12, "maxLength": 20},
    {"type": "string", "maxLength": 3},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "email"},
    {"const": "fixed"},
    {"enum": [3, "x"]},
    {"type": "integer", "exclusiveMinimum": 5},
    {"type": "integer", "maximum": -4},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "integer", "minimum": 1, "multipleOf": 5},
    {"type": "number", "minimum": 2.5},
    {"type": "boolean"},
    {"type": "null"},
    {"type": ["null", "integer"], "minimum": 2},
    {"type": "array", "items": {"type": "integer"}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2},
    {"type": "object", "minProperties": 2, "properties": {"a": {}, "b": {"type": "integer"}}},
    {"type": "object", "required": ["free"], "additionalProperties": {"type": "integer"}},
    {
        "$defs": {"item": {"type": "object", "required": ["id"], "properties": {"id": {}}}},
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1}
        },
    },
    {
        "allOf": [
            {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
            {"required": ["b"], "properties": {"b": {"type": "integer", "minimum": 7}}},
        ]
    },
    {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string"}]},
    {"oneOf": [{"type": "object", "required": ["kind"], "properties": {"kind": {"const": "a"}}}]},
    {"type": "object", "properties": {"x": {"type": "string"}}},
    {},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:60])
def test_minimal_instance_validates(schema: dict[str, Any]) -> None:
    instance = minimal_instance(schema)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(instance)


def test_minimal_instance_is_minimal() -> None:
    assert minimal_instance({"type": "string"}) == "example"
    assert minimal_instance({"type": "string", "enum": ["b", "a"]}) == "b"
    assert minimal_instance({"type": "number", "minimum": 3}) == 3
    assert minimal_instance({"type": "integer"}) == 0
    assert minimal_instance({"type": "boolean"}) is False
    assert minimal_instance({"type": "array", "items": {"type": "integer"}}) == []
    assert minimal_instance({"type": "object", "properties": {"a": {"type": "string"}}}) == {}


@pytest.mark.parametrize(
    "schema",
    [False, {"$ref": "#/nowhere"}, {"$ref": "http://x/s.json"}, {"$ref": "#"}, "not a schema"],
)
def test_minimal_instance_rejects_unusable_schemas(schema: Any) -> None:
    with pytest.raises(SchemaInstanceError):
        minimal_instance(schema)


# -- logprobs ----------------------------------------------------------------------------------


async def test_logprobs_high_for_valid(client: httpx.AsyncClient) -> None:
    response = await chat(client, "hello", logprobs=True, top_logprobs=3)
    choice = response.json()["choices"][0]
    items = choice["logprobs"]["content"]
    assert "".join(item["token"] for item in items) == choice["message"]["content"]
    for item in items:
        assert -0.1 <= item["logprob"] <= -0.01
        assert bytes(item["bytes"]).decode() == item["token"]
        top = item["top_logprobs"]
        assert len(top) == 3
        assert top[0]["token"] == item["token"]
        assert sum(math.exp(t["logprob"]) for t in top) < 1


async def test_logprobs_low_for_hedge(client: httpx.AsyncClient) -> None:
    response = await chat(client, "[[fake:hedge]]", logprobs=True)
    items = response.json()["choices"][0]["logprobs"]["content"]
    assert items
    assert all(-3 <= item["logprob"] <= -1.5 for item in items)
    assert all(item["top_logprobs"] == [] for item in items)


async def test_logprobs_are_deterministic(client: httpx.AsyncClient) -> None:
    first = await chat(client, "same", logprobs=True)
    second = await chat(client, "same", logprobs=True)
    assert first.json()["choices"][0]["logprobs"] == second.json()["choices"][0]["logprobs"]


def test_tokenize_round_trips() -> None:
    for text in ['{"a": [1, 2]}', GARBAGE, "  spaced  out\n\ttext ", "", "héllo wörld 😀"]:
        assert "".join(tokenize(text)) == text


# -- counters, control, health ---------------------------------------------------------------


async def test_counters_and_reset(srv: FakeLLMServer, client: httpx.AsyncClient) -> None:
    await chat(client, "a")
    await chat(client, "[[fake:refusal]]")
    await client.post(
        "/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "b"}]}
    )
    counters = (await client.get(f"{srv.base_url}/counters")).json()
    assert counters["total_calls"] == 3
    assert counters["by_behavior"] == {"valid": 2, "refusal": 1}
    assert counters["by_model"] == {"test-model": 2, "other": 1}
    assert counters["in_flight"] == 0
    assert counters["max_in_flight"] == 1
    assert counters == srv.counters()
    reset = await client.post(f"{srv.base_url}/counters/reset")
    assert reset.status_code == 200
    assert srv.counters() == {
        "total_calls": 0,
        "by_behavior": {},
        "by_model": {},
        "in_flight": 0,
        "orphaned": 0,
        "max_in_flight": 0,
        "bad_requests": 0,
    }


async def test_max_in_flight_counts_concurrency(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    tasks = [asyncio.create_task(chat(client, f"{i} [[fake:hang]]")) for i in range(20)]
    async with asyncio.timeout(10):
        await srv.wait_in_flight(20)
    assert srv.counters()["max_in_flight"] == 20
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    async with asyncio.timeout(10):
        await srv.wait_in_flight(0)
    assert srv.counters()["max_in_flight"] == 20


async def test_control_default_behavior_then_recover(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    control = f"{srv.base_url}/control"
    response = await client.post(control, json={"default_behavior": "server_error"})
    assert response.json()["default_behavior"] == "server_error"
    assert (await chat(client, "a")).status_code == 500
    assert (await chat(client, "b [[fake:refusal]]")).status_code == 200  # directive still wins
    await client.post(control, json={"default_behavior": None})
    assert (await chat(client, "a")).status_code == 200


async def test_control_force_behavior_overrides_everything(
    srv: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    control = f"{srv.base_url}/control"
    await client.post(control, json={"force_behavior": "rate_limit:2"})
    response = await chat(client, "[[fake:valid]]", headers={"x-fake-behavior": "valid"})
    assert response.status_code == 429
    await client.post(control, json={"force_behavior": None})
    assert (await chat(client, "[[fake:valid]]")).status_code == 200


async def test_control_profile_and_seed(srv: FakeLLMServer, client: httpx.AsyncClient) -> None:
    control = f"{srv.base_url}/control"
    response = await client.post(control, json={"profile": "refusal=1", "seed": 9})
    assert response.json()["profile"] == "refusal=1"
    assert response.json()["seed"] == 9
    assert content_of(await chat(client, "anything")) == REFUSAL
    current = (await client.get(control)).json()
    assert current == {
        "profile": "refusal=1",
        "seed": 9,
        "default_behavior": None,
        "force_behavior": None,
        "latency": 0.0,
        "jitter": 0.0,
        "refuse_formats": [],
    }


@pytest.mark.parametrize(
    "payload",
    [
        {"default_behavior": "nope"},
        {"profile": "valid=-1"},
        {"profile": "valid=abc"},
        {"seed": "x"},
        {"latency": -1},
        {"jitter": 2},
        {"unknown": 1},
        [1, 2],
    ],
)
async def test_bad_control_is_400(
    srv: FakeLLMServer, client: httpx.AsyncClient, payload: Any
) -> None:
    before = srv.config
    response = await client.post(f"{srv.base_url}/control", json=payload)
    assert response.status_code == 400
    assert srv.config == before


async def test_control_latency(srv: FakeLLMServer, client: httpx.AsyncClient) -> None:
    await client.post(f"{srv.base_url}/control", json={"latency": 0.2, "jitter": 0.5})
    started = time.perf_counter()
    assert (await chat(client, "x")).status_code == 200
    assert time.perf_counter() - started >= 0.09


async def test_latency_constructor_option_applies_to_errors_too() -> None:
    async with (
        FakeLLMServer(latency=0.2, jitter=0.2) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        started = time.perf_counter()
        assert (await chat(http, "[[fake:server_error]]")).status_code == 500
        assert time.perf_counter() - started >= 0.15


async def test_health_models_and_routing(srv: FakeLLMServer, client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{srv.base_url}/healthz")).status_code == 200
    assert (await client.get("/models")).json()["data"][0]["id"] == "fake-model"
    assert (await client.get(f"{srv.base_url}/nope")).status_code == 404
    wrong = await client.get("/chat/completions")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    # Clients configured without the /v1 prefix still reach the endpoint.
    direct = await client.post(f"{srv.base_url}/chat/completions", json=body_for("x"))
    assert direct.status_code == 200


# -- determinism ------------------------------------------------------------------------------

PROFILE = "valid=0.6,invalid_json=0.1,refusal=0.1,hedge=0.1,server_error=0.05,rate_limit:0=0.05"


async def test_seeded_profile_is_predictable_and_matches_weights() -> None:
    async with (
        FakeLLMServer(profile=PROFILE, seed=42) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        observed: Counter[str] = Counter()
        for i in range(1000):
            body = body_for(f"document number {i}")
            response = await http.post("/chat/completions", json=body)
            behavior = response.headers["x-fake-behavior"]
            assert behavior == choose_behavior(PROFILE, 42, body["messages"])
            observed[behavior] += 1
        # Replaying a request reproduces its behaviour.
        again = await http.post("/chat/completions", json=body_for("document number 7"))
        assert again.headers["x-fake-behavior"] == choose_behavior(
            PROFILE, 42, body_for("document number 7")["messages"]
        )
    for behavior, weight in parse_profile(PROFILE).weights().items():
        assert abs(observed[behavior] / 1000 - weight) < 0.04, (behavior, observed)
    assert server.counters()["total_calls"] == 1001


def test_choose_behavior_is_a_stable_function_of_seed_and_content() -> None:
    def draws(seed: int) -> list[str]:
        return [
            choose_behavior(PROFILE, seed, [{"role": "user", "content": f"m{i}"}])
            for i in range(200)
        ]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    # The draw ignores the system prompt and depends only on the last user message.
    msgs = [{"role": "system", "content": "sys A"}, {"role": "user", "content": "u"}]
    other = [{"role": "system", "content": "sys B"}, {"role": "user", "content": "u"}]
    assert choose_behavior(PROFILE, 5, msgs) == choose_behavior(PROFILE, 5, other)
    # Directives are part of the prediction.
    directive = [{"role": "user", "content": "x [[fake:slow:2.5]]"}]
    assert choose_behavior(PROFILE, 5, directive) == "slow:2.5"
    assert choose_behavior(None, 5, msgs) == "valid"
    assert choose_behavior({"empty": 1.0}, 5, msgs) == "empty"


def test_parse_behavior_and_profile() -> None:
    assert parse_behavior("slow:2.5") == BehaviorSpec("slow", 2.5)
    assert parse_behavior("slow;seconds=2") == BehaviorSpec("slow", 2.0)
    assert parse_behavior(" Rate_Limit ; retry_after=3 ; times=2 ") == BehaviorSpec(
        "rate_limit", 3.0, 2
    )
    assert str(parse_behavior("rate_limit:0.5:times=1")) == "rate_limit:0.5"
    assert parse_behavior("slow").param == 1.0
    assert str(parse_profile("valid=2,slow:0.5=1,valid=1")) == "valid=3,slow:0.5=1"
    assert parse_profile("").weights() == {"valid": 1.0}
    for bad in ("valid=0", "nope=1", "valid=x", "slow:times=2=1", "valid=inf"):
        with pytest.raises(ValueError):
            parse_profile(bad)


# -- malformed HTTP and robustness -------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"\xff\xfe\x00garbage", None),
        (b"[" * 100_000, None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": "m", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "m", "messages": ["hi"]}).encode(), "messages"),
        (json.dumps({"model": "m", "messages": [{"role": "user", "content": 5}]}).encode(), None),
        (json.dumps({**body_for("x"), "stream": True}).encode(), "stream"),
        (json.dumps({**body_for("x"), "n": 0}).encode(), "n"),
        (json.dumps({**body_for("x"), "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({**body_for("x"), "top_logprobs": 50}).encode(), "top_logprobs"),
    ],
)
async def test_bad_bodies_are_400_and_connection_stays_usable(
    srv: FakeLLMServer, client: httpx.AsyncClient, payload: bytes, param: str | None
) -> None:
    response = await client.post(
        "/chat/completions", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert (await chat(client, "fine")).status_code == 200
    assert srv.counters()["bad_requests"] == 1
    assert srv.counters()["total_calls"] == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz FTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nbad header line\r\n\r\n", 400),
        (b"G(T /healthz HTTP/1.1\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: abc\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n", 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\n", 411),
        (b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_http_is_rejected_and_closed(
    srv: FakeLLMServer, request_bytes: bytes, status: int
) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(request_bytes)
        got, headers, _ = await read_response(reader)
        assert got == status
        assert headers["connection"] == "close"
        assert await reader.read() == b""
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await chat(http, "server still fine")).status_code == 200


async def test_post_without_length_is_411_but_keeps_connection(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 411
        assert headers["connection"] == "keep-alive"
        writer.write(raw_post("/v1/chat/completions", CHAT_BODY))
        status, _, _ = await read_response(reader)
        assert status == 200


async def test_keep_alive_and_pipelining(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        request = raw_post("/v1/chat/completions", CHAT_BODY)
        writer.write(request + request + b"GET /healthz HTTP/1.1\r\n\r\n")
        statuses = [(await read_response(reader))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        # Bytes split at awkward places are reassembled.
        for chunk in (request[:10], request[10:70], request[70:]):
            writer.write(chunk)
            await writer.drain()
        assert (await read_response(reader))[0] == 200


async def test_http10_closes_after_response(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await reader.read() == b""


async def test_connection_close_header_is_honoured(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(raw_post("/v1/chat/completions", CHAT_BODY, "connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await reader.read() == b""


async def test_expect_100_continue(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (reader, writer):
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            f"content-length: {len(CHAT_BODY)}\r\n\r\n"
        )
        writer.write(head.encode())
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(CHAT_BODY)
        assert (await read_response(reader))[0] == 200


async def test_client_vanishing_mid_request_is_harmless(srv: FakeLLMServer) -> None:
    async with raw_connection(srv.port) as (_, writer):
        writer.write(raw_post("/v1/chat/completions", CHAT_BODY)[:-5])
        await writer.drain()
    async with raw_connection(srv.port) as (_, writer):
        body = json.dumps(body_for("[[fake:slow:0.2]]")).encode()
        writer.write(raw_post("/v1/chat/completions", body))
        await writer.drain()
    async with raw_connection(srv.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200


def _ensure_fds(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_thousand_hung_connections(srv: FakeLLMServer) -> None:
    _ensure_fds(2600)
    count = 1000
    request = raw_post("/v1/chat/completions", json.dumps(body_for("[[fake:hang]]")).encode())
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(request)
            writers.append(writer)
        async with asyncio.timeout(30):
            await srv.wait_in_flight(count)
        # The server still answers others while a thousand requests hang.
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await chat(http, "next")).status_code == 200
    finally:
        for writer in writers:
            writer.close()
    async with asyncio.timeout(30):
        await srv.wait_in_flight(0)
    assert srv.counters()["max_in_flight"] >= count


async def test_stop_releases_hung_requests() -> None:
    server = FakeLLMServer()
    await server.start()
    async with httpx.AsyncClient(base_url=server.url) as http:
        pending = asyncio.create_task(chat(http, "[[fake:hang]]"))
        async with asyncio.timeout(10):
            await server.wait_in_flight(1)
        async with asyncio.timeout(10):
            await server.stop()
        with pytest.raises(httpx.TransportError):
            await pending
    assert server.counters()["in_flight"] == 0


# -- synchronous helper, CLI -----------------------------------------------------------------


def test_running_fake_llm_in_a_thread() -> None:
    with running_fake_llm(profile="refusal=1", seed=3) as server:
        assert server.url.endswith("/v1")
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.post("/chat/completions", json=body_for("hi"))
            assert response.json()["choices"][0]["message"]["content"] == REFUSAL
            server.configure(default_behavior="server_error")
            assert http.post("/chat/completions", json=body_for("hi")).status_code == 500
            server.wait_in_flight_blocking(0, timeout=5)
        assert server.counters()["total_calls"] == 2


def test_running_fake_llm_port_conflict_raises() -> None:
    with running_fake_llm() as first, pytest.raises(OSError), running_fake_llm(port=first.port):
        pass


def test_main_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--profile", "nope=1"])
    assert excinfo.value.code == 2
    assert "unknown fake behaviour" in capsys.readouterr().err


def test_typer_command_is_registrable() -> None:
    app = typer.Typer()
    app.command("fake-llm")(fake_llm)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    result = runner.invoke(app, ["fake-llm", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--profile", "--seed", "--latency", "--jitter"):
        assert option in result.output
    bad = runner.invoke(app, ["fake-llm", "--profile", "bogus=1"])
    assert bad.exit_code != 0


# -- per-request counts and orphaned calls (what the crash tests measure with) -------------


def _kind(messages: Any) -> str:
    return "grade" if messages[0].get("content") == "grade it" else "first"


def _tallies(server: FakeLLMServer, rid: str) -> dict[str, tuple[int, int]]:
    return {k: (t.started, t.ended) for k, t in server.request_calls().get(rid, {}).items()}


def test_calls_are_counted_per_request_id_and_kind() -> None:
    with running_fake_llm(call_kind=_kind) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for system, rid in ((None, "r1"), ("grade it", "r1"), (None, "r1"), (None, "r2")):
                response = http.post(
                    "/chat/completions",
                    json=body_for("hi", system=system),
                    headers={"x-client-request-id": rid},
                )
                assert response.status_code == 200
            assert http.post("/chat/completions", json=body_for("no id")).status_code == 200
            served = http.get(f"{server.base_url}/counters/requests").json()
        assert _tallies(server, "r1") == {"first": (2, 2), "grade": (1, 1)}
        assert _tallies(server, "r2") == {"first": (1, 1)}
        assert _tallies(server, "-") == {"first": (1, 1)}
        assert served["r1"] == {"first": [2, 2], "grade": [1, 1]}
        assert server.request_calls()["r1"]["first"].last_ended_at > 0
        server.reset_counters()
        assert _tallies(server, "r1") == {"first": (2, 2), "grade": (1, 1)}, "never reset"


def test_a_dead_clients_calls_are_orphans_until_they_end() -> None:
    """The server keeps serving a killed client's calls; tests must tell them apart from
    the next client's calls and wait for them to end before counting again."""
    with running_fake_llm(latency=0.6) as server:
        body = json.dumps(body_for("slow")).encode()
        request = raw_post("/v1/chat/completions", body, "x-client-request-id: gone\r\n")
        socks = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(request)
            socks.append(sock)
        server.wait_live_in_flight(3, timeout=10)
        assert server.counters()["orphaned"] == 0
        assert server.in_flight_requests() == {"gone": 3}
        for sock in socks:
            sock.close()  # what the kernel does for a SIGKILLed client
        deadline = time.monotonic() + 10
        while server.counters()["orphaned"] < 3:
            assert time.monotonic() < deadline, server.counters()
            time.sleep(0.01)
        assert server.live_in_flight() == 0
        assert server.counters()["in_flight"] == 3, "still served until their latency ends"
        with pytest.raises(TimeoutError, match="3 live calls"):
            server.wait_live_in_flight(3, timeout=0.05)
        server.wait_orphans_drained(timeout=10)
        assert server.counters()["in_flight"] == 0
        assert _tallies(server, "gone") == {"chat": (3, 3)}


async def test_the_pipeline_client_sends_the_request_id_it_is_working_on(
    srv: FakeLLMServer,
) -> None:
    client = OpenAIChatClient(srv.url)
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    try:
        with message_scope(MessageScope("model", "req-7")):
            await client.complete(request)
        for untrusted in ("bad\u2028id", "x" * 513, "caf\u00e9", None):
            with message_scope(MessageScope("model", untrusted)):
                await client.complete(request)
        await client.complete(request)
    finally:
        await client.aclose()
    calls = srv.request_calls()
    assert {rid: sum(t.started for t in kinds.values()) for rid, kinds in calls.items()} == {
        "req-7": 1,
        "-": 5,
    }
