"""Distribution monitors: notice when a prompt version's answers stop looking like its traffic.

Per-answer confidence cannot see a model that labels *everything* ``feature_request``: each
answer alone is valid, confident and plausible. The shares over many answers can. For each
prompt version that declares ``confidence.monitor``, the monitor keeps a sliding window of
the last ``window`` settled answers and compares, per signal, the window's shares with a
baseline by total variation distance (half the L1 distance: the share of answers that
would have to change category; 0 is identical, 1 disjoint):

* each declared categorical output field (labels, priorities);
* ``confidence``, bucketed (:data:`pipeline.prompts.model.CONFIDENCE_BUCKETS`);
* ``route``, the settle stage's decision (result, review, fallback).

Baselines, in the order the prompt file chooses: explicit ``expected`` shares, the shares
in the prompt's own test cases, or the previous version's current window in this process.
A shift beyond ``max_shift`` raises one :class:`Shift` (the caller records a metric and
logs it once) and, while it lasts, holds the version's quality breaker open, so the model
stage stops trusting the model for that version until the shares come back.

The monitor's window is per process: N settle workers each watch their own share of the
traffic, which is the same distribution, with N windows. Its trip is not: in a worker the
quality breaker is fed through ``llm.fleet`` (:mod:`pipeline.resilience.fleet`), so one
monitor's trip holds the version open on every model-stage worker.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.prompts.model import CONFIDENCE_BUCKETS, MONITOR_ROUTES, MonitorSpec, PromptVersion
from pipeline.stages.parse import field_at

log = logging.getLogger("llmpipe.monitor")

Shares = dict[str, float]


@dataclass(frozen=True)
class Shift:
    """One signal of one prompt version moved beyond its bound."""

    prompt: str
    signal: str
    distance: float
    bound: float
    window: Shares
    baseline: Shares
    baseline_source: str


@dataclass(frozen=True)
class Observation:
    """What the settle stage decided for one answer; ``output`` None when it was invalid."""

    output: Mapping[str, Any] | None
    confidence: float | None
    route: str


def confidence_bucket(confidence: float) -> str:
    for name, upper in CONFIDENCE_BUCKETS:
        if confidence < upper:
            return name
    return CONFIDENCE_BUCKETS[-1][0]


def category(value: Any) -> str | None:
    """A field value as a category name; None for values that are not categorical."""
    if value is None or isinstance(value, bool | str | int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return None


def distance(window: Shares, baseline: Shares) -> float:
    """Total variation distance between two share maps (missing categories count as 0)."""
    keys = set(window) | set(baseline)
    return 0.5 * sum(abs(window.get(k, 0.0) - baseline.get(k, 0.0)) for k in keys)


def shares(values: Sequence[str]) -> Shares:
    counts = Counter(values)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def signal_values(spec: MonitorSpec, observation: Observation) -> dict[str, str]:
    """The category of each signal for one observation (signals that do not apply are absent)."""
    found: dict[str, str] = {}
    if observation.output is not None:
        for path in spec.fields:
            present, value = field_at(observation.output, path)
            name = category(value) if present else None
            if name is not None:
                found[path] = name
    if spec.confidence and observation.confidence is not None:
        found["confidence"] = confidence_bucket(observation.confidence)
    if spec.routes and observation.route in MONITOR_ROUTES:
        found["route"] = observation.route
    return found


def baseline_from_tests(pv: PromptVersion, spec: MonitorSpec) -> dict[str, Shares]:
    """Shares in the prompt's own test cases: fields from ``output_equals``, and routes.

    Test cases describe what the author expects traffic to look like; they are a small
    sample, so a prompt that relies on them should keep ``max_shift`` generous.
    """
    found: dict[str, Shares] = {}
    for path in spec.fields:
        values = [
            name
            for case in pv.tests
            if path in case.expect.output_equals
            and (name := category(case.expect.output_equals[path])) is not None
        ]
        if values:
            found[path] = shares(values)
    if spec.routes:
        routes = [str(c.expect.route) for c in pv.tests if c.expect.route in MONITOR_ROUTES]
        if routes:
            found["route"] = shares(routes)
    return found


@dataclass
class _Watch:
    """One prompt version's window and alert state."""

    pv: PromptVersion
    spec: MonitorSpec
    window: deque[dict[str, str]]
    shifted: set[str] = field(default_factory=set)
    last: dict[str, float] = field(default_factory=dict)
    _tests: dict[str, Shares] | None = None

    def tests_baseline(self) -> dict[str, Shares]:
        if self._tests is None:
            self._tests = baseline_from_tests(self.pv, self.spec)
        return self._tests

    def window_shares(self, signal: str) -> Shares:
        return shares([obs[signal] for obs in self.window if signal in obs])

    def full(self) -> bool:
        return len(self.window) >= self.spec.window


