"""OpenAI-compatible chat completions over httpx.

The same wire protocol is served by OpenAI, vLLM, Ollama, llama.cpp server, LM Studio and
most gateways, so one client covers them all. It classifies failures but never retries:
retrying is the job of :mod:`pipeline.resilience.retry`, which knows the request's budget.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.llm.structured import StructuredOutput, response_format
from pipeline.observability.context import current_scope

log = logging.getLogger("pipeline.llm.openai")

MAX_RESPONSE_BYTES = 8_000_000
CONNECTIONS_PER_SHARD = 8
MAX_TOKEN_COUNT = 2**31 - 1
# OpenAI's header for a caller-chosen request id (ASCII, at most 512 characters): the
# provider logs it, so a bill line or a support case leads back to the pipeline's request.
CLIENT_REQUEST_ID = "X-Client-Request-Id"
MAX_CLIENT_REQUEST_ID = 512


class OpenAIChatClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``max_connections`` is spread over shards of ``CONNECTIONS_PER_SHARD``.

        httpcore's pool scans every connection for every queued request on each state
        change, so one pool of 128 connections spends most of its time scanning (the
        overhead benchmark measured 320 calls/s with one pool of 128 and 1,250 with 8
        pools of 8, against the same server). Round-robin over small pools keeps the scan
        short and the total connection count unchanged.
        """
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        per_shard = min(CONNECTIONS_PER_SHARD, max_connections)
        shards = max(1, max_connections // per_shard)
        tls = httpx.create_ssl_context()  # one CA bundle load, not one per shard
        self._shards = [
            httpx.AsyncClient(
                base_url=base_url.rstrip("/"),
                headers=headers,
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
                transport=transport,
                verify=tls,
            )
            for _ in range(shards)
        ]
        self._next = itertools.cycle(self._shards)
        self._base_url = base_url
        self.refused: dict[tuple[str, StructuredOutput], str] = {}
        """(model, mode) -> the server's answer when it refused that structured-output mode."""

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        mode = request.mode
        if (request.model, mode) in self.refused:
            mode = "none"
        try:
            return await self._send(request, mode)
        except ModelError as exc:
            if mode == "none" or not exc.refused_response_format:
                raise
            answer = await self._send(request, "none")  # confirms the refusal was the mode's
            self._refuse(request.model, mode, str(exc))
            return answer

    def _refuse(self, model: str, mode: StructuredOutput, detail: str) -> None:
        if (model, mode) in self.refused:
            return
        self.refused[(model, mode)] = detail
        log.error(
            "configuration error: the endpoint %s refuses structured_output=%s for model %s "
            "(%s); its calls go without response_format from now on. Set structured_output "
            "for this endpoint in LLMPIPE_MODEL_ENDPOINTS (llama.cpp: json_object_schema) "
            "or in the prompt's model section.",
            self._base_url,
            mode,
            model,
            detail[:300],
        )

    async def _send(self, request: ChatRequest, mode: StructuredOutput) -> ChatCompletion:
        body = chat_body(request, mode)
        started = time.perf_counter()
        try:
            response = await next(self._next).post(
                "/chat/completions",
                json=body,
                headers={**request.endpoint.headers, **correlation_headers()},
                timeout=httpx.Timeout(request.timeout_s),
            )
        except httpx.TimeoutException as exc:
            raise ModelError("timeout", f"no answer within {request.timeout_s}s") from exc
        except httpx.TransportError as exc:
            raise ModelError("connection", f"{type(exc).__name__}: {exc}") from exc
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise _status_error(response, "response_format" in body)
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ModelError("bad_response", f"response of {len(response.content)} bytes")
        return replace(_parse(response, request.model, latency_ms), structured_output=mode)


def correlation_headers() -> dict[str, str]:
    """The request id of the message being processed, when it is a valid header value.

    Request ids are untrusted input: one that is not printable ASCII or is too long is
    left out rather than sent mangled (the call itself must never fail on it).
    """
    scope = current_scope()
    rid = scope.request_id if scope is not None else None
    if rid and len(rid) <= MAX_CLIENT_REQUEST_ID and rid.isascii() and rid.isprintable():
        return {CLIENT_REQUEST_ID: rid}
    return {}


def chat_body(request: ChatRequest, mode: StructuredOutput | None = None) -> dict[str, Any]:
    """The JSON body for ``request``; ``mode`` overrides its structured-output mode.

    Order of precedence for extra fields: llmpipe's own fields, then the endpoint's
    ``extra_body`` (deployment), then the prompt's (prompt logic, e.g. llama.cpp's
    ``top_k``); neither may replace ``model`` or ``messages`` (checked where they are
    configured). A reasoning endpoint, or a prompt that sets ``reasoning_effort``, gets
    the reasoning-model rules (see :class:`~pipeline.llm.protocol.EndpointOptions`).
    """
    endpoint = request.endpoint
    reasoning = endpoint.reasoning or request.reasoning_effort is not None
    body: dict[str, Any] = {"model": request.model, "messages": request.messages}
    limit_param = "max_completion_tokens" if reasoning else endpoint.token_limit_param
    body[limit_param] = request.max_tokens
    if reasoning:
        if request.reasoning_effort is not None:
            body["reasoning_effort"] = request.reasoning_effort
    else:
        sampling = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        body.update({k: v for k, v in sampling.items() if v is not None})
        if request.logprobs:
            # llama.cpp's server returns no logprobs unless top_logprobs is set as well.
            body["logprobs"] = True
            body["top_logprobs"] = 0
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    chosen = request.mode if mode is None else mode
    fmt = response_format(chosen, request.output_schema, request.schema_name, request.schema_strict)
    if fmt is not None:
        body["response_format"] = fmt
    for extra in (endpoint.extra_body, request.extra_body):
        body.update({k: v for k, v in extra.items() if k not in ("model", "messages")})
    return body


def _status_error(response: httpx.Response, structured: bool = False) -> ModelError:
    """Classify a non-200 answer; ``structured`` says the body carried ``response_format``."""
    status = response.status_code
    text = response.text[:200]
    if structured and status in (400, 422, 500) and _names_response_format(response.text):
        return ModelError(
            "client_error",
            f"{status} from model endpoint, refusing response_format: {text}",
            status=status,
            refused_response_format=True,
        )
    if status == 429:
        return ModelError(
            "rate_limited",
            f"429 from model endpoint: {text}",
            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
            status=status,
        )
    if status in (408, 409) or status >= 500:
        return ModelError("server_error", f"{status} from model endpoint: {text}", status=status)
    return ModelError("client_error", f"{status} from model endpoint: {text}", status=status)


def _names_response_format(text: str) -> bool:
    """Whether an error body blames the structured-output request (OpenAI names the
    ``param``; llama.cpp's 500 carries a validation error with ``response_format``)."""
    return "response_format" in text or "json_schema" in text


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` is either delta-seconds or an HTTP date; both are honoured."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _parse(response: httpx.Response, requested_model: str, latency_ms: float) -> ChatCompletion:
    try:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        logprob_items = ((choice.get("logprobs") or {}).get("content")) or []
        logprobs = [float(item["logprob"]) for item in logprob_items if "logprob" in item]
        tokens = [item.get("token") for item in logprob_items if "logprob" in item]
        return ChatCompletion(
            text=text,
            model=str(data.get("model") or requested_model),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=_token_count(usage.get("prompt_tokens")),
            completion_tokens=_token_count(usage.get("completion_tokens")),
            token_logprobs=logprobs,
            tokens=[str(t) for t in tokens] if all(isinstance(t, str) for t in tokens) else [],
            latency_ms=latency_ms,
            cached_tokens=_token_count(details.get("cached_tokens")),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ModelError("bad_response", f"unexpected response shape: {exc!r}"[:200]) from exc


def _token_count(value: Any) -> int:
    """Usage is reported by the server, so it is untrusted: clamp it to what the envelopes
    hold (an Avro int) instead of letting a bogus number fail the whole request."""
    try:
        count = int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(count, 0), MAX_TOKEN_COUNT)
