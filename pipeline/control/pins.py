"""Operator pins on the control topic: build, validate, fold and roll back ``pin:<prompt>`` events.

A pin changes what production answers, so everything that can be checked
is checked *before* an event is written: the versions exist in the registry
and the value forms a coherent :class:`~pipeline.prompts.serving.Pin`. That
matters because a worker that receives an invalid pin logs it and keeps
serving the old one, so a bad pin would otherwise look applied while
changing nothing.

Rollback semantics are "undo": a rollback restores the pin value that was
in force before the current one, and a second rollback steps back once
more, never forward. (A toggle, like ``kubectl rollout undo``, was
rejected: an operator who runs rollback twice because the first seemed
not to work would re-apply the very version being rolled back.) The
history is the control topic's (see ``read_history``); rollback events are
recognised by their reason, which always starts with ``rollback: `` (so
``pin`` refuses reasons with that prefix). When the history holds no
earlier value (never pinned before, or compacted away) the rollback
unpins: value null, so the newest version serves again. A rollback that
would not change which versions serve is refused, as is one for a prompt
that is not pinned: both are almost certainly a mistake made under pressure.

The pure functions here take the history as a list; the CLI reads and
writes Kafka through :mod:`pipeline.control.topic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from pipeline.contract.envelopes import ControlEvent
from pipeline.control.state import ControlState, pin_key
from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.serving import Pin

PinValue = dict[str, Any]
"""``{"version": N, "candidate": M | None, "canary_percent": P}``, as workers read it."""

ROLLBACK_REASON_PREFIX = "rollback: "


class PinError(PromptError):
    """A pin or rollback that must not be written; the message says why and what to do."""


@dataclass(frozen=True)
class Serving:
    """What a prompt serves under a pin value: comparable, and printable for operators."""

    version: int
    candidate: int | None
    percent: float
    pinned: bool

    def describe(self, name: str) -> str:
        base = f"{name}@{self.version}" + ("" if self.pinned else " (newest, unpinned)")
        if self.candidate is not None:
            base += f" + canary @{self.candidate} at {self.percent:g}%"
        return base


@dataclass(frozen=True)
class RollbackPlan:
    """The event value a rollback writes, and the history event it restores (None: unpin)."""

    name: str
    current: PinValue
    value: PinValue | None
    restores: ControlEvent | None


def pin_value(
    registry: PromptRegistry,
    name: str,
    version: int,
    candidate: int | None,
    percent: float | None,
    actor: str,
    reason: str,
    at: datetime,
) -> PinValue:
    """Validate a pin against the registry and the ``Pin`` model; return the event value.

    A canary needs both ``candidate`` and ``percent`` (0 is allowed: it
    stages the candidate without traffic), so a forgotten ``--percent``
    cannot silently mean "no canary".
    """
    if candidate is not None and percent is None:
        raise PinError("--candidate needs --percent (the share of keys the candidate serves)")
    if percent is not None and candidate is None:
        raise PinError("--percent needs --candidate (the version the canary share serves)")
    if not reason.strip():
        raise PinError("--reason must say why (it is recorded with the pin for whoever comes next)")
    if reason.startswith(ROLLBACK_REASON_PREFIX):
        raise PinError(
            f"a pin reason may not start with {ROLLBACK_REASON_PREFIX!r}: that marks rollbacks "
            "(use `llmpipe prompts rollback`)"
        )
    registry.get(name, version)
    if candidate is not None:
        registry.get(name, candidate)
    try:
        Pin(
            name=name,
            version=version,
            candidate=candidate,
            canary_percent=percent or 0.0,
            actor=actor,
            reason=reason,
            at=at,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise PinError(f"invalid pin: {where + ': ' if where else ''}{error['msg']}") from None
    return {"version": version, "candidate": candidate, "canary_percent": float(percent or 0.0)}


def serving(registry: PromptRegistry, name: str, value: PinValue | None) -> Serving:
    if value is None:
        return Serving(registry.get(name).version, None, 0.0, pinned=False)
    candidate = value.get("candidate")
    return Serving(
        int(value["version"]),
        int(candidate) if candidate is not None else None,
        float(value.get("canary_percent") or 0.0),
        pinned=True,
    )


def pin_events(events: Sequence[ControlEvent], name: str | None = None) -> list[ControlEvent]:
    """The pin events (of ``name``, or of every prompt), oldest first."""
    if name is not None:
        return [e for e in events if e.key == pin_key(name)]
    return [e for e in events if e.key.startswith("pin:")]


def plan_rollback(events: Sequence[ControlEvent], name: str) -> RollbackPlan:
    """Find the value to restore for ``name``; raise PinError when there is nothing to undo.

    The pin history is replayed as a stack: a pin pushes, a rollback pops
    back to the entry it restored. The target is the nearest entry below
    the top that serves something different (re-pinning the same value with
    a new reason is not a step worth undoing to). Events with a value
    workers cannot read as a pin are skipped: they never took effect.
    """
    stack: list[ControlEvent] = []
    for event in pin_events(events, name):
        if event.value is not None and not _readable(event.value):
            continue
        if not is_rollback(event):
            stack.append(event)
            continue
        while stack and _normal(stack[-1].value) != _normal(event.value):
            stack.pop()
        if not stack and event.value is not None:  # it restored an entry compacted away
            stack.append(event)
    if not stack or stack[-1].value is None:
        raise PinError(
            f"{name} is not pinned (it serves its newest version): nothing to roll back; "
            f"use `llmpipe prompts pin {name} VERSION` to pin a version"
        )
    current: PinValue = stack[-1].value
    for event in reversed(stack[:-1]):
        if _normal(event.value) != _normal(current):
            return RollbackPlan(name, current, event.value, event)
    return RollbackPlan(name, current, None, None)


def is_rollback(event: ControlEvent) -> bool:
    return event.reason.startswith(ROLLBACK_REASON_PREFIX)


def check_rollback(registry: PromptRegistry, plan: RollbackPlan) -> tuple[Serving, Serving]:
    """Serving before and after; refuse a rollback that changes nothing or names gone versions."""
    before = serving(registry, plan.name, plan.current)
    if plan.value is not None:
        try:
            registry.get(plan.name, int(plan.value["version"]))
            if plan.value.get("candidate") is not None:
                registry.get(plan.name, int(plan.value["candidate"]))
        except PromptError as exc:
            raise PinError(f"cannot restore the previous pin: {exc}") from None
    after = serving(registry, plan.name, plan.value)
    if (before.version, before.candidate, before.percent) == (
        after.version,
        after.candidate,
        after.percent,
    ):
        raise PinError(
            f"rolling back would still serve {after.describe(plan.name)}: the control topic has "
            f"no earlier pin of {plan.name} that serves something else; "
            f"use `llmpipe prompts pin {plan.name} VERSION` to choose a version"
        )
    return before, after


def fold(events: Sequence[ControlEvent]) -> tuple[ControlState, list[ControlEvent]]:
    """Fold events like a worker does, but keep going past bad ones and return them.

    A worker logs and skips an event it cannot apply; a reporting tool must
    not crash on one either, and should show it instead.
    """
    state = ControlState()
    rejected: list[ControlEvent] = []
    for event in events:
        try:
            state.apply(event)
        except (ValueError, ValidationError):
            rejected.append(event)
    return state, rejected


def _readable(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("version"), int)


def _normal(value: PinValue | None) -> tuple[int, int | None, float] | None:
    if value is None:
        return None
    candidate = value.get("candidate")
    return (
        int(value["version"]),
        int(candidate) if candidate is not None else None,
        float(value.get("canary_percent") or 0.0),
    )
