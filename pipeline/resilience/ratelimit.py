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
    ``max_in_flight`` is a resizable set of call slots per model (:class:`Slots`), taken
    before the buckets (a call holding a slot is the next to go). Waiting for a slot is
    bounded by the same deadline.

Several workers share one provider account
    The numbers configured are account-wide; each worker applies its current *share* of
    them, given by a :class:`ShareSource` (in a worker, :class:`~pipeline.resilience.fleet.
    FleetShares`: computed from the leases every worker renews on ``llm.fleet``, weighted by
    who has load). When the share changes (a worker joined, died or got busy)
    :meth:`RateLimitedClient.rescale` resizes the buckets' rates and bursts and the slots,
    and calls already waiting for their turn are re-timed at the new rate, so neither a
    killed worker's share lies idle nor a new worker's share is spent twice for longer than
    a lease interval. The in-flight cap is split into whole slots that add up to the cap
    (no floor of one per worker: a worker may have none for a while). Configuration comes
    from the environment through :func:`parse_rate_limits`, e.g.::

        LLMPIPE_MODEL_RATE_LIMITS='{"gpt-4o-mini": {"requests_per_minute": 500,
            "tokens_per_minute": 200000, "max_in_flight": 32}, "*": {"requests_per_minute": 60}}'

    Without a share source (a tool, a test) the client has the whole limit. The provider's
    429s (obeyed by the retry layer) stay the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Protocol

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

    def rescale(self, rate_per_s: float, capacity: float, now: float) -> None:
        """A new rate and burst from now on (a share of an account-wide limit changed);
        what was refilled so far stays, up to the new burst."""
        self._refill(now)
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._level = min(self._level, capacity)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate_per_s)
            self._at = now


class Slots:
    """Call slots whose number can change while calls hold and wait for them.

    FIFO: a freed (or newly added) slot goes to the longest waiter. When the capacity
    shrinks below the slots in use, nobody new gets one until enough have been released.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self.used >= self.capacity or bool(self._waiters)

    async def acquire(self) -> None:
        if not self.locked():
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we gave up: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._grant()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


@dataclass(frozen=True)
class Demand:
    """One worker's use of one model's limit over an interval: calls per minute made, and
    whether it had to wait (it would have made more)."""

    calls_per_min: float
    saturated: bool


class ShareSource(Protocol):
    """This worker's current part of account-wide limits (see the module docstring)."""

    def fraction(self, model: str) -> float: ...

    def slots(self, model: str, cap: int) -> int: ...


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
    slots: Slots | None
    fraction: float = 1.0
    stats: RateLimitStats = field(default_factory=RateLimitStats)
    rescaled: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    reported: tuple[int, int, int, float] | None = None
    """(calls, waits, rejected, when) at the last :meth:`RateLimitedClient.demand`."""


