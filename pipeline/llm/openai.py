"""OpenAI-compatible chat completions over a lean HTTP/1.1 keep-alive pool.

The same wire protocol is served by OpenAI, vLLM, Ollama, llama.cpp server, LM Studio and
most gateways, so one client covers them all. It classifies failures but never retries:
retrying is the job of :mod:`pipeline.resilience.retry`, which knows the request's budget.

Why its own HTTP (:mod:`pipeline.llm.http`) and not a library: the model call is the
largest single cost of a request inside the worker, and the client's own bookkeeping is
most of it. Against the same instant fake model, httpx spent 0.64-0.76 ms of CPU per call
(pool scans, anyio streams, pure-Python h11), aiohttp 0.14-0.18 ms (its request and
response machinery around a C parser), a raw asyncio loop 0.05 ms
(``python -m bench.httpclient``). One origin and one method need none of that machinery:
the pool here is an asyncio protocol around httptools' parser. Bodies go out through orjson
and come back through :func:`pipeline.contract.jsontext.loads` (orjson, with the standard
library's exact values).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from pipeline.contract.jsontext import loads
from pipeline.llm.http import BodyError, HeaderError, HTTPError, Pool
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.llm.structured import StructuredOutput, response_format
from pipeline.observability.context import current_scope

log = logging.getLogger("pipeline.llm.openai")

MAX_RESPONSE_BYTES = 8_000_000
# Under the 5 s keep-alive of uvicorn and llama.cpp's server, so the client drops an idle
# connection before the server does instead of writing into one it is closing.
KEEPALIVE_S = 4.0
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
    ) -> None:
        """One keep-alive pool of up to ``max_connections`` connections per client.

        The pool is made on first use, inside the event loop that uses it (its
        connections belong to that loop), and made again once that loop is closed (a CLI
        command or a test that runs ``asyncio.run`` twice): checked without
        ``asyncio.get_running_loop()``, a ``getpid()`` system call per call on Python 3.11.
        The proxy variables and ``~/.netrc`` are read then, once per pool, not per call.
        """
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_connections = max_connections
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._http: Pool | None = None
        self._base_url = base_url
        self.refused: dict[tuple[str, StructuredOutput], str] = {}
        """(model, mode) -> the server's answer when it refused that structured-output mode."""

    def _pool(self) -> Pool:
        pool = self._http
        if pool is None or pool.closed or pool.loop.is_closed():
            pool = self._http = Pool(
                self._url,
                self._headers,
                limit=self._max_connections,
                keepalive_s=KEEPALIVE_S,
                max_body=MAX_RESPONSE_BYTES,
                max_error_body=ERROR_BODY_BYTES,
            )
        return pool

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
            await asyncio.sleep(0)  # the closed connections' sockets go in the next turn
        self._http = None

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
        headers = request.endpoint.headers
        rid = correlation_headers()
        if rid:
            headers = {**headers, **rid} if headers else rid
        started = time.perf_counter()
        try:
            async with asyncio.timeout(request.timeout_s):
                response = await self._pool().post(dumps(body), headers)
        except TimeoutError as exc:
            raise ModelError("timeout", f"no answer within {request.timeout_s}s") from exc
        except BodyError as exc:
            raise ModelError("bad_response", str(exc)) from exc
        except HeaderError as exc:
            raise ModelError("client_error", f"cannot send the request: {exc}") from exc
        except HTTPError as exc:
            raise ModelError("connection", str(exc)) from exc
        status = response.status
        if status != 200:
            text = response.body.decode("utf-8", errors="replace")
            raise _status_error(status, text, response.headers, "response_format" in body)
        latency_ms = (time.perf_counter() - started) * 1000
        return _parse(response.body, request.model, latency_ms, mode)


# Enough of an error body to classify it (llama.cpp's and OpenAI's are a few hundred bytes).
ERROR_BODY_BYTES = 65_536


def dumps(body: Mapping[str, Any]) -> bytes:
    """orjson, or the standard library for what orjson refuses (non-string keys, ints wider
    than 64 bits in a prompt's ``extra_body``), so the body sent never depends on speed."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


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


def _status_error(
    status: int, body: str, headers: Mapping[str, str], structured: bool = False
) -> ModelError:
    """Classify a non-200 answer; ``structured`` says the body carried ``response_format``."""
    text = body[:200]
    if structured and status in (400, 422, 500) and _names_response_format(body):
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
            retry_after_s=retry_after_seconds(headers.get("retry-after")),
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


def _parse(
    content: bytes, requested_model: str, latency_ms: float, mode: StructuredOutput = "none"
) -> ChatCompletion:
    try:
        data = loads(content)
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        logprob_items = ((choice.get("logprobs") or {}).get("content")) or []
        logprobs = [float(item["logprob"]) for item in logprob_items if "logprob" in item]
        tokens = [item.get("token") for item in logprob_items if "logprob" in item]
        finish = choice.get("finish_reason")
        # Every field is of its declared type from here on (the model stage builds its
        # envelope from these without revalidating them): what the server sent otherwise
        # is dropped, not passed on.
        return ChatCompletion(
            text=text,
            model=str(data.get("model") or requested_model),
            finish_reason=finish if isinstance(finish, str) else None,
            prompt_tokens=_token_count(usage.get("prompt_tokens")),
            completion_tokens=_token_count(usage.get("completion_tokens")),
            token_logprobs=logprobs,
            tokens=tokens if {*map(type, tokens)} <= {str} else [],  # JSON text: exactly str
            latency_ms=latency_ms,
            cached_tokens=_token_count(details.get("cached_tokens")),
            structured_output=mode,
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
