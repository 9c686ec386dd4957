"""Bounded retries around any :class:`ModelClient`, built from tenacity strategies.

Only failures that can succeed on a second try are retried (timeouts, connection errors,
429, 5xx). Waits use exponential backoff with full jitter (tenacity's
``wait_random_exponential``), except that a server's ``Retry-After`` is obeyed. The whole
thing stops when the attempt count or the time budget (the smaller of the configured budget
and the request's deadline) runs out.

Each attempt is its own span (and ``gen_ai.client.operation.duration`` sample), because the
provider bills, rate-limits and fails individual calls, not requests.

The first attempt runs outside tenacity: a tenacity loop costs more CPU per call than the
rest of the resilience stack together (its retrying object, call state and coroutine
wrapper), and nearly every first attempt succeeds. Once it fails, tenacity owns the whole
policy from attempt 1 on: the first failure is replayed as tenacity's first attempt, so
waits and stops are exactly tenacity's.
"""

from __future__ import annotations

import time
from datetime import datetime

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from pipeline.llm.genai import attempt_span
from pipeline.llm.protocol import (
    CallRecord,
    ChatCompletion,
    ChatRequest,
    ModelClient,
    ModelError,
    evolve,
)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ModelError) and exc.retryable


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
        self._budget_s = budget_s
        # Stateless strategies, built once; only the retrying loop is per call.
        self._backoff = wait_random_exponential(multiplier=initial_wait_s, max=max_wait_s)
        self._stop_after_attempts = stop_after_attempt(max_attempts)
        self._retry = retry_if_exception(_retryable)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ModelError) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return float(self._backoff(state))

    async def _attempt(
        self, request: ChatRequest, attempt: int, give_up_at: float, calls: list[CallRecord]
    ) -> ChatCompletion:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise ModelError("timeout", "time budget spent before the call")
        timeout = min(request.timeout_s, remaining)
        call = request if timeout == request.timeout_s else evolve(request, timeout_s=timeout)
        started = time.perf_counter()
        try:
            with attempt_span(call, attempt) as observed:
                completion = await self._inner.complete(call)
                observed.answered(completion)
        except ModelError as exc:
            took = (time.perf_counter() - started) * 1000
            calls.append(CallRecord(request.model, attempt, exc.kind, took))
            raise
        took = (time.perf_counter() - started) * 1000
        calls.append(CallRecord(request.model, attempt, "ok", took))
        return completion

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        give_up_at = time.monotonic() + self._budget_s
        if deadline is not None:
            give_up_at = min(give_up_at, time.monotonic() + deadline.timestamp() - time.time())
        calls: list[CallRecord] = []
        try:
            completion = await self._attempt(request, 1, give_up_at, calls)
        except ModelError as first:
            completion, attempts = await self._retried(request, first, give_up_at, calls)
        else:
            attempts = 1
        return evolve(completion, attempts=attempts, calls=tuple(calls))

    async def _retried(
        self,
        request: ChatRequest,
        first: ModelError,
        give_up_at: float,
        calls: list[CallRecord],
    ) -> tuple[ChatCompletion, int]:
        """Attempts 2.. under tenacity, which first sees ``first`` as attempt 1's outcome."""
        wait = self._wait

        class OutOfTime(stop_base):
            """Stop when the next wait would end after the request's time budget."""

            def __call__(self, state: RetryCallState) -> bool:
                return time.monotonic() + wait(state) >= give_up_at

        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                stop=self._stop_after_attempts | OutOfTime(),
                wait=wait,
                retry=self._retry,
                reraise=True,
            ):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts == 1:
                        raise first
                    completion = await self._attempt(request, attempts, give_up_at, calls)
        except ModelError as exc:
            exc.attempts = attempts
            exc.calls = tuple(calls)
            raise
        return completion, attempts
