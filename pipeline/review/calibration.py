"""Calibration you can trust: how often *accepted* answers are wrong, and at which threshold.

Reviewers see low-confidence answers all day, but those say nothing about the answers that
went out unreviewed, which is the number a product owner asks for first. The unbiased
samples of delivered answers are the **audit** items (a hash-chosen share of accepted
answers) and the **burn-in** items (every answer a new version would have delivered). A
reviewer's verdict on one of them is a labelled draw from the accepted population:
approve means it was right, edit, reject or clarify that it was wrong.

From those samples, per prompt version:

* the accepted-error rate with a 95 % Wilson interval (sound at small counts and at zero
  errors, where the normal approximation claims certainty it does not have);
* for every candidate threshold at or above the lowest sampled confidence, the error rate
  of the answers that threshold would accept, with its interval;
* the threshold meeting a target error rate: ``recommended`` is the lowest threshold whose
  *upper* bound meets the target (the safe choice), ``plausible_from`` the lowest whose
  *lower* bound does. The true threshold lies between them unless the data misleads at the
  95 % level; when no threshold's upper bound meets the target, or there are fewer than
  :data:`MIN_SAMPLES` samples, the report says it cannot tell.

The audit samples only contain answers at or above the accept threshold in force when
they were made, so thresholds below it are not assessed here.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Escalation, ReviewDecision
from pipeline.contract.topology import REVIEW, REVIEW_DECISIONS
from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.review.kafka_io import read_to_end
from pipeline.review.model import CalibrationRow
from pipeline.stages.policy import AUDIT, BURN_IN

SAMPLE_REASONS = frozenset({AUDIT, BURN_IN})
"""Review reasons whose items are unbiased samples of delivered answers."""
MIN_SAMPLES = 30
Z_95 = 1.959964
GRID_STEP = 0.01

Verdict = Literal["ok", "too_few_samples", "target_not_met"]


@dataclass(frozen=True)
class Sample:
    """One audited (or burned-in) answer: its confidence and whether a reviewer approved it."""

    version: int
    confidence: float
    correct: bool


def wilson(errors: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for ``errors`` out of ``n``; (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = errors / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def samples_needed(target: float, z: float = Z_95) -> int:
    """Error-free samples before the upper bound can fall to ``target`` (≈ 3.84 / target)."""
    n = 1
    while wilson(0, n, z)[1] > target:
        n += 1
    return n


@dataclass(frozen=True)
class Rate:
    errors: int
    n: int

    @property
    def value(self) -> float | None:
        return self.errors / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.errors, self.n)


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    accepted: Rate
    """Errors among the sampled answers this threshold would accept."""
    coverage: float
    """Share of the sampled answers this threshold would still accept."""


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    mean_confidence: float
    correct: Rate
    """Here ``errors`` counts *correct* answers: the y axis of a reliability diagram."""


@dataclass(frozen=True)
class VersionCalibration:
    prompt: str
    version: int
    current_accept: float | None
    audit_share: float | None
    target: float
    overall: Rate
    thresholds: list[ThresholdRow]
    bins: list[ReliabilityBin]
    recommended: float | None
    plausible_from: float | None
    point: float | None
    """Lowest threshold whose point estimate meets the target."""
    verdict: Verdict

    @property
    def message(self) -> str:
        lo, hi = self.overall.interval
        n = self.overall.n
        if self.verdict == "too_few_samples":
            return (
                f"too few samples to tell: {n} audited answers, need at least {MIN_SAMPLES} "
                f"(and about {samples_needed(self.target)} error-free ones to show an error "
                f"rate below {self.target:.1%})"
            )
        rate = f"accepted-error rate {self.overall.value:.1%} (95% CI {lo:.1%}-{hi:.1%}, n={n})"
        if self.verdict == "target_not_met":
            return (
                f"{rate}; no threshold is known to meet {self.target:.1%}: "
                "audit more answers, or improve the prompt"
            )
        return (
            f"{rate}; threshold for {self.target:.1%}: {self.recommended:.2f} "
            f"(could be as low as {self.plausible_from:.2f}; point estimate {self.point:.2f})"
        )


def shown_rows(report: VersionCalibration, step: float = 0.05) -> list[ThresholdRow]:
    """The rows a table shows: every ``step``, plus the thresholds the report names."""
    named = {report.recommended, report.plausible_from, report.point, report.current_accept}
    every = max(1, round(step / GRID_STEP))
    return [
        row
        for i, row in enumerate(report.thresholds)
        if row.accepted.n and (i % every == 0 or row.threshold in named)
    ]


def calibrate_version(
    prompt: str,
    version: int,
    samples: Sequence[Sample],
    target: float,
    current_accept: float | None = None,
    audit_share: float | None = None,
    bins: int = 10,
) -> VersionCalibration:
    overall = Rate(sum(1 for s in samples if not s.correct), len(samples))
    thresholds = _threshold_rows(samples)

    def lowest(keep: Callable[[ThresholdRow], bool]) -> float | None:
        return next((row.threshold for row in thresholds if keep(row)), None)

    recommended = lowest(lambda r: r.accepted.n > 0 and r.accepted.interval[1] <= target)
    plausible = lowest(lambda r: r.accepted.n > 0 and r.accepted.interval[0] <= target)
    point = lowest(lambda r: r.accepted.value is not None and r.accepted.value <= target)
    verdict: Verdict = "ok"
    if len(samples) < MIN_SAMPLES:
        verdict = "too_few_samples"
    elif recommended is None:
        verdict = "target_not_met"
    return VersionCalibration(
        prompt=prompt,
        version=version,
        current_accept=current_accept,
        audit_share=audit_share,
        target=target,
        overall=overall,
        thresholds=thresholds,
        bins=_reliability(samples, bins),
        recommended=recommended if verdict == "ok" else None,
        plausible_from=plausible if verdict == "ok" else None,
        point=point if verdict == "ok" else None,
        verdict=verdict,
    )


def calibrate(
    prompt: str,
    samples: Iterable[Sample],
    registry: PromptRegistry | None = None,
    target: float = 0.02,
    bins: int = 10,
) -> list[VersionCalibration]:
    """One calibration per prompt version (thresholds are per version), oldest first."""
    by_version: dict[int, list[Sample]] = {}
    for sample in samples:
        by_version.setdefault(sample.version, []).append(sample)
    report = []
    for version in sorted(by_version):
        accept: float | None = None
        share: float | None = None
        if registry is not None:
            try:
                pv = registry.get(prompt, version)
                accept, share = pv.confidence.accept, pv.review.audit.share
            except PromptError:
                pass
        report.append(
            calibrate_version(prompt, version, by_version[version], target, accept, share, bins)
        )
    return report


def _threshold_rows(samples: Sequence[Sample]) -> list[ThresholdRow]:
    if not samples:
        return []
    confidences = sorted(s.confidence for s in samples)
    wrong = sorted(s.confidence for s in samples if not s.correct)
    start = math.floor(confidences[0] / GRID_STEP) * GRID_STEP
    rows: list[ThresholdRow] = []
    for i in range(round((1.0 - start) / GRID_STEP) + 1):
        threshold = round(start + i * GRID_STEP, 4)
        kept = len(confidences) - bisect.bisect_left(confidences, threshold - 1e-9)
        errors = len(wrong) - bisect.bisect_left(wrong, threshold - 1e-9)
        rows.append(ThresholdRow(threshold, Rate(errors, kept), kept / len(confidences)))
    return rows


def _reliability(samples: Sequence[Sample], count: int) -> list[ReliabilityBin]:
    if not samples:
        return []
    low = min(s.confidence for s in samples)
    start = math.floor(low * count) / count
    width = (1.0 - start) / count or 1.0 / count
    grouped: list[list[Sample]] = [[] for _ in range(count)]
    for sample in samples:
        grouped[min(count - 1, int((sample.confidence - start) / width))].append(sample)
    return [
        ReliabilityBin(
            start + i * width,
            start + (i + 1) * width,
            sum(s.confidence for s in group) / len(group),
            Rate(sum(1 for s in group if s.correct), len(group)),
        )
        for i, group in enumerate(grouped)
        if group
    ]


# -- reading the verdicts ------------------------------------------------------------------


def samples_from(items: Iterable[Escalation], decisions: Iterable[ReviewDecision]) -> list[Sample]:
    """Join audit and burn-in items with their decisions (the first of each, by request)."""
    known: dict[str, tuple[int, float]] = {}
    for item in items:
        if item.reason in SAMPLE_REASONS and item.confidence is not None:
            known.setdefault(
                item.validated.request.request_id, (item.validated.prompt.version, item.confidence)
            )
    samples: dict[str, Sample] = {}
    for decision in decisions:
        found = known.get(decision.request_id)
        if found is not None and decision.request_id not in samples:
            samples[decision.request_id] = Sample(found[0], found[1], decision.action == "approve")
    return list(samples.values())


def samples_from_rows(rows: Iterable[CalibrationRow]) -> list[Sample]:
    """The samples among a review database's decided items."""
    return [
        Sample(r.prompt_version, r.confidence, r.action == "approve")
        for r in rows
        if r.reason in SAMPLE_REASONS
    ]


