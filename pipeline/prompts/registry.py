"""All prompt versions of a ``prompts/`` directory, loaded and verified as one unit.

Loading is all-or-nothing: every file is parsed, validated, hashed and every
referenced function imported and signature-checked before a registry exists.
A pipeline that starts therefore cannot later discover a broken prompt or an
unimportable check on the first unlucky event; and all problems are reported
together so one run of ``llmpipe prompts check`` shows every mistake.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from pipeline.prompts.errors import (
    LoadProblem,
    PromptLoadError,
    UnknownPromptError,
    UnknownPromptVersionError,
    UnknownReferenceError,
)
from pipeline.prompts.loader import VERSION_FILE, load_prompt_file
from pipeline.prompts.model import AGREEMENT_RULE_FIELD, PromptVersion
from pipeline.prompts.references import CheckFn, FallbackFn, resolve_reference

_PROMPT_SUFFIXES = (".yaml", ".yml")


class PromptRegistry:
    """Immutable after ``load``; safe to share between stages and threads."""

    def __init__(
        self,
        directory: Path,
        versions: Mapping[str, list[PromptVersion]],
        checks: Mapping[tuple[str, str], CheckFn],
        fallbacks: Mapping[str, FallbackFn],
        opinions: Mapping[str, FallbackFn] | None = None,
    ) -> None:
        """Use ``PromptRegistry.load``; this only stores already-verified parts."""
        self.directory = directory
        self._versions = {
            name: sorted(vs, key=lambda v: v.version) for name, vs in versions.items()
        }
        self._checks = dict(checks)
        self._fallbacks = dict(fallbacks)
        self._opinions = dict(opinions or {})

    @classmethod
    def load(cls, directory: Path) -> PromptRegistry:
        """Load every ``<name>/v<N>.yaml`` in ``directory``; raise PromptLoadError on any defect.

        Entries starting with ``.`` or ``_`` are skipped (editor files,
        ``__pycache__``); other top-level files such as ``prompts.lock`` are
        ignored, but YAML files in the wrong place are errors because they
        are almost certainly prompts that would otherwise silently not load.
        """
        if not directory.is_dir():
            raise PromptLoadError([LoadProblem(directory, "", "prompts directory does not exist")])
        problems: list[LoadProblem] = []
        code_cache: dict[Path, bytes] = {}
        versions: dict[str, list[PromptVersion]] = {}
        for path in _prompt_files(directory, problems):
            try:
                prompt = load_prompt_file(path, code_cache)
            except PromptLoadError as exc:
                problems.extend(exc.problems)
                continue
            versions.setdefault(prompt.name, []).append(prompt)

        checks: dict[tuple[str, str], CheckFn] = {}
        fallbacks: dict[str, FallbackFn] = {}
        opinions: dict[str, FallbackFn] = {}
        for prompt in (p for vs in versions.values() for p in vs):
            resolved = _resolve_references(prompt, code_cache, problems)
            named = [(f"rules.checks[{i}]", c) for i, c in enumerate(prompt.rules.checks)]
            named += [
                (f"review.risk[{i}].check", r.check)
                for i, r in enumerate(prompt.review.risk)
                if r.check is not None
            ]
            for field, check in named:
                function = resolved.get(field)
                if function is not None:
                    checks[(prompt.content_hash, check)] = cast("CheckFn", function)
            rule = cast("FallbackFn | None", resolved.get("fallback.rule"))
            fallbacks[prompt.content_hash] = _fallback(rule, prompt.fallback.default)
            opinion = cast("FallbackFn | None", resolved.get(AGREEMENT_RULE_FIELD, rule))
            if prompt.confidence.components.agreement is not None and opinion is not None:
                opinions[prompt.content_hash] = opinion
        if problems:
            raise PromptLoadError(problems)
        return cls(directory, versions, checks, fallbacks, opinions)

    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[PromptVersion]:
        """Ascending by version number."""
        try:
            return list(self._versions[name])
        except KeyError:
            raise UnknownPromptError(name, self.names()) from None

    def get(self, name: str, version: int | None = None) -> PromptVersion:
        """The given version, or the newest when ``version`` is None."""
        available = self.versions(name)
        if version is None:
            return available[-1]
        for prompt in available:
            if prompt.version == version:
                return prompt
        raise UnknownPromptVersionError(name, version, [p.version for p in available])

    def __iter__(self) -> Iterator[PromptVersion]:
        """Every version of every prompt, by name then version."""
        for name in self.names():
            yield from self._versions[name]

    def resolve_check(self, prompt: PromptVersion, reference: str) -> CheckFn:
        """The check (or risk rule) function ``reference`` of ``prompt``, imported at load.

        Takes the prompt because local references (``rules.py:f``) are
        relative to the prompt's directory, so the string alone is ambiguous.
        """
        try:
            return self._checks[(prompt.content_hash, reference)]
        except KeyError:
            raise UnknownReferenceError(
                f"{prompt.ref} ({prompt.content_hash}) has no check {reference!r} in this registry"
            ) from None

    def resolve_opinion(self, prompt: PromptVersion) -> FallbackFn | None:
        """The rule whose answer the agreement component compares with the model's, if any.

        Unlike :meth:`resolve_fallback` it never folds in the safe default: a
        default is not an opinion about this request.
        """
        return self._opinions.get(prompt.content_hash)

    def replacing(self, prompt: PromptVersion) -> PromptRegistry:
        """A registry where ``prompt`` stands in for the loaded version of the same name and
        number (same hash, so the same code): how an evaluation runs a variant of a version,
        such as its baseline without confidence components, through the real stages."""
        versions = {
            name: [prompt if v.ref == prompt.ref else v for v in vs]
            for name, vs in self._versions.items()
        }
        return PromptRegistry(
            self.directory, versions, self._checks, self._fallbacks, self._opinions
        )

    def resolve_fallback(self, prompt: PromptVersion) -> FallbackFn:
        """One callable folding rule, default and review together: None means human review."""
        try:
            return self._fallbacks[prompt.content_hash]
        except KeyError:
            raise UnknownReferenceError(
                f"{prompt.ref} ({prompt.content_hash}) is not loaded in this registry"
            ) from None


def _prompt_files(directory: Path, problems: list[LoadProblem]) -> list[Path]:
    files: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_file():
            if entry.suffix in _PROMPT_SUFFIXES:
                problems.append(LoadProblem(entry, "", "prompt files belong in <name>/v<N>.yaml"))
            continue
        found = False
        for path in sorted(entry.iterdir()):
            if path.suffix not in _PROMPT_SUFFIXES:
                continue
            if VERSION_FILE.fullmatch(path.name) is None:
                problems.append(LoadProblem(path, "", "prompt files must be named v<N>.yaml"))
            else:
                files.append(path)
                found = True
        if not found:
            problems.append(LoadProblem(entry, "", "prompt directory has no v<N>.yaml files"))
    return files


def _fallback(rule: FallbackFn | None, default: dict[str, Any] | None) -> FallbackFn:
    def fallback(variables: dict[str, Any]) -> dict[str, Any] | None:
        if rule is not None:
            answer = rule(variables)
            if answer is not None:
                return answer
        # A copy, so a caller mutating its result cannot change the prompt's default.
        return copy.deepcopy(default)

    return fallback


def _resolve_references(
    prompt: PromptVersion, code_cache: Mapping[Path, bytes], problems: list[LoadProblem]
) -> dict[str, Callable[..., Any]]:
    """Import every function ``prompt`` names, keyed by the field naming it."""
    resolved: dict[str, Callable[..., Any]] = {}
    for field, reference in prompt.references():
        try:
            function = resolve_reference(reference, prompt.source_path.parent, code_cache)
        except Exception as exc:  # whatever user code raises while importing is a load error
            message = f"cannot load {reference.target}:{reference.attribute}: {exc!r}"
            problems.append(LoadProblem(prompt.source_path, field, message))
            continue
        is_check = field.startswith(("rules.checks", "review.risk"))
        try:
            inspect.signature(function).bind(*([None] * (2 if is_check else 1)))
        except (TypeError, ValueError) as exc:
            expected = "f(output, variables)" if is_check else "f(variables)"
            problems.append(
                LoadProblem(prompt.source_path, field, f"must be callable as {expected}: {exc}")
            )
            continue
        resolved[field] = function
    return resolved
