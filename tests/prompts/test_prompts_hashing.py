"""Content hashes: blind to formatting, sensitive to anything that changes behaviour."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.prompts import PromptRegistry
from pipeline.prompts.hashing import canonical_json, content_hash

EXAMPLES = REPO_ROOT / "prompts"


def copy_examples(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def hashes(root: Path) -> dict[str, str]:
    return {prompt.ref: prompt.content_hash for prompt in PromptRegistry.load(root)}


def test_hash_is_independent_of_location(tmp_path: Path) -> None:
    assert hashes(copy_examples(tmp_path)) == hashes(EXAMPLES)


def test_comments_quoting_and_key_order_do_not_change_the_hash(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    before = hashes(root)
    path = root / "ticket_triage" / "v1.yaml"
    text = path.read_text(encoding="utf-8")
    reformatted = (
        "# a new comment at the top\n"
        + text.replace("reask: 1\n", "")
        .replace("version: 1\n", "version: 1   # trailing comment\n")
        .replace("  temperature: 0\n", "  temperature:    0\n")
        .replace("  policy: review", "  policy: 'review'")
        .replace("max_length: {summary: 200}", "max_length:\n    summary: 200")
        + "\nreask: 1\n"
    )
    assert reformatted != text
    path.write_text(reformatted, encoding="utf-8")
    assert hashes(root) == before


def test_changing_a_value_changes_only_that_versions_hash(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    before = hashes(root)
    path = root / "ticket_triage" / "v1.yaml"
    path.write_text(path.read_text().replace("accept: 0.7", "accept: 0.71"), "utf-8")
    after = hashes(root)
    assert after["ticket_triage@1"] != before["ticket_triage@1"]
    assert {k: v for k, v in after.items() if k != "ticket_triage@1"} == {
        k: v for k, v in before.items() if k != "ticket_triage@1"
    }


def test_editing_a_referenced_rules_file_changes_every_version_using_it(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    before = hashes(root)
    rules = root / "invoice_extract" / "rules.py"
    rules.write_text(rules.read_text() + "\n# a comment is still a code change\n", "utf-8")
    after = hashes(root)
    changed = {ref for ref in before if before[ref] != after[ref]}
    assert changed == {f"invoice_extract@{v}" for v in (1, 2, 3, 4)}


def test_unreferenced_files_do_not_change_the_hash(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    before = hashes(root)
    (root / "invoice_extract" / "README.md").write_text("notes", "utf-8")
    (root / "invoice_extract" / "helpers.py").write_text("X = 1", "utf-8")
    assert hashes(root) == before


def test_code_files_record_each_files_digest() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("cited_answer", 2)
    assert list(prompt.code_files) == ["rules.py"]
    assert prompt.code_files["rules.py"].startswith("sha256:")


def test_canonical_json_is_compact_sorted_utf8() -> None:
    assert canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'.encode()


def test_file_boundaries_are_unambiguous() -> None:
    canonical = b"{}"
    assert content_hash(canonical, {"a.py": b"xy"}) != content_hash(canonical, {"a.p": b"yxy"})
    assert content_hash(canonical, {}) != content_hash(canonical, {"a.py": b""})
