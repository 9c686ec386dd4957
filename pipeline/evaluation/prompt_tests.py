"""The prompt test runner behind ``llmpipe prompts test``.

Each test case in a prompt file is a recorded model answer plus what the
pipeline must do with it. The runner sends the case's variables through the
real stage code (:mod:`pipeline.evaluation.harness`), so a case passes only if
production would route and answer the same way: a rule that rejects the
answer, a re-ask that gets the same answer back, a fallback that answers
instead, all happen here as they would on Kafka. That makes the cases a
regression suite for the prompt *and* for the parser, rules and fallbacks it
relies on, runnable offline in CI in well under a second per prompt.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from pipeline.contract.envelopes import Request
from pipeline.evaluation.harness import Outcome, RecordedAnswerClient, StageHarness
from pipeline.prompts.conditions import MISSING as _MISSING
from pipeline.prompts.conditions import field_value, same_json
from pipeline.prompts.model import PromptTestCase, PromptVersion, TestExpectation
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.model_call import CallingClient

_SHOWN_CHARS = 60


@dataclass(frozen=True)
class CaseResult:
    """One test case's verdict with enough context to fix it without re-running it."""

    prompt: str
    case: str
    expected: str
    got: str
    failures: tuple[str, ...]
    outcome: Outcome | None
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str:
        """Why it failed, every mismatch in one line; empty for a pass."""
        return "; ".join(self.failures)

    @property
    def route_reason(self) -> str:
        """The pipeline's own reason for the route (e.g. invalid_output), shown for passes."""
        return (self.outcome.reason or "") if self.outcome is not None else ""


def check_expectation(expect: TestExpectation, outcome: Outcome) -> list[str]:
    """Every way ``outcome`` misses ``expect``, each a sentence that names field and values.

    All mismatches rather than the first, because a wrong route usually
    explains the wrong fields and seeing both saves a round trip.
    """
    failures: list[str] = []
    if expect.route is not None and expect.route != outcome.route:
        why = f" ({_why(outcome)})" if _why(outcome) else ""
        failures.append(f"route: expected {expect.route}, got {outcome.route}{why}")
    output = outcome.checked_output()
    for path, wanted in expect.output_equals.items():
        value = field_value(output, path)
        if value is _MISSING:
            failures.append(f"output.{path}: expected {_show(wanted)}, {_absent(output)}")
        elif not same_json(wanted, value):
            failures.append(f"output.{path}: expected {_show(wanted)}, got {_show(value)}")
    for path, needle in expect.output_contains.items():
        value = field_value(output, path)
        if value is _MISSING:
            failures.append(f"output.{path}: expected to contain {needle!r}, {_absent(output)}")
        elif not isinstance(value, str):
            failures.append(
                f"output.{path}: expected a string containing {needle!r}, got {_show(value)}"
            )
        elif needle not in value:
            failures.append(f"output.{path}: {_show(value)} does not contain {needle!r}")
    for path, pattern in expect.output_matches.items():
        value = field_value(output, path)
        if value is _MISSING:
            failures.append(f"output.{path}: expected to match {pattern!r}, {_absent(output)}")
        elif not isinstance(value, str):
            failures.append(
                f"output.{path}: expected a string matching {pattern!r}, got {_show(value)}"
            )
        elif re.fullmatch(pattern, value) is None:
            failures.append(f"output.{path}: {_show(value)} does not fully match {pattern!r}")
    confidence = outcome.confidence
    for bound, above in ((expect.confidence_above, True), (expect.confidence_below, False)):
        if bound is None:
            continue
        word = "above" if above else "below"
        if confidence is None:
            failures.append(f"confidence: expected {word} {bound}, but the answer was never scored")
        elif (confidence <= bound) if above else (confidence >= bound):
            failures.append(f"confidence: expected {word} {bound}, got {confidence:.3f}")
    return failures


def describe_expectation(expect: TestExpectation) -> str:
    parts: list[str] = [expect.route or "any route"]
    parts += [f"{p}={_show(v, 24)}" for p, v in expect.output_equals.items()]
    parts += [f"{p} ∋ {n!r}" for p, n in expect.output_contains.items()]
    parts += [f"{p} ~ /{r}/" for p, r in expect.output_matches.items()]
    if expect.confidence_above is not None:
        parts.append(f"conf > {expect.confidence_above}")
    if expect.confidence_below is not None:
        parts.append(f"conf < {expect.confidence_below}")
    return "; ".join(parts)


