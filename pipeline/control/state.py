"""Live settings from the compacted ``llm.control`` topic: kill switches, flags, prompt pins.

Every worker folds the whole topic into one :class:`ControlState` before it consumes
requests and keeps folding new events while it runs, so a flag flipped by an operator
reaches all workers within seconds and without a restart. The state is plain data; the
Kafka listener that feeds it lives in the transport layer.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from pipeline.contract.envelopes import ControlEvent
from pipeline.errors import did_you_mean
from pipeline.prompts.serving import Pin

GLOBAL_MODEL_CALLS = "model_calls_enabled"
PROMPT_ENABLED = "prompt_enabled"
FORCE_REVIEW = "force_review"
ENDPOINT_ENABLED = "endpoint_enabled"
KNOWN_FLAGS = (GLOBAL_MODEL_CALLS, PROMPT_ENABLED, FORCE_REVIEW, ENDPOINT_ENABLED)
FLAG_DEFAULTS: dict[str, bool] = {
    GLOBAL_MODEL_CALLS: True,
    PROMPT_ENABLED: True,
    FORCE_REVIEW: False,
    ENDPOINT_ENABLED: True,
}


def flag_key(name: str, scope: str | None = None) -> str:
    if name not in FLAG_DEFAULTS:
        close = did_you_mean(name, KNOWN_FLAGS)
        raise ValueError(f"unknown flag {name!r}{close} (known flags: {', '.join(KNOWN_FLAGS)})")
    if name == GLOBAL_MODEL_CALLS and scope:
        raise ValueError(f"{name} is global; it takes no scope")
    if name != GLOBAL_MODEL_CALLS and not scope:
        raise ValueError(f"{name} needs a scope (a prompt name or a model endpoint)")
    return f"flag:{name}:{scope}" if scope else f"flag:{name}"


def pin_key(prompt: str) -> str:
    return f"pin:{prompt}"


class ControlState:
    """The folded control topic. Reads are lock-free snapshots of small dicts."""

    def __init__(self) -> None:
        self._flags: dict[str, bool] = {}
        self._pins: dict[str, Pin] = {}
        self._events: dict[str, ControlEvent] = {}
        self._lock = threading.Lock()
        self.applied = 0

    def apply(self, event: ControlEvent) -> None:
        with self._lock:
            self.applied += 1
            if event.value is None:
                self._events.pop(event.key, None)
                self._flags.pop(event.key, None)
                if event.key.startswith("pin:"):
                    self._pins.pop(event.key[4:], None)
                return
            if event.key.startswith("pin:"):
                # Validate first: a rejected pin must not show up as the current setting.
                self._pins[event.key[4:]] = _pin_from(event.key[4:], event.value, event)
            elif event.key.startswith("flag:"):
                self._flags[event.key] = bool(event.value)
            self._events[event.key] = event

    def flag(self, name: str, scope: str | None = None) -> bool:
        return self._flags.get(flag_key(name, scope), FLAG_DEFAULTS[name])

    def model_calls_enabled(self) -> bool:
        """The global kill switch; endpoint flags are applied by the fallback chain."""
        return self.flag(GLOBAL_MODEL_CALLS)

    @property
    def pins(self) -> Mapping[str, Pin]:
        return dict(self._pins)

    def events(self) -> list[ControlEvent]:
        return sorted(self._events.values(), key=lambda e: e.key)


def _pin_from(prompt: str, value: Any, event: ControlEvent) -> Pin:
    if not isinstance(value, dict) or "version" not in value:
        raise ValueError(f"pin for {prompt} must be an object with a version, got {value!r}")
    return Pin(
        name=prompt,
        version=int(value["version"]),
        candidate=int(value["candidate"]) if value.get("candidate") is not None else None,
        canary_percent=float(value.get("canary_percent") or 0.0),
        actor=event.actor,
        reason=event.reason or "(no reason given)",
        at=event.at,
    )
