"""Hold a request while every model it may use has an open circuit, instead of failing it.

Why: when the only endpoints a prompt may use are all refused by their breakers, failing
the request at once sends it to the fallback path in microseconds, and the next one, and
the next: a 30-second outage drains the whole backlog into fallback answers. Holding the
request keeps its in-flight slot, so once every slot is held the stage stops fetching and
the backlog stays in Kafka until the endpoint is back (back-pressure, like a waiting rate
limit).

A held request tries its chain again as soon as one of its models would take a call:

* an open circuit half-opens after its open interval (``retry_after_s``): one waiter
  takes the probe, the others wait for its outcome;
* the probe's outcome is announced by :meth:`BreakerClient.wait_for_change`, so when it
  closes the circuit every held request goes at once, and when it fails they wait for the
  next half-open.

It gives up, re-raising the chain's last error (the fallback path then says why), when
``wait_s`` has passed since it first met the closed door, when the request's deadline
has, or when ``may_wait()`` says no (the kill switch: switched-off model calls must not
keep requests parked). Those are checked at least every ``poll_s``.

It waits only for breakers: a request is held when the chain's error is ``unavailable``
and every *enabled* model of the chain is refused by its breaker right now. A model
failure (a 500 after the retries), a disabled endpoint or a local rate limit passes
through unchanged, exactly as without this layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from pipeline.llm.protocol import CallRecord, ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.base import SYSTEM_CLOCK, Clock, remaining_s
from pipeline.resilience.breaker import BreakerClient
from pipeline.resilience.fallback_models import FallbackChainClient

POLL_S = 1.0
"""Longest a held request goes without re-checking the kill switch and its bounds."""


class BreakerWaitClient:
    """The fallback chain, with requests held (bounded) while all its circuits are open.

    ``outcomes`` counts held requests by how their wait ended: ``answered`` (a model
    answered after the wait), ``failed`` (the retried chain failed another way), and
    ``gave_up`` (a bound passed with the circuits still open); ``held`` is how many
    requests are waiting right now.
    """

    def __init__(
        self,
        chain: FallbackChainClient,
        breakers: BreakerClient,
        *,
        wait_s: float,
        is_enabled: Callable[[str], bool] | None = None,
        may_wait: Callable[[], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        poll_s: float = POLL_S,
    ) -> None:
        if wait_s < 0 or poll_s <= 0:
            raise ValueError("wait_s must be >= 0 and poll_s > 0")
        self._chain = chain
        self._breakers = breakers
        self._wait_s = wait_s
        self._is_enabled = is_enabled
        self._may_wait = may_wait
        self._clock = clock
        self._poll_s = poll_s
        self.outcomes: Counter[str] = Counter()
        self.held = 0

    async def aclose(self) -> None:
        await self._chain.aclose()

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        names = self._chain.chain_for(request, models)
        give_up_at: float | None = None  # set when the request is first held
        attempts = 0
        # Calls made while held; the skips of each re-check would repeat once a second.
        made: list[CallRecord] = []
        while True:
            try:
                answer = await self._chain.complete(request, deadline, models=names)
            except ModelError as exc:
                attempts += exc.attempts
                exc.attempts = attempts
                exc.calls = (*made, *exc.calls)
                made = [c for c in exc.calls if c.attempt > 0]
                if not self._held_by_breakers(exc, names):
                    if give_up_at is not None:
                        self.outcomes["failed"] += 1
                    raise
                now = self._clock.monotonic()
                give_up_at = now + self._wait_s if give_up_at is None else give_up_at
                left = give_up_at - now
                until_deadline = remaining_s(deadline, self._clock)
                if until_deadline is not None:
                    left = min(left, until_deadline)
                if left <= 0 or (self._may_wait is not None and not self._may_wait()):
                    self.outcomes["gave_up"] += 1
                    raise
            else:
                if give_up_at is not None:
                    self.outcomes["answered"] += 1
                if not attempts and not made:
                    return answer  # answered without being held: nothing to add
                return replace(
                    answer, attempts=attempts + answer.attempts, calls=(*made, *answer.calls)
                )
            self.held += 1
            try:
                await self._breakers.wait_for_change(min(left, self._poll_s, self._probe_in(names)))
            finally:
                self.held -= 1

    def _enabled(self, names: Sequence[str]) -> list[str]:
        return [m for m in names if self._is_enabled is None or self._is_enabled(m)]

    def _held_by_breakers(self, exc: ModelError, names: Sequence[str]) -> bool:
        if self._wait_s == 0 or exc.kind != "unavailable":
            return False  # waiting is off (the layer is transparent), or not a breaker's no
        enabled = self._enabled(names)
        return bool(enabled) and not any(self._breakers.allows(m) for m in enabled)

    def _probe_in(self, names: Sequence[str]) -> float:
        """Seconds until the first of the chain's open circuits half-opens (inf if none)."""
        waits = [
            wait
            for m in self._enabled(names)
            if (wait := self._breakers.breaker(m).retry_after_s()) is not None
        ]
        return min(waits, default=float("inf"))
