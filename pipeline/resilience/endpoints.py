"""Which base URL and API key serve which model, and the bottom layer that routes to them.

Fallback models are often somewhere else: the primary on a provider, the fallback on a
self-hosted vLLM, or two providers with two keys. :class:`Endpoints` maps a model name to
a base URL and the *name* of the environment variable holding its key (never the key
itself, so the mapping can sit in plain configuration and logs); models not listed use
the default endpoint (``LLMPIPE_MODEL_BASE_URL`` / ``LLMPIPE_MODEL_API_KEY``)::

    LLMPIPE_MODEL_ENDPOINTS='{"claude-3-5-haiku-latest":
        {"base_url": "https://gateway.internal/anthropic/v1", "api_key_env": "ANTHROPIC_KEY"},
        "llama-3.1-8b": "http://vllm.internal:8000/v1"}'

(a bare string is shorthand for a base URL without a key). :class:`EndpointRouter` keeps
one HTTP client per distinct (base URL, key), so models behind the same gateway share one
connection pool.

The object form also says how the endpoint wants its requests
(:class:`~pipeline.llm.protocol.EndpointOptions`, deployment settings, not prompt logic)::

    {"smollm2": {"base_url": "http://127.0.0.1:8080/v1",
                 "structured_output": "json_object_schema"},
     "o3-mini": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_KEY",
                 "reasoning": true, "structured_output": "json_schema"},
     "gpt-4o-mini": {"base_url": "https://gateway.internal/v1",
                     "headers": {"x-team": "support"},
                     "headers_env": {"x-gateway-key": "GATEWAY_KEY"},
                     "extra_body": {"metadata": {"app": "llmpipe"}},
                     "token_limit_param": "max_completion_tokens"}}

``headers_env`` names environment variables for header values that are secrets, like
``api_key_env``. Models not listed get the default endpoint's options
(``LLMPIPE_MODEL_STRUCTURED_OUTPUT``, ``LLMPIPE_MODEL_HEADERS``, ``LLMPIPE_MODEL_EXTRA_BODY``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlsplit

from pipeline.errors import LlmpipeError
from pipeline.llm.cost import PriceTable
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import (
    ChatCompletion,
    ChatRequest,
    EndpointOptions,
    ModelClient,
    ModelError,
    TokenLimitParam,
    evolve,
)
from pipeline.llm.structured import STRUCTURED_OUTPUT_MODES, StructuredOutput
from pipeline.resilience.base import SYSTEM_CLOCK, Clock, remaining_s

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointConfigError(LlmpipeError, ValueError):
    """The endpoint mapping is malformed or names a key variable that is not set."""


@dataclass(frozen=True)
class ModelEndpoint:
    base_url: str
    api_key_env: str | None = None
    options: EndpointOptions = field(default_factory=EndpointOptions)
    headers_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedEndpoint:
    """A base URL with its key read from the environment; what a client is built from."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Endpoints:
    default_base_url: str
    default_api_key: str | None = field(default=None, repr=False)
    models: Mapping[str, ModelEndpoint] = field(default_factory=dict)
    default_options: EndpointOptions = field(default_factory=EndpointOptions)

    def resolve(self, model: str, environ: Mapping[str, str] | None = None) -> ResolvedEndpoint:
        """The endpoint for ``model``; a named key variable that is unset is an error."""
        spec = self.models.get(model)
        if spec is None:
            return ResolvedEndpoint(self.default_base_url, self.default_api_key)
        if spec.api_key_env is None:
            return ResolvedEndpoint(spec.base_url, None)
        return ResolvedEndpoint(spec.base_url, _from_env(model, spec.api_key_env, environ))

    def options(self, model: str, environ: Mapping[str, str] | None = None) -> EndpointOptions:
        """How ``model``'s endpoint wants its requests, secret header values read now."""
        spec = self.models.get(model)
        if spec is None:
            return self.default_options
        if not spec.headers_env:
            return spec.options
        secret = {name: _from_env(model, env, environ) for name, env in spec.headers_env.items()}
        return replace(spec.options, headers={**spec.options.headers, **secret})

    def check(self, environ: Mapping[str, str] | None = None) -> None:
        """Resolve every listed model now, so a missing key fails at start-up."""
        for model in self.models:
            self.resolve(model, environ)
            self.options(model, environ)


def _from_env(model: str, name: str, environ: Mapping[str, str] | None) -> str:
    value = (os.environ if environ is None else environ).get(name)
    if not value:
        raise EndpointConfigError(f"model {model} needs ${name}, which is not set")
    return value


