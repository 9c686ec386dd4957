"""``llmpipe prompts eval``: accept thresholds and component weights from labelled evidence.

A labelled dataset (JSONL, one case a line: ``variables`` plus the ``expected`` fields) goes
through the real stages (:mod:`pipeline.evaluation.harness`) against a live endpoint, once
per prompt version as declared and once with its confidence components switched off (the
baseline). The baseline replays the model answers of the first run wherever the request is
the same and deterministic (temperature 0), so the two runs differ only in confidence and
routing, and the comparison costs one set of calls, not two.

Each run records, per case, what the settle stage saw: whether the answer was valid, its
confidence components, and what the fallback would deliver. Routing is then replayed for
every accept threshold and weight setting without another call, which gives, per version and
threshold:

* **coverage**: the share of cases answered by the model (accepted);
* **accepted error**: the share of accepted answers with a wrong expected field;
* **delivered error**: the same over everything delivered (model and fallback answers);
* **review share**: the share left to a person (review, or a clarifying question);
* each component's **contribution**: what switching it off alone changes, and how many wrong
  answers it alone stopped (catches) or right answers it alone held back (false alarms).

The replay is checked against the pipeline: at the declared threshold and weights it must
route every case as the stages did (review-policy rules excepted, which the replay does
not model); disagreements are reported, never hidden. ``suggest`` searches weights and
thresholds for the lowest review share whose delivered error meets a target.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.contract.envelopes import Escalation, Request, Result
from pipeline.evaluation.harness import Outcome, RecordedAnswerClient, StageHarness
from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.model_call import CallingClient
from pipeline.stages.monitor import DistributionMonitor, Shift
from pipeline.stages.parse import field_at
from pipeline.stages.policy import ASKED_BACK
from pipeline.stages.score import SECOND_OPINIONS, combine, same_value, weights_of

WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0)
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
REPORTED_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


class DatasetError(ValueError):
    """A dataset line that cannot be evaluated; names the file and line."""


@dataclass(frozen=True)
class LabelledCase:
    """One labelled request: its variables, the fields a right answer has, optional tags.

    ``expected`` fields must equal (as :func:`pipeline.stages.score.same_value` compares);
    ``contains`` fields must contain the text (normalised); ``model_answer`` is a recorded
    answer for offline runs.
    """

    id: str
    variables: dict[str, Any]
    expected: dict[str, Any]
    contains: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    model_answer: str | None = None


def load_dataset(path: Path) -> list[LabelledCase]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    cases: list[LabelledCase] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object")
        unknown = sorted(
            set(row) - {"id", "variables", "expected", "contains", "tags"} - {"model_answer"}
        )
        if unknown:
            raise DatasetError(f"{where}: unknown keys {', '.join(unknown)}")
        variables, expected = row.get("variables"), row.get("expected", {})
        contains, tags = row.get("contains", {}), row.get("tags", [])
        case_id = str(row.get("id", number))
        if not isinstance(variables, dict):
            raise DatasetError(f"{where}: 'variables' must be an object")
        if not isinstance(expected, dict) or not isinstance(contains, dict):
            raise DatasetError(f"{where}: 'expected' and 'contains' must be objects")
        if not expected and not contains:
            raise DatasetError(f"{where}: a case needs 'expected' or 'contains' fields")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DatasetError(f"{where}: 'tags' must be a list of strings")
        answer = row.get("model_answer")
        if answer is not None and not isinstance(answer, str):
            raise DatasetError(f"{where}: 'model_answer' must be a string")
        if case_id in seen:
            raise DatasetError(f"{where}: duplicate id {case_id!r}")
        seen.add(case_id)
        contains = {k: str(v) for k, v in contains.items()}
        cases.append(LabelledCase(case_id, variables, expected, contains, tuple(tags), answer))
    if not cases:
        raise DatasetError(f"{path}: no cases")
    return cases


def is_right(case: LabelledCase, output: Mapping[str, Any] | None) -> bool:
    if output is None:
        return False
    for path, wanted in case.expected.items():
        found, value = field_at(output, path)
        if not found or not same_value(value, wanted):
            return False
    for path, needle in case.contains.items():
        found, value = field_at(output, path)
        if not found or not isinstance(value, str) or needle.casefold() not in value.casefold():
            return False
    return True


@dataclass(frozen=True)
class CaseRun:
    """One case through the stages: the pipeline's outcome and what settle saw."""

    case: LabelledCase
    outcome: Outcome
    valid: bool
    """The model's answer passed every check (it was scored)."""
    answer: dict[str, Any] | None
    components: dict[str, float]
    fallback: dict[str, Any] | None
    """What the fallback delivers for this case; None sends it to review."""
    asks_back: bool = False


