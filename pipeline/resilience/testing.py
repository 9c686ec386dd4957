"""Test doubles for the resilience layers: a hand-driven clock and a scripted model client.

They live in the package (not under ``tests/``) because every stage that wires a layer in
needs the same two things to test it without sleeping: time that moves only when the
test says so, and an inner client that fails exactly when the test says so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError


class ManualClock:
    """A :class:`~pipeline.resilience.base.Clock` that moves only when told to.

    With ``auto_advance=True`` (the default) ``sleep`` moves time forward by its argument
    and returns at once: right for code that sleeps one task at a time. With
    ``auto_advance=False`` sleepers block until :meth:`advance` passes their wake time;
    :meth:`until_sleeping` lets a test wait (on an event, not on time) until the code
    under test is parked in ``sleep``.
    """

    def __init__(self, *, wall_start: float = 1_750_000_000.0, auto_advance: bool = True) -> None:
        self._wall_start = wall_start
        self._elapsed = 0.0
        self.auto_advance = auto_advance
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Condition()

    def monotonic(self) -> float:
        return 1_000.0 + self._elapsed

    def time(self) -> float:
        return self._wall_start + self._elapsed

    def datetime_in(self, seconds: float) -> datetime:
        """A deadline ``seconds`` from now on this clock."""
        return datetime.fromtimestamp(self.time() + seconds, UTC)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._elapsed += seconds
        due = [entry for entry in self._sleepers if entry[0] <= self._elapsed]
        for entry in due:
            self._sleepers.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        if self.auto_advance:
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._elapsed + seconds, waiter)
        async with self._changed:
            self._sleepers.append(entry)
            self._changed.notify_all()
        try:
            await waiter
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    async def until_sleeping(self, count: int) -> None:
        """Return once ``count`` tasks are blocked in :meth:`sleep`."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._sleepers) >= count)


def completion(
    text: str = "{}",
    model: str = "m",
    *,
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    attempts: int = 1,
) -> ChatCompletion:
    return ChatCompletion(
        text=text,
        model=model,
        finish_reason="stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        attempts=attempts,
    )


Handler: TypeAlias = Callable[[ChatRequest], Awaitable[ChatCompletion]]
Step: TypeAlias = ChatCompletion | ModelError | Handler


@dataclass(frozen=True)
class ScriptedCall:
    request: ChatRequest
    deadline: datetime | None
    at: float | None


class ScriptedClient:
    """Answers each call with the next step: a completion, an error to raise, or a handler.

    When the script runs out, ``default`` answers (if given); otherwise the call fails the
    test with an ``AssertionError``. Every call is recorded with the clock's time.
    """

    def __init__(
        self,
        *steps: Step,
        default: Step | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        self._steps: deque[Step] = deque(steps)
        self._default = default
        self._clock = clock
        self.calls: list[ScriptedCall] = []
        self.closed = False

    def push(self, *steps: Step) -> None:
        self._steps.extend(steps)

    @property
    def models(self) -> list[str]:
        return [call.request.model for call in self.calls]

    async def complete(
        self, request: ChatRequest, deadline: datetime | None = None
    ) -> ChatCompletion:
        at = self._clock.monotonic() if self._clock is not None else None
        self.calls.append(ScriptedCall(request, deadline, at))
        if self._steps:
            step = self._steps.popleft()
        elif self._default is not None:
            step = self._default
        else:
            raise AssertionError(f"unscripted call #{len(self.calls)} for {request.model}")
        if isinstance(step, ModelError):
            raise step
        if isinstance(step, ChatCompletion):
            return step
        return await step(request)

    async def aclose(self) -> None:
        self.closed = True


async def echo(request: ChatRequest) -> ChatCompletion:
    """A handler step answering as the requested model (handy for fallback chains)."""
    return completion(model=request.model)