def accepted_error_rates(
    rows_of: Callable[[str], Iterable[CalibrationRow]], prompts: Iterable[str]
) -> dict[tuple[str, int], float]:
    """The point estimate per (prompt, version) with samples: what the metric exports."""
    rates: dict[tuple[str, int], float] = {}
    for prompt in prompts:
        by_version: dict[int, list[Sample]] = {}
        for sample in samples_from_rows(rows_of(prompt)):
            by_version.setdefault(sample.version, []).append(sample)
        for version, samples in by_version.items():
            rates[(prompt, version)] = sum(not s.correct for s in samples) / len(samples)
    return rates


def samples_from_kafka(
    settings: Settings, prompt: str, on_skip: Callable[[str], None] | None = None
) -> list[Sample]:
    """The samples of ``prompt``, straight from ``llm.review`` and ``llm.review.decisions``."""
    codec = Codec()
    items = (
        esc
        for esc, _ in read_to_end(settings, REVIEW, Escalation, codec, on_skip=on_skip)
        if esc.validated.prompt.name == prompt
    )
    decisions = (
        d
        for d, _ in read_to_end(settings, REVIEW_DECISIONS, ReviewDecision, codec, on_skip=on_skip)
    )
    return samples_from(list(items), decisions)


# -- the plots ---------------------------------------------------------------------------


