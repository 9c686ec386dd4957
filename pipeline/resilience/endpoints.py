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
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelClient, ModelError
from pipeline.resilience.base import SYSTEM_CLOCK, Clock, remaining_s

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointConfigError(ValueError):
    """The endpoint mapping is malformed or names a key variable that is not set."""


@dataclass(frozen=True)
class ModelEndpoint:
    base_url: str
    api_key_env: str | None = None


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

    def resolve(self, model: str, environ: Mapping[str, str] | None = None) -> ResolvedEndpoint:
        """The endpoint for ``model``; a named key variable that is unset is an error."""
        spec = self.models.get(model)
        if spec is None:
            return ResolvedEndpoint(self.default_base_url, self.default_api_key)
        if spec.api_key_env is None:
            return ResolvedEndpoint(spec.base_url, None)
        env = os.environ if environ is None else environ
        key = env.get(spec.api_key_env)
        if not key:
            raise EndpointConfigError(
                f"model {model} needs its API key in ${spec.api_key_env}, which is not set"
            )
        return ResolvedEndpoint(spec.base_url, key)

    def check(self, environ: Mapping[str, str] | None = None) -> None:
        """Resolve every listed model now, so a missing key fails at start-up."""
        for model in self.models:
            self.resolve(model, environ)


def _check_url(url: Any, where: str) -> str:
    if not isinstance(url, str) or not url:
        raise EndpointConfigError(f"{where}: base_url must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointConfigError(f"{where}: base_url must be an http(s) URL, got {url!r}")
    return url


def parse_endpoints(
    raw: str | None, default_base_url: str, default_api_key: str | None = None
) -> Endpoints:
    """Parse ``LLMPIPE_MODEL_ENDPOINTS`` (see the module docstring); empty means none."""
    _check_url(default_base_url, "default endpoint")
    if raw is None or not raw.strip():
        return Endpoints(default_base_url, default_api_key)
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
        unknown = set(spec) - {"base_url", "api_key_env"}
        if unknown:
            raise EndpointConfigError(f"{where} has unknown fields {sorted(unknown)}")
        key_env = spec.get("api_key_env")
        if key_env is not None and (not isinstance(key_env, str) or not _ENV_NAME.match(key_env)):
            raise EndpointConfigError(
                f"{where}: api_key_env must be an environment variable name, got {key_env!r}"
            )
        models[model] = ModelEndpoint(_check_url(spec.get("base_url"), where), key_env)
    return Endpoints(default_base_url, default_api_key, models)


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
    and a call whose deadline has passed is not sent at all.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        factory: ClientFactory | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._endpoints = endpoints
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
        except EndpointConfigError as exc:
            raise ModelError("client_error", str(exc)) from exc
        left = remaining_s(deadline, self._clock)
        if left is not None:
            if left <= 0:
                raise ModelError("timeout", "deadline passed before the call", attempts=0)
            if left < request.timeout_s:
                request = replace(request, timeout_s=left)
        return await client.complete(request)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
