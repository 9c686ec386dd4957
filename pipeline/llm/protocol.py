"""The one interface every model client and every resilience layer implements.

Resilience (retries, rate limits, breakers, fallback models) wraps this protocol instead of
living inside a client, so each layer is small, testable alone and composable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

ErrorKind = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "client_error",
    "bad_response",
    "unavailable",
]
RETRYABLE: frozenset[str] = frozenset({"timeout", "connection", "rate_limited", "server_error"})


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    temperature: float = 0.0
    max_tokens: int = 512
    logprobs: bool = False
    timeout_s: float = 30.0


@dataclass(frozen=True)
class ChatCompletion:
    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    latency_ms: float = 0.0
    attempts: int = 1

    def with_attempts(self, attempts: int) -> ChatCompletion:
        return replace(self, attempts=attempts)


class ModelError(Exception):
    """A failed call, classified so that retry and fallback policies can decide on ``kind``."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.retry_after_s = retry_after_s
        self.status = status
        self.attempts = attempts

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


class ModelClient(Protocol):
    async def complete(self, request: ChatRequest) -> ChatCompletion: ...

    async def aclose(self) -> None: ...