@dataclass(frozen=True)
class Variant:
    """One prompt version as run: declared (components on) or its baseline (off)."""

    pv: PromptVersion
    label: str
    runs: list[CaseRun]

    @property
    def declared_weights(self) -> dict[str, float]:
        return weights_of(self.pv.confidence)

    def components(self) -> list[str]:
        declared = [n for n in SECOND_OPINIONS if getattr(self.pv.confidence.components, n)]
        if self.pv.confidence.self_check_spec is not None:
            declared.append("self_check")
        return declared


@dataclass(frozen=True)
class Metrics:
    cases: int
    accepted: int
    accepted_wrong: int
    delivered: int
    delivered_wrong: int
    reviewed: int
    fallback: int

    @property
    def coverage(self) -> float:
        return self.accepted / self.cases if self.cases else 0.0

    @property
    def accepted_error(self) -> float:
        return self.accepted_wrong / self.accepted if self.accepted else 0.0

    @property
    def delivered_error(self) -> float:
        return self.delivered_wrong / self.delivered if self.delivered else 0.0

    @property
    def review_share(self) -> float:
        return self.reviewed / self.cases if self.cases else 0.0

    def row(self) -> dict[str, float | int]:
        return {
            "cases": self.cases,
            "delivered": self.delivered,
            "coverage": round(self.coverage, 4),
            "accepted_error": round(self.accepted_error, 4),
            "delivered_error": round(self.delivered_error, 4),
            "review_share": round(self.review_share, 4),
            "fallback_share": round(self.fallback / self.cases, 4) if self.cases else 0.0,
        }


def route_of(run: CaseRun, policy: str, threshold: float, weights: Mapping[str, float]) -> str:
    """Where the stages would send this case at ``threshold`` with ``weights``:
    "accepted", "fallback" (delivered by the fallback) or "review"."""
    if not run.valid:
        return "fallback" if run.fallback is not None else "review"
    if run.asks_back or combine(run.components, weights) >= threshold:
        return "accepted"
    if policy == "fallback" and run.fallback is not None:
        return "fallback"
    return "review"


def metrics(
    runs: Sequence[CaseRun], policy: str, threshold: float, weights: Mapping[str, float]
) -> Metrics:
    accepted = accepted_wrong = delivered_wrong = reviewed = fallback = 0
    for run in runs:
        route = route_of(run, policy, threshold, weights)
        if route == "accepted":
            accepted += 1
            wrong = not is_right(run.case, run.answer)
            accepted_wrong += wrong
            delivered_wrong += wrong
        elif route == "fallback":
            fallback += 1
            delivered_wrong += not is_right(run.case, run.fallback)
        else:
            reviewed += 1
    return Metrics(
        len(runs),
        accepted,
        accepted_wrong,
        accepted + fallback,
        delivered_wrong,
        reviewed,
        fallback,
    )


@dataclass(frozen=True)
class Contribution:
    """What one component does at the declared threshold, by switching it off alone."""

    component: str
    weight: float
    without: Metrics
    catches: int
    """Wrong model answers that only this component kept from being accepted."""
    false_alarms: int
    """Right model answers that only this component kept from being accepted."""
    present: int
    """Cases where the component had something to say."""
    mean: float | None


def contributions(variant: Variant, threshold: float) -> list[Contribution]:
    weights = variant.declared_weights
    found: list[Contribution] = []
    for name in variant.components():
        without = {**weights, name: 0.0}
        catches = false_alarms = 0
        values = [r.components[name] for r in variant.runs if name in r.components]
        for run in variant.runs:
            if not run.valid or run.asks_back:
                continue
            rejected_with = combine(run.components, weights) < threshold
            rejected_without = combine(run.components, without) < threshold
            if rejected_with and not rejected_without:
                if is_right(run.case, run.answer):
                    false_alarms += 1
                else:
                    catches += 1
        found.append(
            Contribution(
                name,
                weights.get(name, 1.0),
                metrics(variant.runs, variant.pv.confidence.policy, threshold, without),
                catches,
                false_alarms,
                len(values),
                round(sum(values) / len(values), 4) if values else None,
            )
        )
    return found


@dataclass(frozen=True)
class Suggestion:
    threshold: float
    weights: dict[str, float]
    metrics: Metrics
    meets_target: bool


