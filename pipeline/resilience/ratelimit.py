"""Client-side rate limits per model endpoint: requests/minute, tokens/minute, calls in flight.

Why limit on our side when the provider already answers 429: a 429 costs a round trip,
counts against some providers' limits itself, and arrives for *every* concurrent caller
at once, so a worker that relies on 429s alone oscillates between a storm of refusals
and idle backoff. A local token bucket spaces calls so most never see a 429 at all; the
retry layer still honours ``Retry-After`` for the ones that do.

How the buckets work
    Each limited model gets a requests bucket and a tokens bucket that refill continuously
    (``per_minute / period_s`` per second) up to their burst size. A call *reserves* its
    cost at once and then sleeps until the reservation is paid for (the "virtual
    scheduling" of Go's ``rate.Limiter``): callers are served in arrival order, no waiter
    polls, and the wait is known before sleeping, so a call whose wait would pass its
    deadline is refused immediately with :class:`RateLimitExceeded` (carrying the wait as
    ``retry_after_s``) instead of queueing; the fallback chain can then move on to the
    next model while there is still time. A token reservation is the estimated prompt
    (characters / 4) plus ``max_tokens``, because that is the most the call can cost; once
    the endpoint reports real usage the difference goes back into (or comes out of) the
    bucket. A failed call gives back its ``max_tokens`` part (nothing was generated) but
    keeps the prompt part and the request (the endpoint may have counted both).

    In any interval of length T a bucket admits at most ``burst + rate * T``. The default
    burst is one full period's worth, like most providers' buckets; set a smaller burst
    for smoother traffic (OpenAI, for one, may enforce 60 000/min as 1 000/s).

Calls in flight
    ``max_in_flight`` is an :class:`asyncio.Semaphore` per model, taken before the buckets
    (a call holding a slot is the next to go). Waiting for a slot is bounded by the same
    deadline.

When there is no deadline
    The bound is ``request.timeout_s``. Below :class:`~pipeline.resilience.retry.RetryingClient`
    (which does not pass the deadline on, but shrinks ``timeout_s`` to what is left of its
    budget and the deadline) that is exactly the time left whenever the deadline is near.

Several workers share one provider budget
    Limits here are per process: every worker keeps its own buckets and nothing is
    coordinated over the network (that would put a shared store on the hot path of every
    call). To keep N workers under an account limit, give each ``1/N`` of it:
    ``RateLimit(...).per_worker(N)`` divides the per-minute numbers, the bursts and the
    in-flight cap. Configuration comes from the environment through
    :func:`parse_rate_limits`, e.g.::

        LLMPIPE_MODEL_RATE_LIMITS='{"gpt-4o-mini": {"requests_per_minute": 500,
            "tokens_per_minute": 200000, "max_in_flight": 32}, "*": {"requests_per_minute": 60}}'
        LLMPIPE_WORKERS=4   # each worker then allows 125 req/min, 50 000 tokens/min, 8 in flight

    The numbers are account-wide; the division happens in
    :func:`pipeline.resilience.stack.build_client`. If workers are scaled without updating
    ``LLMPIPE_WORKERS`` the provider's 429s (obeyed by the retry layer) are the backstop.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.observability.hooks import record_rate_limit_rejection, record_rate_limit_wait
from pipeline.resilience.base import (
    SYSTEM_CLOCK,
    Clock,
    LayerClient,
    estimate_prompt_tokens,
    remaining_s,
    used_tokens,
)
from pipeline.resilience.errors import RateLimitExceeded

DEFAULT_KEY = "*"


@dataclass(frozen=True)
class RateLimit:
    """Limits for one model endpoint; ``None`` means "no limit of that kind".

    ``period_s`` is the length of the "minute" the per-minute numbers refer to. It is 60
    in production; tests shorten it to see a full refill cycle in a fraction of a second.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_in_flight: int | None = None
    request_burst: float | None = None
    token_burst: float | None = None
    period_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "request_burst",
            "token_burst",
        ):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"period_s must be a positive number, got {self.period_s!r}")

    def per_worker(self, workers: int) -> RateLimit:
        """This worker's share when ``workers`` processes split one account-wide limit."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if workers == 1:
            return self

        def share(value: float | None) -> float | None:
            return None if value is None else value / workers

        return replace(
            self,
            requests_per_minute=share(self.requests_per_minute),
            tokens_per_minute=share(self.tokens_per_minute),
            request_burst=share(self.request_burst),
            token_burst=share(self.token_burst),
            max_in_flight=(
                None if self.max_in_flight is None else max(1, self.max_in_flight // workers)
            ),
        )


class TokenBucket:
    """A continuously refilled bucket whose level may go negative (reserved ahead)."""

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._level = capacity
        self._at = now

    def level(self, now: float) -> float:
        self._refill(now)
        return self._level

    def wait_s(self, cost: float, now: float) -> float:
        """How long a reservation of ``cost`` made now would have to wait."""
        deficit = cost - self.level(now)
        return max(0.0, deficit / self.rate_per_s)

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self._level -= cost

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level = min(self.capacity, self._level + amount)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate_per_s)
            self._at = now


@dataclass
class RateLimitStats:
    """Counters for metrics; a snapshot is returned by :meth:`RateLimitedClient.stats`."""

    calls: int = 0
    waits: int = 0
    waited_s: float = 0.0
    rejected: int = 0
    in_flight: int = 0


@dataclass
class _ModelLimiter:
    limit: RateLimit
    requests: TokenBucket | None
    tokens: TokenBucket | None
    slots: asyncio.Semaphore | None
    stats: RateLimitStats = field(default_factory=RateLimitStats)


def _bucket(
    per_period: float | None, burst: float | None, period_s: float, now: float
) -> TokenBucket | None:
    if per_period is None:
        return None
    return TokenBucket(per_period / period_s, burst if burst is not None else per_period, now)


class RateLimitedClient:
    """Applies :class:`RateLimit` per ``request.model``; unlisted models use ``default``.

    Models with neither an entry nor a default are not limited. Each model has its own
    buckets, including models that share the default.
    """

    def __init__(
        self,
        inner: LayerClient,
        limits: Mapping[str, RateLimit],
        *,
        default: RateLimit | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._inner = inner
        self._limits = dict(limits)
        self._default = default
        self._clock = clock
        self._models: dict[str, _ModelLimiter] = {}

    async def aclose(self) -> None:
        await self._inner.aclose()

    def limit_for(self, model: str) -> RateLimit | None:
        return self._limits.get(model, self._default)

    def stats(self) -> dict[str, RateLimitStats]:
        """A copy of the counters per model (only models that have been called)."""
        return {model: replace(state.stats) for model, state in self._models.items()}

    def _limiter(self, model: str) -> _ModelLimiter | None:
        state = self._models.get(model)
        if state is not None:
            return state
        limit = self.limit_for(model)
        if limit is None:
            return None
        now = self._clock.monotonic()
        state = _ModelLimiter(
            limit=limit,
            requests=_bucket(limit.requests_per_minute, limit.request_burst, limit.period_s, now),
            tokens=_bucket(limit.tokens_per_minute, limit.token_burst, limit.period_s, now),
            slots=asyncio.Semaphore(limit.max_in_flight) if limit.max_in_flight else None,
        )
        self._models[model] = state
        return state

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        state = self._limiter(request.model)
        if state is None:
            return await self._inner.complete(request, deadline)
        clock = self._clock
        started = clock.monotonic()
        left = remaining_s(deadline, clock)
        bound = request.timeout_s if left is None else left
        slot_waited = False
        if state.slots is not None:
            slot_waited = await self._take_slot(state, request.model, bound)
        state.stats.in_flight += 1
        try:
            return await self._paced_call(state, request, deadline, started, bound, slot_waited)
        finally:
            state.stats.in_flight -= 1
            if state.slots is not None:
                state.slots.release()

    async def _take_slot(self, state: _ModelLimiter, model: str, bound: float) -> bool:
        """Take a call slot within ``bound`` seconds; True when the caller had to wait."""
        assert state.slots is not None
        if not state.slots.locked():
            await state.slots.acquire()  # returns at once: a slot is free
            return False
        if bound <= 0:
            raise self._reject(state, model, "no free call slot before the deadline", None)
        try:
            async with asyncio.timeout(bound):
                await state.slots.acquire()
        except TimeoutError:
            raise self._reject(
                state, model, f"no free call slot within {bound:.3g}s", None
            ) from None
        return True

    async def _paced_call(
        self,
        state: _ModelLimiter,
        request: ChatRequest,
        deadline: datetime | None,
        started: float,
        bound: float,
        slot_waited: bool,
    ) -> ChatCompletion:
        clock = self._clock
        now = clock.monotonic()
        left = bound - (now - started)
        reserved = estimate_prompt_tokens(request.messages) + request.max_tokens
        wait = 0.0
        if state.requests is not None:
            wait = state.requests.wait_s(1, now)
        if state.tokens is not None:
            wait = max(wait, state.tokens.wait_s(reserved, now))
        if wait > 0 and wait >= left:
            raise self._reject(
                state,
                request.model,
                f"rate limit for {request.model} needs a {wait:.3g}s wait, "
                f"only {max(left, 0.0):.3g}s left",
                wait,
            )
        self._take(state, reserved, now)
        if wait > 0:
            try:
                await clock.sleep(wait)
            except BaseException:
                self._give(state, reserved, clock.monotonic(), request_too=True)
                raise
        if slot_waited or wait > 0:
            waited = clock.monotonic() - started
            state.stats.waits += 1
            state.stats.waited_s += waited
            record_rate_limit_wait(request.model, waited)
        state.stats.calls += 1
        call = request
        if deadline is not None:
            call = replace(request, timeout_s=min(request.timeout_s, max(left - wait, 0.001)))
        try:
            completion = await self._inner.complete(call, deadline)
        except BaseException:
            # Nothing was generated: the completion part of the reservation goes back.
            self._give(state, request.max_tokens, clock.monotonic(), request_too=False)
            raise
        if state.tokens is not None:
            correction = reserved - used_tokens(completion, request)
            state.tokens.give(correction, clock.monotonic())
        return completion

    def _take(self, state: _ModelLimiter, reserved: int, now: float) -> None:
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(reserved, now)

    def _give(self, state: _ModelLimiter, tokens: int, now: float, *, request_too: bool) -> None:
        if request_too and state.requests is not None:
            state.requests.give(1, now)
        if state.tokens is not None:
            state.tokens.give(tokens, now)

    @staticmethod
    def _reject(
        state: _ModelLimiter, model: str, message: str, wait: float | None
    ) -> RateLimitExceeded:
        state.stats.rejected += 1
        record_rate_limit_rejection(model)
        return RateLimitExceeded(model, message, retry_after_s=wait)


_FIELDS = {f.name for f in fields(RateLimit)}


def parse_rate_limits(raw: str | None) -> tuple[dict[str, RateLimit], RateLimit | None]:
    """Parse ``LLMPIPE_MODEL_RATE_LIMITS``: a JSON object of model -> limit fields.

    The key ``"*"`` is the default for models not listed. Unknown fields are an error, so
    a typo (``"rpm"``) fails at start-up instead of silently leaving a model unlimited.
    """
    if raw is None or not raw.strip():
        return {}, None
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"model rate limits are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("model rate limits must be a JSON object of model -> limits")
    limits: dict[str, RateLimit] = {}
    for model, spec in data.items():
        if not isinstance(spec, dict):
            raise ValueError(f"rate limit for {model!r} must be an object")
        unknown = set(spec) - _FIELDS
        if unknown:
            raise ValueError(
                f"rate limit for {model!r} has unknown fields {sorted(unknown)}; "
                f"known: {sorted(_FIELDS)}"
            )
        for name, value in spec.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise ValueError(f"rate limit {model!r}.{name} must be a number")
        if isinstance(spec.get("max_in_flight"), float):
            raise ValueError(f"rate limit {model!r}.max_in_flight must be an integer")
        limits[str(model)] = RateLimit(**spec)
    default = limits.pop(DEFAULT_KEY, None)
    return limits, default
