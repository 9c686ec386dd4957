"""Distribution monitors: a label share that jumps trips within one window; a stable stream
never does; the quality breaker is held open while the shift lasts."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pipeline.observability import semconv as sc
from pipeline.observability.metrics import PipelineMetrics
from pipeline.observability.testing import metric_points
from pipeline.prompts.model import MonitorSpec, PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.resilience.breaker import BreakerState, QualityBreaker
from pipeline.stages.monitor import DistributionMonitor, Observation, Shift, distance

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
LABELS = {"billing": 0.25, "bug": 0.25, "account": 0.2, "feature_request": 0.15, "other": 0.15}
WINDOW = 50


def prompt(version: int = 2, **monitor: Any) -> PromptVersion:
    pv = PromptRegistry.load(PROMPTS).get("ticket_triage", version)
    defaults: dict[str, Any] = {
        "window": WINDOW,
        "fields": ["label"],
        "confidence": False,
        "routes": False,
        "max_shift": 0.35,
        "expected": {"label": LABELS},
    }
    spec = MonitorSpec(**(defaults | monitor))
    return pv.model_copy(update={"confidence": pv.confidence.model_copy(update={"monitor": spec})})


def draw(rng: random.Random, shares: dict[str, float]) -> str:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


def answer(label: str, confidence: float = 0.9, route: str = "result") -> Observation:
    return Observation({"label": label, "priority": "normal"}, confidence, route)


def test_a_jump_to_95_percent_one_label_trips_within_one_window() -> None:
    rng = random.Random(7)
    shifts: list[Shift] = []
    tripped: list[str] = []
    monitor = DistributionMonitor(on_shift=shifts.append, trip=tripped.append)
    pv = prompt()
    for _ in range(200):
        assert monitor.observe(pv, answer(draw(rng, LABELS))) == []
    jumped = {"feature_request": 0.95, "bug": 0.05}
    tripped_after: int | None = None
    for index in range(1, WINDOW + 1):
        if monitor.observe(pv, answer(draw(rng, jumped))):
            tripped_after = index
            break
    assert tripped_after is not None, "95 % feature_request went unnoticed for a whole window"
    assert len(shifts) == 1 and shifts[0].signal == "label" and shifts[0].prompt == pv.ref
    assert shifts[0].distance > 0.35 and shifts[0].baseline_source == "expected"
    assert tripped == [pv.ref]
    # The alert is raised once; the breaker is held open for as long as the shift lasts.
    for _ in range(30):
        assert monitor.observe(pv, answer("feature_request")) == []
    assert len(shifts) == 1 and len(tripped) == 31
    assert monitor.shifted(pv.ref) == {"label"}


def test_a_stable_stream_never_trips() -> None:
    rng = random.Random(11)
    shifts: list[Shift] = []
    monitor = DistributionMonitor(on_shift=shifts.append)
    pv = prompt()
    for _ in range(5000):
        monitor.observe(pv, answer(draw(rng, LABELS)))
    assert shifts == []
    assert 0.0 < monitor.distances(pv.ref)["label"] < 0.35


def test_the_shift_trips_the_quality_breaker_and_recovery_rearms_the_alert() -> None:
    quality = QualityBreaker()
    shifts: list[Shift] = []
    monitor = DistributionMonitor(on_shift=shifts.append, trip=quality.trip)
    pv = prompt()
    balanced = [label for label, share in LABELS.items() for _ in range(round(share * 20))]
    for label in balanced * 3:
        monitor.observe(pv, answer(label))
    assert quality.state(pv.ref) is BreakerState.CLOSED
    for _ in range(WINDOW):
        monitor.observe(pv, answer("feature_request"))
    assert quality.state(pv.ref) is BreakerState.OPEN
    for label in balanced * 3:
        monitor.observe(pv, answer(label))
    assert monitor.shifted(pv.ref) == set()
    for _ in range(WINDOW):
        monitor.observe(pv, answer("bug"))
    assert [s.signal for s in shifts] == ["label", "label"]


def test_confidence_and_route_mix_are_monitored_against_the_previous_version() -> None:
    """No explicit baseline: version 2's window is the baseline of version 3."""
    shifts: list[Shift] = []
    monitor = DistributionMonitor(on_shift=shifts.append)
    spec: dict[str, Any] = {"confidence": True, "routes": True, "baseline": "previous"}
    old = prompt(1, expected={}, **spec)
    new = prompt(2, expected={}, **spec)
    for i in range(WINDOW):
        monitor.observe(old, answer("bug", 0.9, "result" if i % 5 else "review"))
    for i in range(WINDOW):
        monitor.observe(new, answer("bug", 0.9, "result" if i % 5 else "review"))
    assert shifts == []
    for _ in range(WINDOW):
        monitor.observe(new, answer("bug", 0.3, "review"))
    assert {s.signal for s in shifts} == {"confidence", "route"}
    assert all(s.baseline_source == f"window of {old.ref}" for s in shifts)


def test_test_cases_are_a_baseline_and_invalid_answers_count_only_in_the_route_mix() -> None:
    pv = prompt(expected={}, baseline="tests", routes=True)
    monitor = DistributionMonitor()
    for _ in range(WINDOW):
        monitor.observe(pv, Observation(None, None, "fallback"))
    assert "label" not in monitor.distances(pv.ref)
    assert monitor.shifted(pv.ref) == {"route"}  # tests expect half results, half fallbacks


def test_distance_is_total_variation() -> None:
    assert distance({"a": 1.0}, {"b": 1.0}) == 1.0
    assert distance({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert abs(distance({"a": 0.95, "b": 0.05}, {"a": 0.25, "b": 0.75}) - 0.7) < 1e-9


def test_a_shift_raises_one_metric_point_and_one_log_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = InMemoryMetricReader()
    metrics = PipelineMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    monitor = DistributionMonitor(
        on_shift=lambda s: metrics.distribution_shifted(s.prompt, s.signal)
    )
    pv = prompt()
    with caplog.at_level(logging.WARNING, logger="llmpipe.monitor"):
        for _ in range(3 * WINDOW):
            monitor.observe(pv, answer("feature_request"))
    [(labels, point)] = metric_points(reader.get_metrics_data(), sc.DISTRIBUTION_SHIFTS)
    assert point.value == 1
    assert labels == {
        sc.GEN_AI_PROMPT_NAME: "ticket_triage",
        sc.GEN_AI_PROMPT_VERSION: 2,
        sc.MONITOR_SIGNAL: "label",
    }
    [record] = [r for r in caplog.records if r.name == "llmpipe.monitor"]
    assert "ticket_triage@2 label moved" in record.getMessage()