def suggest(variant: Variant, target: float) -> Suggestion:
    """The weights and threshold with the lowest review share whose delivered error is at
    most ``target`` (ties: higher coverage, then higher threshold, then the declared
    weights); when nothing meets it, the lowest delivered error found."""
    names = variant.components()
    base = variant.declared_weights
    policy = variant.pv.confidence.policy
    best: tuple[tuple[float, ...], Suggestion] | None = None
    for combo in itertools.product(WEIGHT_GRID, repeat=len(names)):
        weights = {**base, **dict(zip(names, combo, strict=True))}
        distance = sum(abs(weights[n] - base.get(n, 1.0)) for n in names)
        for threshold in THRESHOLD_GRID:
            m = metrics(variant.runs, policy, threshold, weights)
            meets = m.delivered_error <= target
            key = (
                (0.0, m.review_share, -m.coverage, -threshold, distance)
                if meets
                else (1.0, m.delivered_error, m.review_share, -threshold, distance)
            )
            if best is None or key < best[0]:
                best = (key, Suggestion(threshold, weights, m, meets))
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class Mismatch:
    case: str
    pipeline: str
    replay: str


def replay_mismatches(variant: Variant) -> list[Mismatch]:
    """Cases the replay routes differently from the stages at the declared settings."""
    found: list[Mismatch] = []
    accept = variant.pv.confidence.accept
    for run in variant.runs:
        replayed = route_of(run, variant.pv.confidence.policy, accept, variant.declared_weights)
        actual = {"result": "accepted", "fallback": "fallback"}.get(run.outcome.route, "review")
        if run.outcome.reason == "low_confidence" and run.outcome.route == "result":
            actual = "review"  # policy clarify: the customer is asked instead of answered
        if run.outcome.route == "dead_letter" or replayed == actual:
            continue
        if run.outcome.reason in ("high_risk", "burn_in", "force_review"):
            continue  # review policy, not confidence: the replay does not model it
        found.append(Mismatch(run.case.id, actual, replayed))
    return found


# -- running --------------------------------------------------------------------------


class ReplayingClient:
    """Calls through once per distinct deterministic request; repeats get the same answer.

    The baseline run asks the stages the same questions as the declared run; at
    temperature 0 an identical request has one answer, so paying for it twice measures
    nothing but the server's determinism. Sampled requests (temperature > 0) always call.
    """

    def __init__(self, inner: CallingClient) -> None:
        self._inner = inner
        self._answers: dict[str, ChatCompletion] = {}
        self.calls = 0
        self.replayed = 0

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        key = None
        if request.temperature == 0:
            key = json.dumps([dataclasses.asdict(request), prompt, list(models or [])], default=str)
            known = self._answers.get(key)
            if known is not None:
                self.replayed += 1
                return known
        self.calls += 1
        answer = await self._inner.complete(request, deadline, prompt=prompt, models=models)
        if key is not None:
            self._answers[key] = answer
        return answer


def _case_run(
    registry: PromptRegistry, pv: PromptVersion, case: LabelledCase, outcome: Outcome
) -> CaseRun:
    settled = outcome.settled
    scored = settled is not None and settled.confidence is not None
    components = settled.validation.confidence_components if settled is not None else {}
    answer: dict[str, Any] | None = None
    asks_back = False
    if isinstance(settled, Result) and settled.source == "model":
        # Only the model's own question is its answer; a question sent because confidence
        # was low (policy clarify) is a routing decision the replay must make again.
        asks_back = settled.reason == ASKED_BACK
        clarifying = settled.status == "needs_clarification"
        answer = outcome.answer if clarifying else settled.output
    elif isinstance(settled, Escalation) and scored:
        answer = settled.output
    try:
        fallback = registry.resolve_fallback(pv)(case.variables)
    except Exception:  # a crashing rule sends the request to review, as the worker does
        fallback = None
    return CaseRun(case, outcome, scored, answer, dict(components), fallback, asks_back)


async def run_variant(
    registry: PromptRegistry,
    pv: PromptVersion,
    label: str,
    cases: Sequence[LabelledCase],
    client: CallingClient | None,
    timeout_cap_s: float = 30.0,
    monitor: DistributionMonitor | None = None,
) -> Variant:
    """Every case through the stages with ``pv`` standing in for its loaded version.

    ``client`` None replays each case's recorded ``model_answer`` (offline).
    """
    variant_registry = registry.replacing(pv)
    harness = StageHarness(variant_registry, timeout_cap_s, monitor)
    runs: list[CaseRun] = []
    for index, case in enumerate(cases):
        request = Request(
            request_id=f"prompt-eval:{pv.ref}:{label}:{index}",
            prompt=pv.name,
            prompt_version=pv.version,
            variables=case.variables,
            metadata={"prompt_eval": case.id[:200]},
        )
        if client is None:
            if case.model_answer is None:
                raise DatasetError(f"case {case.id!r} has no model_answer; run with --live")
            case_client: CallingClient = RecordedAnswerClient(case.model_answer)
        else:
            case_client = client
        outcome = await harness.run(request, case_client)
        runs.append(_case_run(variant_registry, pv, case, outcome))
    return Variant(pv, label, runs)