def describe_outcome(outcome: Outcome, expect: TestExpectation) -> str:
    """The route plus the fields the expectation names, so the two columns line up."""
    route: str = outcome.route
    if outcome.status == "needs_clarification":
        route += " (clarification)"
    parts: list[str] = [route]
    output = outcome.checked_output()
    paths = [*expect.output_equals, *expect.output_contains, *expect.output_matches]
    for path in dict.fromkeys(paths):
        value = field_value(output, path)
        parts.append(f"{path}={'(missing)' if value is _MISSING else _show(value, 24)}")
    if outcome.confidence is not None:
        parts.append(f"conf {outcome.confidence:.2f}")
    return "; ".join(parts)


def case_request(prompt: PromptVersion, index: int, case: PromptTestCase) -> Request:
    """The request a caller would send to reproduce this case (an explicit version)."""
    return Request(
        request_id=f"prompt-test:{prompt.ref}:{index}",
        prompt=prompt.name,
        prompt_version=prompt.version,
        variables=case.variables,
        metadata={"prompt_test": case.name[:200]},
    )


async def run_case(
    harness: StageHarness,
    prompt: PromptVersion,
    index: int,
    case: PromptTestCase,
    client: CallingClient | None = None,
) -> CaseResult:
    """Run one case; ``client`` None replays the recorded answer (offline)."""
    started = time.perf_counter()
    expected = describe_expectation(case.expect)
    try:
        outcome = await harness.run(
            case_request(prompt, index, case), client or RecordedAnswerClient(case.model_answer)
        )
    except Exception as exc:  # one broken case must not hide the verdicts of the others
        failure = f"error: {type(exc).__name__}: {exc}"
        return CaseResult(
            prompt.ref, case.name, expected, "error", (failure,), None, _since(started)
        )
    return CaseResult(
        prompt=prompt.ref,
        case=case.name,
        expected=expected,
        got=describe_outcome(outcome, case.expect),
        failures=tuple(check_expectation(case.expect, outcome)),
        outcome=outcome,
        seconds=_since(started),
    )


def selected_versions(
    registry: PromptRegistry, name: str | None = None, version: int | None = None
) -> list[PromptVersion]:
    """Every version (or every version of ``name``, or one version); raises for unknown names."""
    if name is None:
        return list(registry)
    if version is not None:
        return [registry.get(name, version)]
    return registry.versions(name)


async def run_tests(
    registry: PromptRegistry,
    prompts: Iterable[PromptVersion],
    client: CallingClient | None = None,
    timeout_cap_s: float = 30.0,
) -> list[CaseResult]:
    """Run the cases of ``prompts`` in file order, one at a time for a readable, stable report."""
    harness = StageHarness(registry, timeout_cap_s)
    return [
        await run_case(harness, prompt, index, case, client)
        for prompt in prompts
        for index, case in enumerate(prompt.tests)
    ]


@dataclass(frozen=True)
class CaseRate:
    """One case over repeated live runs: how often it ended on its expected route, and
    how often it met every expectation (route, fields, confidence)."""

    prompt: str
    case: str
    expected_route: str
    runs: int
    on_route: int
    passed: int
    routes: tuple[tuple[str, int], ...]

    @property
    def route_rate(self) -> float:
        return self.on_route / self.runs if self.runs else 0.0

    @property
    def pass_rate(self) -> float:
        return self.passed / self.runs if self.runs else 0.0


def case_rates(
    runs: Sequence[Sequence[CaseResult]], prompts: Sequence[PromptVersion]
) -> list[CaseRate]:
    """Fold repeated runs of the same cases into one rate per (prompt version, case)."""
    expected = {(p.ref, c.name): c.expect.route for p in prompts for c in p.tests}
    grouped: dict[tuple[str, str], list[CaseResult]] = {}
    for run in runs:
        for result in run:
            grouped.setdefault((result.prompt, result.case), []).append(result)
    rates = []
    for (ref, case), results in grouped.items():
        route = expected.get((ref, case))
        got = [r.outcome.route if r.outcome is not None else "error" for r in results]
        counts = tuple(sorted(Counter(got).items()))
        rates.append(
            CaseRate(
                prompt=ref,
                case=case,
                expected_route=route or "any",
                runs=len(results),
                on_route=sum(1 for g in got if route is None or g == route),
                passed=sum(1 for r in results if r.passed),
                routes=counts,
            )
        )
    return rates