class DistributionMonitor:
    """Sliding-window share monitors for every prompt version that declares one.

    ``on_shift`` is called once per shift (the worker records the metric there);
    ``trip`` is called with the prompt ref for every observation while any of its
    signals is shifted (the worker passes ``QualityBreaker.trip``).
    """

    def __init__(
        self,
        on_shift: Callable[[Shift], None] | None = None,
        trip: Callable[[str], None] | None = None,
    ) -> None:
        self._on_shift = on_shift
        self._trip = trip
        self._watches: dict[str, _Watch] = {}

    def observe(self, pv: PromptVersion, observation: Observation) -> list[Shift]:
        """Add one settled answer; returns the shifts that began with it."""
        spec = pv.confidence.monitor
        if spec is None:
            return []
        watch = self._watches.get(pv.ref)
        if watch is None or watch.pv.content_hash != pv.content_hash:
            watch = _Watch(pv, spec, deque(maxlen=spec.window))
            self._watches[pv.ref] = watch
        watch.window.append(signal_values(spec, observation))
        if not watch.full():
            return []
        began: list[Shift] = []
        for signal in spec.signals():
            baseline, source = self._baseline(watch, signal)
            current = watch.window_shares(signal)
            if baseline is None or not current:
                continue
            moved = round(distance(current, baseline), 6)
            watch.last[signal] = moved
            if moved <= spec.max_shift:
                watch.shifted.discard(signal)
                continue
            if signal not in watch.shifted:
                watch.shifted.add(signal)
                shift = Shift(pv.ref, signal, moved, spec.max_shift, current, baseline, source)
                began.append(shift)
                log.warning(
                    "distribution shift: %s %s moved %.2f from its baseline (%s), bound %.2f",
                    pv.ref,
                    signal,
                    moved,
                    source,
                    spec.max_shift,
                    extra={
                        "prompt": pv.ref,
                        "signal": signal,
                        "distance": moved,
                        "bound": spec.max_shift,
                        "baseline_source": source,
                        "window_shares": {k: round(v, 3) for k, v in current.items()},
                    },
                )
                if self._on_shift is not None:
                    self._on_shift(shift)
        if watch.shifted and spec.trip_breaker and self._trip is not None:
            self._trip(pv.ref)
        return began

    def _baseline(self, watch: _Watch, signal: str) -> tuple[Shares | None, str]:
        spec = watch.spec
        expected = spec.expected.get(signal)
        if expected is not None:
            return dict(expected), "expected"
        if spec.baseline == "tests":
            from_tests = watch.tests_baseline().get(signal)
            if from_tests is not None:
                return from_tests, "tests"
        previous = self._previous(watch.pv)
        if previous is not None and signal in previous.spec.signals():
            return previous.window_shares(signal) or None, f"window of {previous.pv.ref}"
        return None, ""

    def _previous(self, pv: PromptVersion) -> _Watch | None:
        candidates = [
            w
            for w in self._watches.values()
            if w.pv.name == pv.name and w.pv.version < pv.version and w.full()
        ]
        return max(candidates, key=lambda w: w.pv.version, default=None)

    def shifted(self, prompt_ref: str) -> set[str]:
        """The signals of ``prompt_ref`` currently beyond their bound."""
        watch = self._watches.get(prompt_ref)
        return set(watch.shifted) if watch is not None else set()

    def distances(self, prompt_ref: str) -> dict[str, float]:
        """The latest distance of each signal (for reports and gauges)."""
        watch = self._watches.get(prompt_ref)
        return dict(watch.last) if watch is not None else {}
