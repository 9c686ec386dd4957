"""``llmpipe prompts test --live``: a version's cases against a real endpoint, repeated."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import REPO_ROOT
from pipeline.harness.fakellm import running_fake_llm

EXAMPLES = str(REPO_ROOT / "prompts")


def test_live_runs_repeat_every_case_and_report_route_rates_per_version() -> None:
    with running_fake_llm() as fake:
        result = CliRunner().invoke(
            prompts_app,
            [
                "test",
                "ticket_triage",
                "--live",
                "--endpoint",
                fake.url,
                "--repeat",
                "2",
                "--min-rate",
                "0",
                "--prompts-dir",
                EXAMPLES,
            ],
        )
        calls = fake.counters()["total_calls"]
    assert result.exit_code == 0, result.output
    for version in (1, 2):
        assert re.search(
            rf"ticket_triage@{version}: on expected route \d+%, passed \d+%", result.stdout
        )
    assert "2 runs per case" in result.stdout and "/2 (" in result.stdout
    assert calls >= 2 * 8  # two runs of 4 cases in each of two versions, re-asks on top


def test_live_fails_below_the_minimum_pass_rate_and_misuse_is_refused() -> None:
    with running_fake_llm(default_behavior="refusal") as fake:
        result = CliRunner().invoke(
            prompts_app,
            [
                "test",
                "ticket_triage",
                "--version",
                "2",
                "--live",
                "--endpoint",
                fake.url,
                "--prompts-dir",
                EXAMPLES,
            ],
        )
    assert result.exit_code == 1
    assert "below --min-rate 1" in result.stderr
    misuse = CliRunner().invoke(prompts_app, ["test", "--repeat", "3", "--prompts-dir", EXAMPLES])
    assert misuse.exit_code == 2 and "need --live" in misuse.stderr