def _bucket(
    per_period: float | None, burst: float | None, period_s: float, now: float, fraction: float
) -> TokenBucket | None:
    if per_period is None:
        return None
    capacity = burst if burst is not None else per_period
    return TokenBucket(per_period * fraction / period_s, capacity * fraction, now)


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
        shares: ShareSource | None = None,
    ) -> None:
        self._inner = inner
        self._limits = dict(limits)
        self._default = default
        self._clock = clock
        self._shares = shares
        self._models: dict[str, _ModelLimiter] = {}

    async def aclose(self) -> None:
        await self._inner.aclose()

    def limit_for(self, model: str) -> RateLimit | None:
        return self._limits.get(model, self._default)

    def stats(self) -> dict[str, RateLimitStats]:
        """A copy of the counters per model (only models that have been called)."""
        return {model: replace(state.stats) for model, state in self._models.items()}

    def share(self, model: str) -> tuple[float, int | None]:
        """This worker's part of ``model``'s limit now: the fraction of the per-minute
        numbers and this worker's in-flight slots (None: no cap)."""
        state = self._limiter(model)
        if state is None:
            return 1.0, None
        return state.fraction, state.slots.capacity if state.slots is not None else None

    def demand(self) -> dict[str, Demand]:
        """Per limited model, the calls per minute since the last call of this method and
        whether any call had to wait or was refused meanwhile (or is waiting now)."""
        now = self._clock.monotonic()
        out: dict[str, Demand] = {}
        for model, state in self._models.items():
            stats = state.stats
            calls, waits, rejected, since = state.reported or (0, 0, 0, now)
            elapsed = now - since
            rate = (stats.calls - calls) * 60.0 / elapsed if elapsed > 0 else 0.0
            saturated = stats.waits > waits or stats.rejected > rejected or state.waiting > 0
            out[model] = Demand(rate, saturated)
            state.reported = (stats.calls, stats.waits, stats.rejected, now)
        return out

    def rescale(self) -> None:
        """Apply the share source's current shares; waiting calls are re-timed."""
        if self._shares is None:
            return
        now = self._clock.monotonic()
        for model, state in self._models.items():
            fraction = self._shares.fraction(model)
            limit = state.limit
            slots = self._shares.slots(model, limit.max_in_flight) if limit.max_in_flight else None
            if fraction == state.fraction and (
                state.slots is None or slots == state.slots.capacity
            ):
                continue
            state.fraction = fraction
            for bucket, per_period, burst in (
                (state.requests, limit.requests_per_minute, limit.request_burst),
                (state.tokens, limit.tokens_per_minute, limit.token_burst),
            ):
                if bucket is not None and per_period is not None:
                    capacity = burst if burst is not None else per_period
                    bucket.rescale(per_period * fraction / limit.period_s, capacity * fraction, now)
            if state.slots is not None and slots is not None:
                state.slots.resize(slots)
            state.rescaled.set()
            state.rescaled = asyncio.Event()

    def _limiter(self, model: str) -> _ModelLimiter | None:
        state = self._models.get(model)
        if state is not None:
            return state
        limit = self.limit_for(model)
        if limit is None:
            return None
        now = self._clock.monotonic()
        fraction = self._shares.fraction(model) if self._shares is not None else 1.0
        slots: Slots | None = None
        if limit.max_in_flight:
            cap = limit.max_in_flight
            slots = Slots(self._shares.slots(model, cap) if self._shares is not None else cap)
        state = _ModelLimiter(
            limit=limit,
            requests=_bucket(
                limit.requests_per_minute, limit.request_burst, limit.period_s, now, fraction
            ),
            tokens=_bucket(
                limit.tokens_per_minute, limit.token_burst, limit.period_s, now, fraction
            ),
            slots=slots,
            fraction=fraction,
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
        state.waiting += 1
        try:
            async with asyncio.timeout(bound):
                await state.slots.acquire()
        except TimeoutError:
            raise self._reject(
                state, model, f"no free call slot within {bound:.3g}s", None
            ) from None
        finally:
            state.waiting -= 1
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
        owed = self._take(state, reserved, now)
        if wait > 0:
            try:
                await self._pay(state, request.model, owed, bound - (clock.monotonic() - started))
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

    def _take(self, state: _ModelLimiter, reserved: int, now: float) -> list[list[Any]]:
        """Reserve the call's cost; per bucket, what the reservation owes it (the refill
        it must wait for), as ``[bucket, owed]`` pairs that :meth:`_pay` pays down."""
        owed: list[list[Any]] = []
        for bucket, cost in ((state.requests, 1), (state.tokens, reserved)):
            if bucket is not None:
                deficit = cost - bucket.level(now)
                bucket.take(cost, now)
                if deficit > 0:
                    owed.append([bucket, deficit])
        return owed

    async def _pay(
        self, state: _ModelLimiter, model: str, owed: list[list[Any]], left: float
    ) -> None:
        """Wait until the buckets have refilled what the reservation owes, at whatever rate
        they refill meanwhile: a share that changes re-times the wait (a rescale wakes
        every waiter). A wait that no longer fits in ``left`` is refused."""
        clock = self._clock
        state.waiting += 1
        try:
            while True:
                wait = max((debt / bucket.rate_per_s for bucket, debt in owed), default=0.0)
                if wait <= 1e-9:
                    return
                if wait >= left:
                    raise self._reject(
                        state,
                        model,
                        f"rate limit for {model} now needs a {wait:.3g}s wait, "
                        f"only {max(left, 0.0):.3g}s left",
                        wait,
                    )
                started = clock.monotonic()
                rates = [bucket.rate_per_s for bucket, _ in owed]
                await _sleep_or(clock, wait, state.rescaled)
                elapsed = clock.monotonic() - started
                left -= elapsed
                for pair, rate in zip(owed, rates, strict=True):
                    pair[1] -= elapsed * rate
        finally:
            state.waiting -= 1

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


async def _sleep_or(clock: Clock, seconds: float, event: asyncio.Event) -> None:
    """Sleep ``seconds`` on ``clock``, or less if ``event`` is set meanwhile."""
    woken = asyncio.ensure_future(event.wait())
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        timer.cancel()


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
