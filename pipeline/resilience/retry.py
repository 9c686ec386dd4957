"""Bounded retries around any :class:`ModelClient`.

Only failures that can succeed on a second try are retried (timeouts, connection errors,
429, 5xx). Waits use exponential backoff with full jitter, except that a server's
``Retry-After`` is obeyed. The whole thing stops when the attempt count or the time budget
(the smaller of the configured budget and the request's deadline) runs out.

Each attempt is its own span (and ``gen_ai.client.operation.duration`` sample), because the
provider bills, rate-limits and fails individual calls, not requests.

A plain loop rather than tenacity: tenacity builds a retrying object, its strategies and
a coroutine wrapper (an ``inspect`` check) for every call, which cost more CPU than the
rest of the resilience stack together when the first attempt succeeds, as nearly all do.
The policy is the same: full-jitter exponential backoff (tenacity's
``wait_random_exponential``: uniform in ``[0, min(max_wait, initial * 2**(n-1))]`` after
attempt ``n``), stop after ``max_attempts`` or when the wait would end past the budget.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from datetime import datetime

from pipeline.llm.genai import attempt_span
from pipeline.llm.protocol import (
    CallRecord,
    ChatCompletion,
    ChatRequest,
    ModelClient,
    ModelError,
)


class RetryingClient:
    def __init__(
        self,
        inner: ModelClient,
        *,
        max_attempts: int = 3,
        initial_wait_s: float = 0.2,
        max_wait_s: float = 10.0,
        budget_s: float = 60.0,
    ) -> None:
        self._inner = inner
        self._max_attempts = max_attempts
        self._initial_wait_s = initial_wait_s
        self._max_wait_s = max_wait_s
        self._budget_s = budget_s

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _wait_s(self, attempt: int, exc: ModelError) -> float:
        """How long to wait after failed attempt ``attempt`` (1-based)."""
        if exc.retry_after_s is not None:
            return exc.retry_after_s
        ceiling = self._initial_wait_s * 2.0 ** min(attempt - 1, 64)  # no float overflow
        return random.uniform(0.0, min(self._max_wait_s, ceiling))

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        give_up_at = time.monotonic() + self._budget_s
        if deadline is not None:
            give_up_at = min(give_up_at, time.monotonic() + deadline.timestamp() - time.time())
        calls: list[CallRecord] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    raise ModelError("timeout", "time budget spent before the call")
                timeout = min(request.timeout_s, remaining)
                call = (
                    request if timeout == request.timeout_s else replace(request, timeout_s=timeout)
                )
                started = time.perf_counter()
                try:
                    with attempt_span(call, attempt) as observed:
                        completion = await self._inner.complete(call)
                        observed.answered(completion)
                except ModelError as exc:
                    took = (time.perf_counter() - started) * 1000
                    calls.append(CallRecord(request.model, attempt, exc.kind, took))
                    raise
            except ModelError as exc:
                wait_s = self._wait_s(attempt, exc) if exc.retryable else 0.0
                if (
                    not exc.retryable
                    or attempt >= self._max_attempts
                    or time.monotonic() + wait_s >= give_up_at
                ):
                    exc.attempts = attempt
                    exc.calls = tuple(calls)
                    raise
                await asyncio.sleep(wait_s)
                continue
            took = (time.perf_counter() - started) * 1000
            calls.append(CallRecord(request.model, attempt, "ok", took))
            return replace(completion, attempts=attempt, calls=tuple(calls))
