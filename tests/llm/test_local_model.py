"""llmpipe's own model client against a server it did not write: llama.cpp on SmolLM2.

These assert interoperability (the wire format parses, usage and logprobs arrive, errors
are classified), never what the model answers.
"""

from __future__ import annotations

from pipeline.llm.local_server import LocalModelServer
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatRequest


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
