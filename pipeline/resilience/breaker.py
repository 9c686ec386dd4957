"""Circuit breakers: stop calling a model endpoint (or trusting a prompt) that keeps failing.

Why: when an endpoint is down, every call to it burns a connection, a timeout and the
request's deadline before failing, and the retries of all in-flight requests pile load
onto an endpoint that is trying to recover. An open circuit fails those calls in
microseconds, so the fallback chain moves straight to the next model, and after a pause a
few probe calls find out whether the endpoint is back.

The machine (one :class:`CircuitBreaker` per model endpoint, or per prompt version)::

    closed --(failure rate >= threshold over the window, with >= min_calls)--> open
    open --(open_s elapsed)--> half_open
    half_open --(half_open_calls probes all succeed)--> closed
    half_open --(any probe fails)--> open   (the open interval starts again)

The window is the last ``window_size`` outcomes, optionally also limited to the last
``window_s`` seconds (so a quiet endpoint does not stay "90% failed" for hours on the
strength of ten old calls). ``min_calls`` keeps one unlucky call from opening a circuit
on a fresh or quiet window.

Each permit carries the *generation* of the state it was granted in: a slow call that
started while closed and ends after the circuit opened (or half-opened) is ignored, so
stale outcomes can neither re-open a recovering circuit nor close a broken one.

What counts as an endpoint failure (:func:`endpoint_failure`): timeouts, connection
errors, 5xx and 429 (a flood of 429s means "go elsewhere" as surely as a 500). A 4xx
``client_error`` or an unparseable body is the request's problem, not the endpoint's,
and counts as a success (the endpoint answered); output quality has its own breaker,
:class:`QualityBreaker`. Local rejections (our own rate limiter, budget) are neutral:
no call reached the endpoint.

:class:`BreakerClient` also tells waiters when something changed (:meth:`BreakerClient.
wait_for_change`): a state transition or a probe slot handed back. That is what lets a
request held by :class:`~pipeline.resilience.breaker_wait.BreakerWaitClient` go the
moment a probe closes the circuit, instead of polling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.base import SYSTEM_CLOCK, Clock, LayerClient
from pipeline.resilience.errors import CircuitOpen, LocalRejection

log = logging.getLogger("pipeline.resilience.breaker")

ENDPOINT_FAILURE_KINDS: frozenset[str] = frozenset(
    {"timeout", "connection", "server_error", "rate_limited"}
)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[[str, BreakerState, BreakerState], None]
"""Called as ``listener(name, old_state, new_state)`` on every transition."""


@dataclass(frozen=True)
class BreakerConfig:
    """Tuning for one breaker; the defaults suit a model endpoint under steady traffic."""

    window_size: int = 20
    window_s: float | None = None
    failure_rate: float = 0.5
    min_calls: int = 10
    open_s: float = 30.0
    half_open_calls: int = 1
    probe_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError("window_size must be at least 1")
        if not 1 <= self.min_calls <= self.window_size:
            raise ValueError("min_calls must be within 1..window_size")
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be within (0, 1]")
        for name in ("window_s", "open_s", "probe_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number")
        if self.half_open_calls < 1:
            raise ValueError("half_open_calls must be at least 1")

    @property
    def probe_expiry_s(self) -> float:
        """After this a granted probe that never reported back frees its slot."""
        return self.probe_timeout_s if self.probe_timeout_s is not None else self.open_s


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; hand it back with :meth:`CircuitBreaker.record`."""

    id: int
    generation: int
    probe: bool


@dataclass(frozen=True)
class BreakerSnapshot:
    state: BreakerState
    calls: int
    failures: int
    opened_at: float | None


_ids = itertools.count(1)


