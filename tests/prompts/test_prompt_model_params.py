"""The model section's request parameters: validated at load, all part of the content hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.prompts import PromptRegistry
from pipeline.prompts.errors import PromptLoadError
from tests.prompts.test_prompts_hashing import EXAMPLES, copy_examples, hashes

TRIAGE_MODEL = "  timeout_s: 15\n"


def _with_model_lines(root: Path, lines: str) -> Path:
    path = root / "ticket_triage" / "v2.yaml"
    text = path.read_text(encoding="utf-8")
    assert TRIAGE_MODEL in text
    path.write_text(text.replace(TRIAGE_MODEL, TRIAGE_MODEL + lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "lines",
    [
        "  seed: 7\n",
        "  stop: ['\\n\\n']\n",
        "  top_p: 0.9\n",
        "  presence_penalty: 0.5\n",
        "  frequency_penalty: 0.5\n",
        "  structured_output: json_object_schema\n",
        "  extra_body: {top_k: 20}\n",
    ],
)
def test_every_request_parameter_changes_the_hash(tmp_path: Path, lines: str) -> None:
    root = copy_examples(tmp_path)
    before = hashes(root)
    _with_model_lines(root, lines)
    after = hashes(root)
    assert after["ticket_triage@2"] != before["ticket_triage@2"]
    assert after["ticket_triage@1"] == before["ticket_triage@1"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("  reasoning_effort: low\n", "reasoning models take no logprobs, temperature"),
        ("  stop: [a, b, c, d, e]\n", "at most 4"),
        ("  top_p: 1.5\n", "less than or equal to 1"),
        ("  extra_body: {seed: 1}\n", "extra_body may not set seed: use its own field"),
        ("  structured_output: xml\n", "json_schema"),
        ("  presence_penalty: 3\n", "less than or equal to 2"),
    ],
)
def test_bad_parameters_fail_the_load_with_a_reason(
    tmp_path: Path, lines: str, message: str
) -> None:
    root = copy_examples(tmp_path)
    _with_model_lines(root, lines)
    with pytest.raises(PromptLoadError, match=message):
        PromptRegistry.load(root)


def test_prompts_check_explains_the_strict_decision() -> None:
    result = CliRunner().invoke(prompts_app, ["check", "--prompts-dir", str(EXAMPLES)])
    assert result.exit_code == 0, result.stderr
    assert (
        "ticket_triage@2: structured_output per endpoint; json_schema would be non-strict: "
        "$.summary uses maxLength; $.summary uses minLength"
    ) in result.stdout
