"""The model client honours the environment's proxy and ``~/.netrc`` like any HTTP client,
though it reads them once per connection pool, not on every call (over real HTTP to the
fake model, which answers a proxy's absolute-form request too)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pipeline.harness.fakellm import FakeLLMServer
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatRequest

pytestmark = pytest.mark.usefixtures("no_proxy_env")

REQUEST = ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
# Never resolves (RFC 6761): a call that reaches the fake went through the proxy.
UNRESOLVABLE = "http://model.invalid/v1"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


async def _call(client: OpenAIChatClient) -> None:
    try:
        answer = await client.complete(REQUEST)
        assert answer.text, "the fake answered nothing"
    finally:
        await client.aclose()


async def test_calls_go_through_the_proxy_the_environment_names(
    fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://{fake.host}:{fake.port}")
    await _call(OpenAIChatClient(UNRESOLVABLE))
    await _call(OpenAIChatClient(UNRESOLVABLE))  # a second pool reads the environment again
    seen = fake.recent_requests()
    assert [r["headers"]["host"] for r in seen] == ["model.invalid", "model.invalid"]


async def test_no_proxy_sends_the_call_directly(
    fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("NO_PROXY", fake.host)
    await _call(OpenAIChatClient(fake.url))
    assert len(fake.recent_requests()) == 1


async def test_netrc_credentials_are_sent_unless_there_is_an_api_key(
    fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {fake.host} login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    await _call(OpenAIChatClient(fake.url))
    await _call(OpenAIChatClient(fake.url, api_key="sk-test"))
    first, second = (r["headers"]["authorization"] for r in fake.recent_requests())
    assert first == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert second == "Bearer sk-test"