def rates_table(rates: Sequence[CaseRate], title: str) -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    for column in ("prompt", "case", "expected route", "on route", "passed", "routes seen"):
        table.add_column(column, overflow="fold")
    for r in rates:
        style = "green" if r.on_route == r.runs else "yellow" if r.on_route else "red"
        table.add_row(
            r.prompt,
            r.case,
            r.expected_route,
            Text(f"{r.on_route}/{r.runs} ({r.route_rate:.0%})", style),
            f"{r.passed}/{r.runs}",
            ", ".join(f"{route} {n}" for route, n in r.routes),
        )
    return table


def version_rates(rates: Sequence[CaseRate]) -> dict[str, tuple[float, float]]:
    """Per prompt version: (share of runs on the expected route, share passed), so two
    versions can be compared on the same model."""
    out: dict[str, tuple[float, float]] = {}
    for ref in dict.fromkeys(r.prompt for r in rates):
        mine = [r for r in rates if r.prompt == ref]
        runs = sum(r.runs for r in mine)
        out[ref] = (sum(r.on_route for r in mine) / runs, sum(r.passed for r in mine) / runs)
    return out


def results_table(results: Sequence[CaseResult], title: str) -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("prompt", no_wrap=True)
    table.add_column("case", overflow="fold")
    table.add_column("expected", overflow="fold")
    table.add_column("got", overflow="fold")
    table.add_column("verdict", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for r in results:
        if r.passed:
            verdict, reason = Text("pass", "green"), Text(r.route_reason, "dim")
        else:
            verdict, reason = Text("FAIL", "bold red"), Text(r.reason, "red")
        table.add_row(r.prompt, r.case, r.expected, r.got, verdict, reason)
    return table


def summary_line(results: Sequence[CaseResult]) -> str:
    failed = sum(1 for r in results if not r.passed)
    versions = len({r.prompt for r in results})
    return (
        f"{len(results)} cases in {versions} prompt versions: "
        f"{len(results) - failed} passed, {failed} failed"
    )


def junit_xml(results: Sequence[CaseResult], suite_name: str = "llmpipe prompts") -> bytes:
    """JUnit XML, one ``testsuite`` per prompt version, so CI shows prompts like unit tests."""
    root = ET.Element(
        "testsuites",
        name=suite_name,
        tests=str(len(results)),
        failures=str(sum(1 for r in results if not r.passed)),
        errors="0",
        time=_seconds(sum(r.seconds for r in results)),
    )
    for ref in dict.fromkeys(r.prompt for r in results):
        cases = [r for r in results if r.prompt == ref]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=ref,
            tests=str(len(cases)),
            failures=str(sum(1 for r in cases if not r.passed)),
            errors="0",
            skipped="0",
            time=_seconds(sum(r.seconds for r in cases)),
        )
        name, _, version = ref.partition("@")
        for r in cases:
            testcase = ET.SubElement(
                suite,
                "testcase",
                classname=f"prompts.{name}.v{version}",
                name=r.case,
                time=_seconds(r.seconds),
            )
            if not r.passed:
                failure = ET.SubElement(
                    testcase, "failure", message=r.failures[0], type="ExpectationFailed"
                )
                failure.text = "\n".join(
                    [*r.failures, "", f"expected: {r.expected}", f"got:      {r.got}"]
                )
            elif r.outcome is not None:
                ET.SubElement(testcase, "system-out").text = f"got: {r.got}"
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def write_junit(path: Path, results: Sequence[CaseResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(junit_xml(results))


def _why(outcome: Outcome) -> str:
    parts = [p for p in (outcome.reason, _clip(outcome.detail, 160)) if p]
    return ": ".join(dict.fromkeys(parts))


def _absent(output: dict[str, Any] | None) -> str:
    return "but there is no output" if output is None else "but the field is missing"


def _show(value: Any, limit: int = _SHOWN_CHARS) -> str:
    return _clip(json.dumps(value, ensure_ascii=False), limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _since(started: float) -> float:
    return time.perf_counter() - started


def _seconds(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "0"