class CircuitBreaker:
    """One closed/open/half-open machine. Pure: no I/O, time from the injected clock.

    Not thread-safe by design: it lives on one event loop, where every method runs
    without interruption.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._listener = on_state_change
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._window: deque[tuple[float, bool]] = deque(maxlen=self.config.window_size)
        self._opened_at: float | None = None
        self._probes: dict[int, float] = {}
        self._probe_successes = 0

    # -- reading -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        self._maybe_half_open()
        return self._state

    def allows(self) -> bool:
        """Would :meth:`acquire` grant a permit now? (No slot is taken.)"""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        self._expire_probes()
        return len(self._probes) + self._probe_successes < self.config.half_open_calls

    def retry_after_s(self) -> float | None:
        """Seconds until an open circuit half-opens (None unless open)."""
        if self.state is not BreakerState.OPEN or self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self.config.open_s - self._clock.monotonic())

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        self._prune()
        return BreakerSnapshot(
            state=state,
            calls=len(self._window),
            failures=sum(1 for _, failed in self._window if failed),
            opened_at=self._opened_at,
        )

    # -- calls ---------------------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit to call, or None when the circuit is open or all probe slots are taken."""
        if not self.allows():
            return None
        probe = self._state is BreakerState.HALF_OPEN
        permit = Permit(next(_ids), self._generation, probe)
        if probe:
            self._probes[permit.id] = self._clock.monotonic()
        return permit

    def record(self, permit: Permit | None, failed: bool) -> None:
        """Report a call's outcome.

        Without a permit the outcome applies to the current state (used for outcomes that
        are observed rather than gated, like output quality): while half-open it settles
        the oldest outstanding probe.
        """
        self._maybe_half_open()
        if permit is not None and permit.generation != self._generation:
            return
        if self._state is BreakerState.CLOSED:
            self._window.append((self._clock.monotonic(), failed))
            self._prune()
            if self._should_open():
                self._open()
        elif self._state is BreakerState.HALF_OPEN:
            self._settle_probe(permit)
            if failed:
                self._open()
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_calls:
                self._close()

    def trip(self) -> None:
        """Open now, whatever the window says: an outside signal (a distribution shift of
        the outputs) says what this circuit guards is bad. While already open, the open
        period restarts, so repeated trips hold the circuit open."""
        self._maybe_half_open()
        if self._state is BreakerState.OPEN:
            self._opened_at = self._clock.monotonic()
        else:
            self._open()

    def close(self) -> None:
        """Close now: an outside signal (another worker's probe succeeded) says what this
        circuit guards is healthy again. A closed circuit stays as it is."""
        self._maybe_half_open()
        if self._state is not BreakerState.CLOSED:
            self._close()

    def release(self, permit: Permit | None) -> None:
        """Hand back a permit whose call did not reach the endpoint (neutral outcome)."""
        if permit is not None and permit.generation == self._generation:
            self._probes.pop(permit.id, None)

    # -- transitions ---------------------------------------------------------------------

    def _should_open(self) -> bool:
        calls = len(self._window)
        if calls < self.config.min_calls:
            return False
        failures = sum(1 for _, failed in self._window if failed)
        return failures / calls >= self.config.failure_rate

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self._transition(BreakerState.OPEN)

    def _close(self) -> None:
        self._opened_at = None
        self._transition(BreakerState.CLOSED)

    def _maybe_half_open(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and self._clock.monotonic() >= self._opened_at + self.config.open_s
        ):
            self._transition(BreakerState.HALF_OPEN)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._window.clear()
        self._probes.clear()
        self._probe_successes = 0
        if self._listener is not None and old is not new:
            try:
                self._listener(self.name, old, new)
            except Exception:
                # A metrics or logging bug must never change how calls are routed.
                log.exception("breaker %s: state listener failed", self.name)

    def _prune(self) -> None:
        if self.config.window_s is None:
            return
        horizon = self._clock.monotonic() - self.config.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _expire_probes(self) -> None:
        horizon = self._clock.monotonic() - self.config.probe_expiry_s
        for permit_id, granted in list(self._probes.items()):
            if granted <= horizon:
                del self._probes[permit_id]

    def _settle_probe(self, permit: Permit | None) -> None:
        if permit is not None:
            self._probes.pop(permit.id, None)
        elif self._probes:
            del self._probes[next(iter(self._probes))]


def endpoint_failure(exc: ModelError) -> bool:
    """Does this error say the endpoint is unhealthy? (see the module docstring)"""
    return not isinstance(exc, LocalRejection) and exc.kind in ENDPOINT_FAILURE_KINDS


