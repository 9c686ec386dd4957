"""Contract tests against the official ``openai`` SDK, so the fake cannot drift from the API.

Two directions:

* every fake-server behaviour, answered over real HTTP, parses with the SDK's own types
  (strict pydantic validation of the raw body, not the SDK's lenient construction) and
  every error maps to the SDK's error class for that status;
* every request body llmpipe builds validates against the SDK's request type, and the
  SDK itself accepts it as keyword arguments and sends it to the fake.

llama.cpp's ``{"type": "json_object", "schema": ...}`` is deliberately outside OpenAI's
contract (the SDK's ``ResponseFormatJSONObject`` has only ``type``): it is only ever sent
to endpoints configured for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from openai.types.shared_params import ResponseFormatJSONObject, ResponseFormatJSONSchema
from pydantic import TypeAdapter

from pipeline.harness.fakellm import BEHAVIORS, FakeLLMServer
from pipeline.llm.openai import chat_body
from pipeline.llm.protocol import ChatRequest, EndpointOptions
from pipeline.llm.structured import StructuredOutput
from pipeline.stages.model_call import chat_request
from tests.stage_support import REGISTRY

PARAMS = TypeAdapter(CompletionCreateParamsNonStreaming)
CONTENT = sorted(BEHAVIORS - {"hang", "reset", "rate_limit", "server_error"})
MESSAGES = [{"role": "user", "content": "Reply with JSON."}]
SCHEMA = REGISTRY.get("ticket_triage", 2).output_schema


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


@pytest.fixture
async def sdk(fake: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=fake.url, api_key="test", max_retries=0, timeout=5.0)
    try:
        yield client
    finally:
        await client.close()


async def _create(sdk: openai.AsyncOpenAI, behaviour: str, **kwargs: Any) -> SdkChatCompletion:
    """Create through the SDK, then validate the raw body strictly with the SDK's type."""
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"x-fake-behavior": behaviour},
        **kwargs,
    )
    parsed = SdkChatCompletion.model_validate(raw.http_response.json())
    assert raw.parse().id == parsed.id
    return parsed


@pytest.mark.parametrize("behaviour", CONTENT)
async def test_every_answering_behaviour_parses_with_the_sdk_types(
    sdk: openai.AsyncOpenAI, behaviour: str
) -> None:
    plain = await _create(sdk, behaviour if behaviour != "slow" else "slow:0.01")
    assert plain.object == "chat.completion" and plain.usage is not None
    assert plain.choices[0].message.role == "assistant"
    detailed = await _create(sdk, behaviour, logprobs=True, top_logprobs=2, n=2)
    assert len(detailed.choices) == 2
    logprobs = detailed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert all(len(t.top_logprobs) == 2 for t in logprobs.content)


@pytest.mark.parametrize("strict", [True, False])
async def test_structured_answers_parse_and_honour_the_schema(
    sdk: openai.AsyncOpenAI, strict: bool
) -> None:
    schema = (
        SCHEMA
        if not strict
        else {
            "type": "object",
            "additionalProperties": False,
            "required": ["label"],
            "properties": {"label": {"type": "string", "enum": ["bug", "billing"]}},
        }
    )
    answer = await _create(
        sdk,
        "fenced",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": schema, "strict": strict},
        },
    )
    content = answer.choices[0].message.content
    assert content is not None and content.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [("rate_limit:1", openai.RateLimitError), ("server_error", openai.InternalServerError)],
)
async def test_failures_map_to_the_sdk_error_for_their_status(
    sdk: openai.AsyncOpenAI, behaviour: str, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as failure:
        await _create(sdk, behaviour)
    body = failure.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)
    if error is openai.RateLimitError:
        assert failure.value.response.headers["retry-after"] == "1"


async def test_bad_requests_unknown_paths_and_refused_formats_map_too(
    fake: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await _create(sdk, "valid", top_p=7.0)
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        await sdk.embeddings.create(model="m", input="x")
    fake.configure(refuse_formats=["json_schema"])
    with pytest.raises(openai.InternalServerError) as refused:
        await _create(
            sdk,
            "valid",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        )
    assert "response_format" in str(refused.value.body)
    models = await sdk.models.list()
    assert all(isinstance(m, Model) for m in models.data)
    Model.model_validate(models.data[0].model_dump())


async def test_hangs_and_resets_are_the_sdk_timeout_and_connection_errors(
    fake: FakeLLMServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=fake.url, api_key="t", max_retries=0, timeout=0.3)
    try:
        with pytest.raises(openai.APITimeoutError):
            await _create(client, "hang")
        with pytest.raises(openai.APIConnectionError):
            await _create(client, "reset")
    finally:
        await client.close()


BODIES: dict[str, ChatRequest] = {
    "defaults": ChatRequest(model="m", messages=MESSAGES),
    "every sampling parameter": ChatRequest(
        model="m",
        messages=MESSAGES,
        temperature=0.7,
        max_tokens=64,
        logprobs=True,
        seed=3,
        stop=("\n\n", "END"),
        top_p=0.9,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
    ),
    "max_completion_tokens": ChatRequest(
        model="m",
        messages=MESSAGES,
        endpoint=EndpointOptions(token_limit_param="max_completion_tokens"),
    ),
    "reasoning model": ChatRequest(
        model="o3-mini", messages=MESSAGES, temperature=None, reasoning_effort="low"
    ),
}


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_llmpipe_bodies_are_sdk_requests(
    name: str, fake: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    body = chat_body(BODIES[name])
    PARAMS.validate_python(body)
    await sdk.chat.completions.create(**body)  # the SDK refuses keyword arguments it lacks
    assert fake.recent_requests()[-1]["body"] == body


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "none"])
async def test_the_prompts_requests_in_openai_modes_are_sdk_requests(
    mode: StructuredOutput, fake: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    for pv in REGISTRY:
        request = chat_request(pv, MESSAGES, 30.0)
        body = chat_body(request, mode)
        PARAMS.validate_python(body)
        fmt = body.get("response_format")
        if fmt is not None:
            allowed = (
                ResponseFormatJSONSchema if mode == "json_schema" else ResponseFormatJSONObject
            )
            assert set(fmt) <= set(allowed.__annotations__), (pv.ref, fmt.keys())
        await sdk.chat.completions.create(**body)
        assert fake.recent_requests()[-1]["body"] == body


async def test_llamacpp_form_is_the_one_outside_the_sdk_contract() -> None:
    body = chat_body(
        ChatRequest(
            model="m",
            messages=MESSAGES,
            output_schema=SCHEMA,
            endpoint=EndpointOptions(structured_output="json_object_schema"),
        )
    )
    assert set(body["response_format"]) - set(ResponseFormatJSONObject.__annotations__) == {
        "schema"
    }
