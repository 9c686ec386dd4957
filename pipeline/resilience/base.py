"""What every resilience layer shares: the call shape, the clock, and token estimates.

Every layer has the same ``complete(request, deadline=None)`` method as the retry layer
(:class:`pipeline.resilience.retry.RetryingClient`) so layers stack in any order and each can be
tested alone against a scripted inner client. The two outermost layers (budget and fallback
chain) additionally take keyword-only routing hints (``prompt``, ``models``) that only they
understand; they still satisfy the plain shape, so :class:`pipeline.stages.model_call.ModelCaller`
can call the stack without knowing about them.

Time comes from an injected :class:`Clock` rather than :mod:`time` so unit tests drive
time by hand (no sleeps, no wall-clock assertions) and the same code runs in production.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from pipeline.llm.protocol import ChatCompletion, ChatRequest

CHARS_PER_TOKEN = 4
"""Rough English average; good enough to reserve budget up front, corrected after the call."""


class Clock(Protocol):
    """Monotonic time for intervals, wall time for deadlines, and a sleep that honours both."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock; the default everywhere."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


SYSTEM_CLOCK: Clock = SystemClock()


class LayerClient(Protocol):
    """The shape every layer implements and expects of the layer below."""

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion: ...

    async def aclose(self) -> None: ...


class RoutedClient(Protocol):
    """A layer that can also be told the ordered list of models to try (the fallback chain)."""

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion: ...

    async def aclose(self) -> None: ...


def remaining_s(deadline: datetime | None, clock: Clock) -> float | None:
    """Seconds left before ``deadline`` by ``clock``'s wall time; None when there is none."""
    if deadline is None:
        return None
    return deadline.timestamp() - clock.time()


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """Characters of every message (role and content) over four, rounded up.

    Deliberately crude: it only has to be in the right range for reservations, because
    every layer that reserves by estimate corrects itself with the usage the endpoint
    reports once the call returns.
    """
    chars = sum(len(value) for message in messages for value in message.values())
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_request_tokens(request: ChatRequest) -> int:
    """The most a request can cost: its estimated prompt plus every token it may generate."""
    return estimate_prompt_tokens(request.messages) + request.max_tokens


def used_tokens(completion: ChatCompletion, request: ChatRequest) -> int:
    """What a call actually cost; estimated when the endpoint reports no usage."""
    used = completion.prompt_tokens + completion.completion_tokens
    if used > 0:
        return used
    return estimate_prompt_tokens(request.messages) + math.ceil(
        len(completion.text) / CHARS_PER_TOKEN
    )