def _check_url(url: Any, where: str) -> str:
    if not isinstance(url, str) or not url:
        raise EndpointConfigError(f"{where}: base_url must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointConfigError(f"{where}: base_url must be an http(s) URL, got {url!r}")
    return url


_OPTION_FIELDS = {"structured_output", "headers", "extra_body", "token_limit_param", "reasoning"}
_RESERVED_BODY = frozenset({"model", "messages"})


def parse_options(spec: Mapping[str, Any], where: str) -> EndpointOptions:
    """The :class:`EndpointOptions` fields of one endpoint object (others are ignored)."""
    mode = spec.get("structured_output", "none")
    if mode not in STRUCTURED_OUTPUT_MODES:
        raise EndpointConfigError(
            f"{where}: structured_output must be one of {', '.join(STRUCTURED_OUTPUT_MODES)}, "
            f"got {mode!r}"
        )
    headers = _string_map(spec.get("headers", {}), f"{where}: headers")
    extra_body = spec.get("extra_body", {})
    if not isinstance(extra_body, dict):
        raise EndpointConfigError(f"{where}: extra_body must be a JSON object")
    reserved = sorted(_RESERVED_BODY & set(extra_body))
    if reserved:
        raise EndpointConfigError(f"{where}: extra_body may not set {', '.join(reserved)}")
    limit = spec.get("token_limit_param", "max_tokens")
    if limit not in ("max_tokens", "max_completion_tokens"):
        raise EndpointConfigError(
            f"{where}: token_limit_param must be max_tokens or max_completion_tokens"
        )
    reasoning = spec.get("reasoning", False)
    if not isinstance(reasoning, bool):
        raise EndpointConfigError(f"{where}: reasoning must be true or false")
    return EndpointOptions(
        structured_output=cast(StructuredOutput, mode),
        headers=headers,
        extra_body=extra_body,
        token_limit_param=cast(TokenLimitParam, limit),
        reasoning=reasoning,
    )


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise EndpointConfigError(f"{where} must be a JSON object of strings")
    return dict(value)


def default_options(
    structured_output: str = "none", headers: str = "", extra_body: str = ""
) -> EndpointOptions:
    """The default endpoint's options from ``LLMPIPE_MODEL_STRUCTURED_OUTPUT``,
    ``LLMPIPE_MODEL_HEADERS`` and ``LLMPIPE_MODEL_EXTRA_BODY`` (JSON objects)."""
    spec: dict[str, Any] = {"structured_output": structured_output}
    for name, raw in (("headers", headers), ("extra_body", extra_body)):
        if raw.strip():
            try:
                spec[name] = json.loads(raw)
            except ValueError as exc:
                raise EndpointConfigError(f"model {name} are not valid JSON: {exc}") from None
    return parse_options(spec, "default endpoint")


def parse_endpoints(
    raw: str | None,
    default_base_url: str,
    default_api_key: str | None = None,
    defaults: EndpointOptions | None = None,
) -> Endpoints:
    """Parse ``LLMPIPE_MODEL_ENDPOINTS`` (see the module docstring); empty means none.

    A listed model's options start from nothing, not from ``defaults``: an endpoint object
    describes one server completely, so a default for the main endpoint (say
    ``json_schema``) cannot leak into a self-hosted server that refuses it.
    """
    _check_url(default_base_url, "default endpoint")
    defaults = defaults or EndpointOptions()
    if raw is None or not raw.strip():
        return Endpoints(default_base_url, default_api_key, default_options=defaults)
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise EndpointConfigError(f"model endpoints are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EndpointConfigError("model endpoints must be a JSON object of model -> endpoint")
    models: dict[str, ModelEndpoint] = {}
    for model, spec in data.items():
        where = f"endpoint for {model!r}"
        if isinstance(spec, str):
            models[model] = ModelEndpoint(_check_url(spec, where))
            continue
        if not isinstance(spec, dict):
            raise EndpointConfigError(f"{where} must be a URL string or an object")
        unknown = set(spec) - {"base_url", "api_key_env", "headers_env"} - _OPTION_FIELDS
        if unknown:
            raise EndpointConfigError(f"{where} has unknown fields {sorted(unknown)}")
        key_env = spec.get("api_key_env")
        header_envs = _string_map(spec.get("headers_env", {}), f"{where}: headers_env")
        for env in [key_env, *header_envs.values()]:
            if env is not None and (not isinstance(env, str) or not _ENV_NAME.match(env)):
                raise EndpointConfigError(f"{where}: {env!r} is not an environment variable name")
        models[model] = ModelEndpoint(
            _check_url(spec.get("base_url"), where),
            key_env,
            parse_options(spec, where),
            header_envs,
        )
    return Endpoints(default_base_url, default_api_key, models, defaults)


ClientFactory = Callable[[ResolvedEndpoint], ModelClient]


def openai_factory(max_connections: int = 256) -> ClientFactory:
    """Build :class:`OpenAIChatClient` instances (the production factory)."""

    def build(endpoint: ResolvedEndpoint) -> ModelClient:
        return OpenAIChatClient(
            endpoint.base_url, endpoint.api_key, max_connections=max_connections
        )

    return build


class EndpointRouter:
    """The bottom layer: sends each request to its model's endpoint.

    It is also where the deadline meets the wire: the HTTP timeout is cut to the time left,
    and a call whose deadline has passed is not sent at all; and where each answer is
    priced (``prices``), since only here is the called model certain.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        factory: ClientFactory | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        environ: Mapping[str, str] | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._prices = prices or PriceTable()
        self._factory = factory or openai_factory()
        self._clock = clock
        self._environ = environ
        self._clients: dict[ResolvedEndpoint, ModelClient] = {}

    def client_for(self, model: str) -> ModelClient:
        endpoint = self._endpoints.resolve(model, self._environ)
        client = self._clients.get(endpoint)
        if client is None:
            client = self._factory(endpoint)
            self._clients[endpoint] = client
        return client

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        try:
            client = self.client_for(request.model)
            options = self._endpoints.options(request.model, self._environ)
        except EndpointConfigError as exc:
            raise ModelError("client_error", str(exc)) from exc
        request = evolve(request, endpoint=options)
        left = remaining_s(deadline, self._clock)
        if left is not None:
            if left <= 0:
                raise ModelError("timeout", "deadline passed before the call", attempts=0)
            if left < request.timeout_s:
                request = evolve(request, timeout_s=left)
        answer = await client.complete(request)
        cost = self._prices.cost(
            request.model, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens
        )
        return evolve(answer, cost_usd=cost)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
