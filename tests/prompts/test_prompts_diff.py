"""Diffs are readable, canonical and blind to formatting, like the hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from pipeline.config import REPO_ROOT
from pipeline.prompts import PromptRegistry, canonical_yaml, diff_versions

EXAMPLES = REPO_ROOT / "prompts"


def test_diff_shows_behaviour_changes_line_by_line() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    text = diff_versions(registry.get("ticket_triage", 1), registry.get("ticket_triage", 2))
    lines = text.splitlines()
    assert lines[0] == f"--- ticket_triage@1 ({EXAMPLES / 'ticket_triage' / 'v1.yaml'})"
    assert lines[1] == f"+++ ticket_triage@2 ({EXAMPLES / 'ticket_triage' / 'v2.yaml'})"
    assert "-  logprobs: false" in lines and "+  logprobs: true" in lines
    assert "+  - rules.py:urgent_needs_evidence" in lines
    assert "-  accept: 0.7" in lines and "+  accept: 0.75" in lines
    assert "+- role: assistant" in lines
    assert '+    Customer tier: {{ customer_tier | default("free") }}' in lines
    assert not any("tests" in line or "model_answer" in line for line in lines)


def test_identical_versions_have_an_empty_diff() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("cited_answer", 2)
    assert diff_versions(prompt, prompt) == ""


def test_canonical_yaml_sections_and_round_trip() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("invoice_extract", 2)
    text = canonical_yaml(prompt)
    data = yaml.safe_load(text)
    assert list(data) == [
        "description",
        "model",
        "messages",
        "input_schema",
        "output_schema",
        "rules",
        "confidence",
        "fallback",
        "reask",
        "code_files",
    ]
    assert data["messages"][0]["content"] == prompt.messages[0].content
    assert data["output_schema"] == prompt.output_schema
    assert "content: |" in text


def test_reformatting_produces_no_diff(tmp_path: Path) -> None:
    root = tmp_path / "prompts"
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "cited_answer" / "v1.yaml"
    document = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(document, sort_keys=True, width=60), "utf-8")
    before = PromptRegistry.load(EXAMPLES).get("cited_answer", 1)
    after = PromptRegistry.load(root).get("cited_answer", 1)
    assert canonical_yaml(after) == canonical_yaml(before)
    assert after.content_hash == before.content_hash