class BreakerClient:
    """A circuit breaker per ``request.model`` around the layer below.

    While a model's circuit is open, calls raise :class:`CircuitOpen` (kind
    ``unavailable``, not retryable) without touching the layer below; its
    ``retry_after_s`` says when the circuit will half-open (None while half-open with
    every probe slot taken: then only the probe's outcome says).
    """

    def __init__(
        self,
        inner: LayerClient,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateListener | None = None,
        is_failure: Callable[[ModelError], bool] = endpoint_failure,
    ) -> None:
        self._inner = inner
        self._config = config or BreakerConfig()
        self._clock = clock
        self._listener = on_state_change
        self._is_failure = is_failure
        self._breakers: dict[str, CircuitBreaker] = {}
        self._changed = asyncio.Event()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def breaker(self, model: str) -> CircuitBreaker:
        found = self._breakers.get(model)
        if found is None:
            found = CircuitBreaker(
                model, self._config, clock=self._clock, on_state_change=self._on_change
            )
            self._breakers[model] = found
        return found

    def allows(self, model: str) -> bool:
        """Would a call to ``model`` go through now? The fallback chain skips it if not."""
        return self.breaker(model).allows()

    def refusal(self, model: str) -> CircuitOpen | None:
        """The error a call to ``model`` would get now, or None when it would go through."""
        breaker = self.breaker(model)
        if breaker.allows():
            return None
        return CircuitOpen(model, retry_after_s=breaker.retry_after_s())

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return after a breaker changed state or freed a probe slot, or after ``timeout_s``.

        Time-driven changes (open -> half-open) happen lazily, when a state is read, so
        no event announces them: a waiter bounds ``timeout_s`` by :meth:`CircuitBreaker.
        retry_after_s` itself. The timeout runs on the injected clock.
        """
        changed = asyncio.ensure_future(self._changed.wait())
        timer = asyncio.ensure_future(self._clock.sleep(max(0.0, timeout_s)))
        try:
            await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            timer.cancel()

    def _on_change(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self._wake()
        if self._listener is not None:
            self._listener(name, old, new)

    def _wake(self) -> None:
        """Wake every current waiter; later waiters wait for the next change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def states(self) -> dict[str, BreakerState]:
        return {model: b.state for model, b in self._breakers.items()}

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        breaker = self.breaker(request.model)
        permit = breaker.acquire()
        if permit is None:
            raise CircuitOpen(request.model, retry_after_s=breaker.retry_after_s())
        try:
            completion = await self._inner.complete(request, deadline)
        except LocalRejection:
            self._release(breaker, permit)
            raise
        except ModelError as exc:
            breaker.record(permit, failed=self._is_failure(exc))
            raise
        except BaseException:
            # Cancelled, or a bug below: says nothing about the endpoint's health.
            self._release(breaker, permit)
            raise
        breaker.record(permit, failed=False)
        return completion

    def _release(self, breaker: CircuitBreaker, permit: Permit) -> None:
        breaker.release(permit)
        if permit.probe:
            self._wake()  # a probe slot is free again: a held request may take it


QUALITY_DEFAULTS = BreakerConfig(
    window_size=50, min_calls=20, failure_rate=0.5, open_s=300.0, half_open_calls=5
)
"""Quality needs a bigger sample than availability: some invalid outputs are normal."""


class QualityBreaker:
    """The same machine over output quality, one breaker per prompt version.

    ``record(prompt_ref, ok=False)`` for invalid output or low confidence; while a prompt
    version's circuit is open :meth:`allow` says no, and the caller routes its outputs to
    review (or the fallback) instead of trusting them. Pass ``PromptRef.ref``
    (``name@version``) so a new version starts with a clean record.

    Unlike endpoint calls, outputs are evaluated whether or not they were allowed, so
    every recorded outcome counts (a failure while half-open re-opens the circuit;
    successes close it once there have been ``half_open_calls`` of them). While open,
    outcomes are ignored until ``open_s`` has passed.
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateListener | None = None,
    ) -> None:
        self._config = config or QUALITY_DEFAULTS
        self._clock = clock
        self._listener = on_state_change
        self._breakers: dict[str, CircuitBreaker] = {}

    def _breaker(self, prompt_ref: str) -> CircuitBreaker:
        found = self._breakers.get(prompt_ref)
        if found is None:
            found = CircuitBreaker(
                prompt_ref, self._config, clock=self._clock, on_state_change=self._listener
            )
            self._breakers[prompt_ref] = found
        return found

    def allow(self, prompt_ref: str) -> bool:
        """True to trust this prompt version's output; while half-open it takes a probe."""
        return self._breaker(prompt_ref).acquire() is not None

    def record(self, prompt_ref: str, ok: bool) -> None:
        self._breaker(prompt_ref).record(None, failed=not ok)

    def trip(self, prompt_ref: str) -> None:
        """Open this prompt version's circuit now (see :meth:`CircuitBreaker.trip`)."""
        self._breaker(prompt_ref).trip()

    def state(self, prompt_ref: str) -> BreakerState:
        return self._breaker(prompt_ref).state

    def states(self) -> dict[str, BreakerState]:
        return {ref: b.state for ref, b in self._breakers.items()}
