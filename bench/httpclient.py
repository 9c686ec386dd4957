"""The model client alone: how many chat calls per second can one Python process make?

The pipeline's own :class:`OpenAIChatClient` (its HTTP/1.1 pool on httptools, orjson)
sends the exact request the model stage sends, ``concurrency`` at a time, to the fake
model answering instantly, with no Kafka at all. Against the same server: a minimal
keep-alive HTTP/1.1 client on raw asyncio streams (what the server and the loopback can
do, so the gap is the client's cost), a plain ``httpx.AsyncClient`` (the library the
pipeline client used first) and the official ``openai`` SDK (what the peer in
:mod:`bench.peer` uses).

Run as ``python -m bench.httpclient --url http://127.0.0.1:PORT/v1`` (one JSON line out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any


def _chat_request() -> Any:
    from pipeline.config import Settings
    from pipeline.llm.protocol import ChatRequest
    from pipeline.prompts.registry import PromptRegistry
    from pipeline.prompts.render import render_messages

    registry = PromptRegistry.load(Settings().prompts_dir)
    pv = registry.get("ticket_triage", 2)
    variables = {
        "subject": "Charged twice this month",
        "body": "My credit card was charged twice for the March invoice.",
        "customer_tier": "pro",
    }
    params = pv.model
    # Built here rather than with pipeline.stages.model_call.chat_request so that this
    # probe imports as little of the pipeline as possible (same fields, same values).
    return ChatRequest(
        model=params.model,
        messages=render_messages(pv, variables),
        temperature=params.temperature,
        max_tokens=params.max_tokens,
        logprobs=params.logprobs,
        timeout_s=30.0,
    )


async def _timed(
    call: Callable[[], Awaitable[object]], total: int, concurrency: int
) -> dict[str, Any]:
    """Warm the pool, then ``total`` calls, ``concurrency`` at a time: rate and CPU."""
    remaining = total

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(loop() for _ in range(min(concurrency, 50))))
    remaining = total
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rate": total / wall, "cpu_ms_per_call": cpu / total * 1000}


async def run_pipeline(url: str, total: int, concurrency: int, pool: int) -> dict[str, Any]:
    from pipeline.llm.openai import OpenAIChatClient

    request = _chat_request()
    client = OpenAIChatClient(url, max_connections=pool)
    try:
        return await _timed(lambda: client.complete(request), total, concurrency)
    finally:
        await client.aclose()


async def run_httpx(url: str, total: int, concurrency: int, pool: int) -> dict[str, Any]:
    import httpx

    body = _body(_chat_request())
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def call() -> object:
            response = await client.post("/chat/completions", json=body)
            return response.json()

        return await _timed(call, total, concurrency)


async def run_openai(url: str, total: int, concurrency: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    request = _chat_request()
    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0)
    try:
        return await _timed(
            lambda: client.chat.completions.create(
                model=request.model,
                messages=request.messages,
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                logprobs=True,
            ),
            total,
            concurrency,
        )
    finally:
        await client.close()


def _body(request: Any) -> dict[str, Any]:
    return {
        "model": request.model,
        "messages": request.messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "logprobs": True,
    }


async def run_raw(url: str, total: int, concurrency: int) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 over asyncio streams: the floor any client pays for the same call."""
    from urllib.parse import urlsplit

    request = _chat_request()
    parts = urlsplit(url)
    body = json.dumps(_body(request)).encode()
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    remaining = total

    async def conn() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while remaining > 0:
            remaining -= 1
            writer.write(head + body)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in headers.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            json.loads(await reader.readexactly(length))
        writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rate": total / wall, "cpu_ms_per_call": cpu / total * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=128)
    parser.add_argument(
        "--client", choices=("pipeline", "httpx", "openai", "raw"), default="pipeline"
    )
    args = parser.parse_args()
    if args.client == "raw":
        out = asyncio.run(run_raw(args.url, args.requests, args.concurrency))
    elif args.client == "openai":
        out = asyncio.run(run_openai(args.url, args.requests, args.concurrency))
    elif args.client == "httpx":
        out = asyncio.run(run_httpx(args.url, args.requests, args.concurrency, args.pool))
    else:
        out = asyncio.run(run_pipeline(args.url, args.requests, args.concurrency, args.pool))
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
