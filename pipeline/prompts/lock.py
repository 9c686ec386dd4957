"""``prompts/prompts.lock``: the content hash of every released prompt version.

A version in the lock is released: results in Kafka, audit records and
canary comparisons refer to ``name@version`` and must keep meaning the same
thing, so a released version may never change. ``lock`` therefore only ever
appends, and ``check`` (run in CI) fails when a released file, or a rules file
it references, was edited or deleted. Changing behaviour means adding
``v<N+1>.yaml`` and locking it.

The file is YAML, one ``name@version: "sha256:..."`` line per version,
ordered by name then version number, so review diffs are one line per release.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from pipeline.prompts.errors import LockFileError
from pipeline.prompts.registry import PromptRegistry

LOCK_FILE_NAME = "prompts.lock"

_KEY = re.compile(r"([a-z][a-z0-9_]*)@([1-9][0-9]*)")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_HEADER = """\
# Content hashes of released prompt versions (name@version: hash).
# Appended to by `llmpipe prompts lock`; an existing entry is never rewritten.
# `llmpipe prompts check` fails when a released version's YAML or rules code changes:
# add a new version instead of editing a released one.
"""


@dataclass(frozen=True, slots=True)
class LockViolation:
    """One discrepancy between the registry and the lock; "unlocked" is only a warning."""

    ref: str
    kind: Literal["changed", "deleted", "unlocked"]
    message: str

    @property
    def severity(self) -> Literal["error", "warning"]:
        return "warning" if self.kind == "unlocked" else "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


def read_lock(path: Path) -> dict[str, str]:
    """The lock's entries; a missing file is an empty lock (nothing released yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LockFileError(f"{path}: cannot read lock file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LockFileError(f"{path}: lock file is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LockFileError(f"{path}: lock file must be a mapping of name@version to hash")
    for key, value in data.items():
        if not (isinstance(key, str) and _KEY.fullmatch(key)):
            raise LockFileError(f"{path}: {key!r} is not a name@version key")
        if not (isinstance(value, str) and _HASH.fullmatch(value)):
            raise LockFileError(f"{path}: {key}: {value!r} is not a sha256:<hex> hash")
    return dict(data)


def lock(registry: PromptRegistry, path: Path) -> list[str]:
    """Add every version not yet in the lock; return the refs added, in lock order."""
    entries = read_lock(path)
    added = [prompt.ref for prompt in registry if prompt.ref not in entries]
    if not added:
        return []
    for prompt in registry:
        entries.setdefault(prompt.ref, prompt.content_hash)
    _write(path, entries)
    return sorted(added, key=_order)


def check(registry: PromptRegistry, path: Path) -> list[LockViolation]:
    """Compare the registry with the lock; errors first, then warnings, each by name and version."""
    entries = read_lock(path)
    current = {prompt.ref: prompt for prompt in registry}
    violations: list[LockViolation] = []
    for ref in sorted(entries, key=_order):
        prompt = current.get(ref)
        if prompt is None:
            name, version = _order(ref)
            expected = registry.directory / name / f"v{version}.yaml"
            violations.append(
                LockViolation(ref, "deleted", f"{ref}: released version is missing ({expected})")
            )
        elif prompt.content_hash != entries[ref]:
            covered = ", ".join([str(prompt.source_path), *prompt.code_files])
            violations.append(
                LockViolation(
                    ref,
                    "changed",
                    f"{ref}: released version changed ({covered}); locked {entries[ref]}, "
                    f"now {prompt.content_hash}. Add a new version instead of editing it.",
                )
            )
    for ref in sorted(current.keys() - entries.keys(), key=_order):
        violations.append(
            LockViolation(
                ref,
                "unlocked",
                f"{ref}: not locked yet ({current[ref].source_path}); "
                "run `llmpipe prompts lock` when releasing it",
            )
        )
    return violations


def _order(ref: str) -> tuple[str, int]:
    name, _, version = ref.rpartition("@")
    return name, int(version)


def _write(path: Path, entries: dict[str, str]) -> None:
    """Write via a temporary file and rename so a crash never leaves a truncated lock."""
    body = "".join(f'{ref}: "{entries[ref]}"\n' for ref in sorted(entries, key=_order))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(_HEADER + body)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the lock is a shared, committed file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
