"""The release lock: append-only, and check catches edited or deleted released versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from pipeline.prompts import (
    LOCK_FILE_NAME,
    LockFileError,
    PromptRegistry,
    check,
    lock,
    read_lock,
)

EXAMPLES = REPO_ROOT / "prompts"


def copy_examples(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_committed_lock_matches_the_examples() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    assert check(registry, EXAMPLES / LOCK_FILE_NAME) == []
    assert set(read_lock(EXAMPLES / LOCK_FILE_NAME)) == {p.ref for p in registry}


def test_lock_from_scratch_then_nothing_new(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    lock_path = root / LOCK_FILE_NAME
    lock_path.unlink()
    registry = PromptRegistry.load(root)
    assert [v.kind for v in check(registry, lock_path)] == ["unlocked"] * len(list(registry))
    assert lock(registry, lock_path) == [p.ref for p in registry]
    assert check(registry, lock_path) == []
    content = lock_path.read_text()
    assert lock(registry, lock_path) == []
    assert lock_path.read_text() == content


def test_lock_file_is_sorted_by_name_then_number(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    for version in range(4, 12):
        source = (root / "cited_answer" / "v2.yaml").read_text()
        (root / "cited_answer" / f"v{version}.yaml").write_text(
            source.replace("version: 2", f"version: {version}"), "utf-8"
        )
    lock(PromptRegistry.load(root), root / LOCK_FILE_NAME)
    keys = [
        line.split(":")[0]
        for line in (root / LOCK_FILE_NAME).read_text().splitlines()
        if not line.startswith("#")
    ]
    assert keys[:11] == [f"cited_answer@{n}" for n in range(1, 12)]
    assert keys == sorted(keys, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))


def test_editing_a_released_version_fails_check_and_lock_does_not_hide_it(
    tmp_path: Path,
) -> None:
    root = copy_examples(tmp_path)
    lock_path = root / LOCK_FILE_NAME
    released = read_lock(lock_path)
    path = root / "ticket_triage" / "v2.yaml"
    path.write_text(path.read_text().replace("accept: 0.75", "accept: 0.8"), "utf-8")
    registry = PromptRegistry.load(root)

    violations = check(registry, lock_path)
    assert [(v.ref, v.kind, v.severity) for v in violations] == [
        ("ticket_triage@2", "changed", "error")
    ]
    assert str(path) in violations[0].message
    assert "rules.py" in violations[0].message

    assert lock(registry, lock_path) == []
    assert read_lock(lock_path) == released
    assert [v.kind for v in check(registry, lock_path)] == ["changed"]


def test_editing_shared_rules_code_fails_check_for_each_user(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    rules = root / "cited_answer" / "rules.py"
    rules.write_text(rules.read_text().replace("_MIN_OVERLAP = 2", "_MIN_OVERLAP = 1"), "utf-8")
    violations = check(PromptRegistry.load(root), root / LOCK_FILE_NAME)
    assert [(v.ref, v.kind) for v in violations] == [
        ("cited_answer@1", "changed"),
        ("cited_answer@2", "changed"),
        ("cited_answer@3", "changed"),
        ("cited_answer@4", "changed"),
    ]


def test_a_new_version_is_a_warning_until_locked(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    lock_path = root / LOCK_FILE_NAME
    source = (root / "ticket_triage" / "v2.yaml").read_text()
    new = root / "ticket_triage" / "v9.yaml"
    new.write_text(
        source.replace("version: 2", "version: 9").replace("accept: 0.75", "accept: 0.8"),
        "utf-8",
    )
    registry = PromptRegistry.load(root)
    violations = check(registry, lock_path)
    assert [(v.ref, v.kind, v.severity) for v in violations] == [
        ("ticket_triage@9", "unlocked", "warning")
    ]
    assert str(new) in str(violations[0])
    assert lock(registry, lock_path) == ["ticket_triage@9"]
    assert check(registry, lock_path) == []


def test_deleting_a_released_version_fails_check(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    (root / "invoice_extract" / "v1.yaml").unlink()
    violations = check(PromptRegistry.load(root), root / LOCK_FILE_NAME)
    assert [(v.ref, v.kind) for v in violations] == [("invoice_extract@1", "deleted")]
    assert str(root / "invoice_extract" / "v1.yaml") in violations[0].message


def test_deleting_a_whole_prompt_fails_check(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    shutil.rmtree(root / "cited_answer")
    violations = check(PromptRegistry.load(root), root / LOCK_FILE_NAME)
    assert [(v.ref, v.kind) for v in violations] == [
        ("cited_answer@1", "deleted"),
        ("cited_answer@2", "deleted"),
        ("cited_answer@3", "deleted"),
        ("cited_answer@4", "deleted"),
    ]


def test_errors_are_listed_before_warnings(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    source = (root / "cited_answer" / "v2.yaml").read_text()
    (root / "cited_answer" / "v9.yaml").write_text(source.replace("version: 2", "version: 9"))
    (root / "ticket_triage" / "v1.yaml").unlink()
    kinds = [v.kind for v in check(PromptRegistry.load(root), root / LOCK_FILE_NAME)]
    assert kinds == ["deleted", "unlocked"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a@1: [", "not valid YAML"),
        ("- a\n", "must be a mapping"),
        ('"Bad Name@1": "sha256:' + "0" * 64 + '"\n', "is not a name@version key"),
        ("a@0: x\n", "is not a name@version key"),
        ("a@1: md5:abc\n", "is not a sha256:<hex> hash"),
    ],
)
def test_malformed_lock_file_is_a_typed_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / LOCK_FILE_NAME
    path.write_text(text, "utf-8")
    with pytest.raises(LockFileError, match=message):
        read_lock(path)


def test_missing_or_empty_lock_is_empty(tmp_path: Path) -> None:
    assert read_lock(tmp_path / LOCK_FILE_NAME) == {}
    (tmp_path / LOCK_FILE_NAME).write_text("# nothing released yet\n", "utf-8")
    assert read_lock(tmp_path / LOCK_FILE_NAME) == {}