@dataclass
class Evaluation:
    prompt: str
    variants: list[Variant]
    shifts: list[Shift]
    distances: dict[str, dict[str, float]]
    calls: int = 0
    replayed: int = 0


async def evaluate(
    registry: PromptRegistry,
    versions: Iterable[PromptVersion],
    cases: Sequence[LabelledCase],
    client: CallingClient | None,
    timeout_cap_s: float = 30.0,
    baseline: bool = True,
) -> Evaluation:
    """Each version as declared and, when it declares components, its baseline without.

    The distribution monitor watches the declared runs (the baseline would double-count
    the same answers), as it would in production.
    """
    shifts: list[Shift] = []
    monitor = DistributionMonitor(on_shift=shifts.append)
    replaying = ReplayingClient(client) if client is not None else None
    variants: list[Variant] = []
    versions = list(versions)
    for pv in versions:
        variants.append(
            await run_variant(registry, pv, "declared", cases, replaying, timeout_cap_s, monitor)
        )
        if baseline and variants[-1].components():
            off = pv.model_copy(update={"confidence": pv.confidence.without_components()})
            variants.append(
                await run_variant(registry, off, "components off", cases, replaying, timeout_cap_s)
            )
    return Evaluation(
        prompt=versions[0].name if versions else "",
        variants=variants,
        shifts=shifts,
        distances={pv.ref: monitor.distances(pv.ref) for pv in versions},
        calls=replaying.calls if replaying else 0,
        replayed=replaying.replayed if replaying else 0,
    )


# -- reporting ------------------------------------------------------------------------


def report(evaluation: Evaluation, target: float) -> dict[str, Any]:
    """Everything the table, the JSON file and the curve show, as plain data."""
    versions: list[dict[str, Any]] = []
    for variant in evaluation.variants:
        policy = variant.pv.confidence.policy
        weights = variant.declared_weights
        accept = variant.pv.confidence.accept
        thresholds = sorted({*REPORTED_THRESHOLDS, accept})
        entry: dict[str, Any] = {
            "version": variant.pv.ref,
            "variant": variant.label,
            "policy": policy,
            "accept": accept,
            "weights": weights,
            "declared": metrics(variant.runs, policy, accept, weights).row(),
            "thresholds": [
                {"threshold": t, **metrics(variant.runs, policy, t, weights).row()}
                for t in thresholds
            ],
            "curve": [
                {"threshold": t, **metrics(variant.runs, policy, t, weights).row()}
                for t in THRESHOLD_GRID
            ],
            "contributions": [
                {
                    "component": c.component,
                    "weight": c.weight,
                    "present": c.present,
                    "mean": c.mean,
                    "catches": c.catches,
                    "false_alarms": c.false_alarms,
                    "without": c.without.row(),
                }
                for c in contributions(variant, accept)
            ],
            "mismatches": [dataclasses.asdict(m) for m in replay_mismatches(variant)],
            "cases": [case_row(run, policy, accept, weights) for run in variant.runs],
        }
        if variant.components():
            s = suggest(variant, target)
            entry["suggestion"] = {
                "target": target,
                "threshold": s.threshold,
                "weights": s.weights,
                "meets_target": s.meets_target,
                **s.metrics.row(),
            }
        versions.append(entry)
    return {
        "prompt": evaluation.prompt,
        "cases": len(evaluation.variants[0].runs) if evaluation.variants else 0,
        "model_calls": evaluation.calls,
        "replayed_calls": evaluation.replayed,
        "versions": versions,
        "monitor": {
            "shifts": [
                {
                    "prompt": s.prompt,
                    "signal": s.signal,
                    "distance": s.distance,
                    "bound": s.bound,
                    "baseline": s.baseline_source,
                    "window": {k: round(v, 3) for k, v in s.window.items()},
                }
                for s in evaluation.shifts
            ],
            "distances": evaluation.distances,
        },
    }


def case_row(
    run: CaseRun, policy: str, threshold: float, weights: Mapping[str, float]
) -> dict[str, Any]:
    """One case as the declared settings route it: enough to see why it went where."""
    route = route_of(run, policy, threshold, weights)
    delivered = run.answer if route == "accepted" else run.fallback if route == "fallback" else None
    return {
        "id": run.case.id,
        "tags": list(run.case.tags),
        "route": route,
        "right": None if route == "review" else is_right(run.case, delivered),
        "model_right": is_right(run.case, run.answer) if run.valid else None,
        "confidence": combine(run.components, weights) if run.valid else None,
        "components": run.components,
    }


