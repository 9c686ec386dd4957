"""Calibration from audit verdicts: intervals, thresholds against a target, and the plots."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.review.calibration import (
    Sample,
    calibrate,
    calibrate_version,
    samples_needed,
    shown_rows,
    wilson,
    write_plots,
)

TRUE_THRESHOLD = 0.9


def synthetic(n: int, seed: int = 7) -> list[Sample]:
    """Confidence uniform on [0.5, 1]; P(wrong | c) = 0.4 (1 - c).

    The error rate of answers accepted at threshold t is then 0.2 (1 - t), so a target of
    2 % is met exactly from t = 0.9 up: the curve the calibration must recover.
    """
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        confidence = rng.uniform(0.5, 1.0)
        samples.append(Sample(3, confidence, rng.random() >= 0.4 * (1 - confidence)))
    return samples


def test_wilson_interval_is_sound_at_the_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(0, 100)
    assert low == 0.0 and 0.03 < high < 0.04  # "no errors seen" is not "no errors"
    low, high = wilson(10, 100)
    assert 0.05 < low < 0.1 < high < 0.18
    assert samples_needed(0.02) in range(185, 192)


def test_a_known_error_curve_gives_back_its_threshold_within_the_interval() -> None:
    """The interval is a 95 % statement, so it is checked as one: over 20 independent
    verdict sets it must contain the true threshold at least 18 times (a fixed seed that
    happens to pass would prove nothing), and it must be narrow enough to act on."""
    reports = [
        calibrate_version("p", 3, synthetic(20_000, seed), target=0.02, current_accept=0.5)
        for seed in range(20)
    ]
    assert all(r.verdict == "ok" for r in reports), [r.message for r in reports]
    covered = [r for r in reports if r.plausible_from <= TRUE_THRESHOLD <= r.recommended]  # type: ignore[operator]
    assert len(covered) >= 18, [r.message for r in reports if r not in covered]
    for report in reports:
        assert report.recommended is not None and report.plausible_from is not None
        assert report.recommended - report.plausible_from < 0.1, report.message
        assert report.point is not None and abs(report.point - TRUE_THRESHOLD) < 0.04
    report = reports[0]
    overall = report.overall.value
    assert overall is not None and abs(overall - 0.1) < 0.01  # 0.2 * (1 - 0.5)
    row = next(r for r in report.thresholds if r.threshold == 0.7)
    assert row.accepted.interval[0] < 0.06 < row.accepted.interval[1]  # 0.2 * (1 - 0.7)
    assert report.thresholds[0].coverage == 1.0
    assert any(r.threshold == report.recommended for r in shown_rows(report))


def test_with_five_samples_it_says_it_cannot_tell() -> None:
    (report,) = calibrate("p", synthetic(5))
    assert report.verdict == "too_few_samples" and report.recommended is None
    assert "too few samples to tell" in report.message and "5 audited" in report.message


def test_an_unreachable_target_is_reported_as_such() -> None:
    always_wrong_half = [Sample(1, 0.8 + i / 1000, i % 2 == 0) for i in range(200)]
    (report,) = calibrate("p", always_wrong_half, target=0.02)
    assert report.verdict == "target_not_met" and "no threshold is known" in report.message


def test_versions_are_calibrated_separately() -> None:
    samples = [*synthetic(100), *(Sample(4, 0.95, True) for _ in range(40))]
    report = calibrate("p", samples)
    assert [(r.version, r.overall.n, r.overall.errors) for r in report][1] == (4, 40, 0)


def test_the_plots_are_written(tmp_path: Path) -> None:
    report = calibrate_version("p", 3, synthetic(3000), target=0.02, current_accept=0.5)
    reliability, curve = write_plots(report, tmp_path)
    for path in (reliability, curve):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