def write_plots(report: VersionCalibration, directory: Path) -> tuple[Path, Path]:
    """A reliability diagram and a threshold curve as PNG; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{report.prompt}-v{report.version}"
    reliability_path = directory / f"{stem}-reliability.png"
    curve_path = directory / f"{stem}-threshold.png"

    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    xs = [b.mean_confidence for b in report.bins]
    ys = [b.correct.value or 0.0 for b in report.bins]
    below = [y - b.correct.interval[0] for y, b in zip(ys, report.bins, strict=True)]
    above = [b.correct.interval[1] - y for y, b in zip(ys, report.bins, strict=True)]
    low = min([*xs, *(y - e for y, e in zip(ys, below, strict=True))], default=0.0)
    edge = max(0.0, math.floor(low * 10) / 10)
    ax.plot([edge, 1], [edge, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.errorbar(xs, ys, yerr=[below, above], fmt="o-", capsize=3, label="observed (95% CI)")
    for x, y, b in zip(xs, ys, report.bins, strict=True):
        ax.annotate(f"n={b.correct.n}", (x, y), textcoords="offset points", xytext=(4, -12))
    ax.set_xlim(edge, 1.0)
    ax.set_ylim(edge, 1.01)
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("share approved by reviewers")
    ax.set_title(f"{report.prompt}@{report.version}: reliability of audited answers")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(reliability_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    rows = [r for r in report.thresholds if r.accepted.n > 0]
    ts = [r.threshold for r in rows]
    rates = [r.accepted.value or 0.0 for r in rows]
    ax.fill_between(
        ts,
        [r.accepted.interval[0] for r in rows],
        [r.accepted.interval[1] for r in rows],
        alpha=0.25,
        label="95% CI",
    )
    ax.errorbar(
        ts,
        rates,
        yerr=[
            [v - r.accepted.interval[0] for v, r in zip(rates, rows, strict=True)],
            [r.accepted.interval[1] - v for v, r in zip(rates, rows, strict=True)],
        ],
        marker=".",
        capsize=2,
        errorevery=max(1, len(rows) // 10),
        label="error rate of accepted answers",
    )
    ax.axhline(report.target, color="red", linestyle="--", label=f"target {report.target:.1%}")
    if report.recommended is not None and report.plausible_from is not None:
        ax.axvspan(report.plausible_from, report.recommended, color="green", alpha=0.12)
        ax.axvline(
            report.recommended,
            color="green",
            label=f"recommended {report.recommended:.2f} (band: plausible range)",
        )
    if report.current_accept is not None:
        ax.axvline(report.current_accept, color="black", linestyle=":", label="current threshold")
    coverage = ax.twinx()
    (kept,) = coverage.plot(
        ts,
        [r.coverage for r in rows],
        color="grey",
        linestyle="-.",
        alpha=0.7,
        label="share still accepted (right axis)",
    )
    coverage.set_ylabel("share of audited answers still accepted", color="grey")
    coverage.set_ylim(0, 1.05)
    ax.set_xlabel("accept threshold")
    ax.set_ylabel("error rate of accepted answers")
    ax.set_ylim(0, max([*(r.accepted.interval[1] for r in rows), report.target * 2], default=1))
    verdict = {"ok": "target met", "too_few_samples": "too few samples to tell"}.get(
        report.verdict, "target not met"
    )
    ax.set_title(f"{report.prompt}@{report.version}: threshold curve ({verdict})")
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, kept], loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(curve_path)
    plt.close(fig)
    return reliability_path, curve_path
