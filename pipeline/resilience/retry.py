"""Bounded retries around any :class:`ModelClient`, built from tenacity strategies.

Only failures that can succeed on a second try are retried (timeouts, connection errors,
429, 5xx). Waits use exponential backoff with full jitter, except that a server's
``Retry-After`` is obeyed. The whole thing stops when the attempt count or the time budget
(the smaller of the configured budget and the request's deadline) runs out.

Each attempt is its own span (and ``gen_ai.client.operation.duration`` sample), because the
provider bills, rate-limits and fails individual calls, not requests.
"""

from __future__ import annotations

import time
from dataclasses import replace
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
        self._backoff = wait_random_exponential(multiplier=initial_wait_s, max=max_wait_s)
        self._budget_s = budget_s

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        give_up_at = time.monotonic() + self._budget_s
        if deadline is not None:
            give_up_at = min(give_up_at, time.monotonic() + deadline.timestamp() - time.time())

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ModelError) and exc.retry_after_s is not None:
                return exc.retry_after_s
            return float(self._backoff(state))

        class OutOfTime(stop_base):
            """Stop when the next wait would end after the request's time budget."""

            def __call__(self, state: RetryCallState) -> bool:
                return time.monotonic() + wait(state) >= give_up_at

        attempts = 0
        calls: list[CallRecord] = []
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._max_attempts) | OutOfTime(),
                wait=wait,
                retry=retry_if_exception(lambda e: isinstance(e, ModelError) and e.retryable),
                reraise=True,
            ):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    remaining = give_up_at - time.monotonic()
                    if remaining <= 0:
                        raise ModelError("timeout", "time budget spent before the call")
                    timeout = min(request.timeout_s, remaining)
                    call = replace(request, timeout_s=timeout)
                    started = time.perf_counter()
                    try:
                        with attempt_span(call, attempts) as observed:
                            completion = await self._inner.complete(call)
                            observed.answered(completion)
                    except ModelError as exc:
                        took = (time.perf_counter() - started) * 1000
                        calls.append(CallRecord(request.model, attempts, exc.kind, took))
                        raise
                    took = (time.perf_counter() - started) * 1000
                    calls.append(CallRecord(request.model, attempts, "ok", took))
        except ModelError as exc:
            exc.attempts = attempts
            exc.calls = tuple(calls)
            raise
        return replace(completion, attempts=attempts, calls=tuple(calls))
