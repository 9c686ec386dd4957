"""llmpipe's own model client against a server it did not write: llama.cpp on SmolLM2.

These assert interoperability (the wire format parses, usage and logprobs arrive, errors
are classified), never what the model answers.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from pipeline.config import REPO_ROOT
from pipeline.llm.local_server import LocalModelServer, model_venv
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatRequest, EndpointOptions

PATCH_SCRIPT = REPO_ROOT / "infra" / "model" / "patch_logprobs.py"


async def test_the_client_parses_a_real_servers_answer(local_model: LocalModelServer) -> None:
    client = OpenAIChatClient(local_model.url, max_connections=1)
    try:
        answer = await client.complete(
            ChatRequest(
                model=local_model.model,
                messages=[{"role": "user", "content": "Say hello in one word."}],
                max_tokens=8,
                logprobs=True,
                timeout_s=60,
            )
        )
    finally:
        await client.aclose()
    assert answer.prompt_tokens > 0 and 0 < answer.completion_tokens <= 8
    assert answer.finish_reason in ("stop", "length")
    assert len(answer.token_logprobs) == answer.completion_tokens
    assert all(lp <= 0.0 for lp in answer.token_logprobs)


def test_the_model_server_is_the_one_with_cheap_logprobs(local_model: LocalModelServer) -> None:
    """``make model-server`` patches llama-cpp-python's logprobs (infra/model/patch_logprobs.py):
    unpatched, every real-model test takes 4-8 times as long and CI overruns its budget."""
    spec = importlib.util.spec_from_file_location("patch_logprobs", PATCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    installed = sorted(model_venv().glob("lib/python3*/site-packages/llama_cpp/llama.py"))
    assert installed, f"no llama_cpp in {model_venv()}"
    assert patch.MARKER in installed[0].read_text(encoding="utf-8"), (
        f"{installed[0]} is not patched: run `make model-server`"
    )


async def test_llamacpps_refusal_of_openais_form_is_reported_once_and_answered(
    local_model: LocalModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """llama.cpp answers ``json_schema`` with an HTTP 500: one resend, one error, no retries."""
    client = OpenAIChatClient(local_model.url, max_connections=1)
    request = ChatRequest(
        model=local_model.model,
        messages=[{"role": "user", "content": "Reply with a JSON object with a label."}],
        max_tokens=16,
        timeout_s=60,
        output_schema={"type": "object", "properties": {"label": {"type": "string"}}},
        endpoint=EndpointOptions(structured_output="json_schema"),
    )
    try:
        with caplog.at_level(logging.ERROR, logger="pipeline.llm.openai"):
            first = await client.complete(request)
            second = await client.complete(request)
    finally:
        await client.aclose()
    assert (first.structured_output, second.structured_output) == ("none", "none")
    assert list(client.refused) == [(local_model.model, "json_schema")]
    assert next(iter(client.refused.values())).startswith("500")
    assert sum("refuses structured_output=json_schema" in r.message for r in caplog.records) == 1


async def test_llamacpps_own_form_constrains_the_answer(local_model: LocalModelServer) -> None:
    schema = {
        "type": "object",
        "required": ["label"],
        "properties": {"label": {"type": "string", "enum": ["billing", "bug"]}},
    }
    client = OpenAIChatClient(local_model.url, max_connections=1)
    try:
        answer = await client.complete(
            ChatRequest(
                model=local_model.model,
                messages=[{"role": "user", "content": "My card was charged twice. Label?"}],
                max_tokens=24,
                timeout_s=60,
                output_schema=schema,
                endpoint=EndpointOptions(structured_output="json_object_schema"),
            )
        )
    finally:
        await client.aclose()
    assert answer.structured_output == "json_object_schema"
    assert json.loads(answer.text)["label"] in ("billing", "bug")  # the constraint, not the model