def markdown(data: Mapping[str, Any]) -> str:
    lines = [
        f"# prompts eval: {data['prompt']} ({data['cases']} cases, "
        f"{data['model_calls']} model calls, {data['replayed_calls']} replayed)",
        "",
        "| version | variant | accept | coverage | accepted error | delivered error "
        "| review share | fallback share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in data["versions"]:
        for row in v["thresholds"]:
            mark = " (declared)" if row["threshold"] == v["accept"] else ""
            lines.append(
                f"| {v['version']} | {v['variant']} | {row['threshold']:g}{mark} "
                f"| {row['coverage']:.0%} | {row['accepted_error']:.0%} "
                f"| {row['delivered_error']:.0%} | {row['review_share']:.0%} "
                f"| {row['fallback_share']:.0%} |"
            )
    for v in data["versions"]:
        if not v["contributions"]:
            continue
        lines += [
            "",
            f"## {v['version']} ({v['variant']}): components at accept {v['accept']:g}",
            "",
            "| component | weight | present | mean | catches | false alarms "
            "| delivered error without | review share without |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in v["contributions"]:
            mean = "-" if c["mean"] is None else f"{c['mean']:.2f}"
            lines.append(
                f"| {c['component']} | {c['weight']:g} | {c['present']} | {mean} "
                f"| {c['catches']} | {c['false_alarms']} "
                f"| {c['without']['delivered_error']:.0%} | {c['without']['review_share']:.0%} |"
            )
        if "suggestion" in v:
            s = v["suggestion"]
            verdict = "meets" if s["meets_target"] else "does NOT meet"
            weights = ", ".join(f"{k}={w:g}" for k, w in sorted(s["weights"].items()))
            lines += [
                "",
                f"Suggested for delivered error <= {s['target']:g} ({verdict} it): "
                f"accept {s['threshold']:g}, weights {weights}: coverage {s['coverage']:.0%}, "
                f"delivered error {s['delivered_error']:.0%}, review share "
                f"{s['review_share']:.0%}.",
            ]
        if v["mismatches"]:
            lines.append(
                f"\nReplay differs from the stages on {len(v['mismatches'])} cases: "
                + ", ".join(m["case"] for m in v["mismatches"])
            )
    monitor = data["monitor"]
    lines += ["", "## Distribution monitor"]
    if monitor["shifts"]:
        for s in monitor["shifts"]:
            lines.append(
                f"- {s['prompt']} {s['signal']}: distance {s['distance']:.2f} > {s['bound']:g} "
                f"(baseline: {s['baseline']}; window {s['window']})"
            )
    else:
        lines.append("- no shift beyond the declared bounds")
    for ref, distances in monitor["distances"].items():
        if distances:
            shown = ", ".join(f"{k} {d:.2f}" for k, d in sorted(distances.items()))
            lines.append(f"- {ref} latest distances: {shown}")
    return "\n".join(lines) + "\n"


def plot(data: Mapping[str, Any], path: Path) -> None:
    """Coverage against accepted error (one point per threshold) and the delivered error and
    review share against the threshold, for every variant; needs matplotlib (dev extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for v in data["versions"]:
        name = f"{v['version']} {v['variant']}"
        curve = v["curve"]
        left.plot(
            [p["coverage"] for p in curve], [p["accepted_error"] for p in curve], "o-", label=name
        )
        thresholds = [p["threshold"] for p in curve]
        # Nothing delivered has no error rate: a gap, not a misleading 0.
        errors = [p["delivered_error"] if p["delivered"] else math.nan for p in curve]
        (line,) = right.plot(thresholds, errors, "-", label=f"{name}: delivered error")
        right.plot(
            thresholds,
            [p["review_share"] for p in curve],
            "--",
            color=line.get_color(),
            label=f"{name}: review share",
        )
    left.set_xlabel("coverage (share accepted from the model)")
    left.set_ylabel("accepted error")
    left.set_title("coverage / error (one point per accept threshold)")
    right.set_xlabel("accept threshold")
    right.set_ylabel("share")
    right.set_title("delivered error and review share")
    for axes in (left, right):
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
    left.set_xlim(-0.02, 1.02)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.suptitle(f"llmpipe prompts eval: {data['prompt']} ({data['cases']} cases)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(data: Mapping[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "eval.json", out_dir / "eval.md", out_dir / "curve.png"]
    written[0].write_text(json.dumps(data, indent=2) + "\n")
    written[1].write_text(markdown(data))
    plot(data, written[2])
    return written
