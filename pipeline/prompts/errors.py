"""Typed errors for the prompt registry.

Callers (stages, the CLI, the control-topic handler) need to tell "the prompt
files are broken" apart from "the caller asked for something that does not
exist" apart from "this event's data cannot be rendered", because each one is
handled differently: fail the deploy, reject the request, or dead-letter the
event. Hence one small class per case instead of ValueError everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import LlmpipeError, did_you_mean


class PromptError(LlmpipeError):
    """Base class so callers can catch every prompt problem in one clause."""


@dataclass(frozen=True, slots=True)
class LoadProblem:
    """One defect in one file; a load collects all of them so a single run shows every typo."""

    path: Path
    field: str
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.path}: {self.field}: {self.message}"
        return f"{self.path}: {self.message}"


class PromptLoadError(PromptError):
    """The prompts directory is not valid; nothing was loaded (a registry never half-loads)."""

    exit_code = 1

    def __init__(self, problems: Sequence[LoadProblem]) -> None:
        self.problems: tuple[LoadProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class UnknownPromptError(PromptError, LookupError):
    """Raised for a prompt name the registry does not hold."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        hint = ", ".join(self.known) if self.known else "none"
        close = did_you_mean(name, self.known)
        super().__init__(f"unknown prompt {name!r}{close} (known prompts: {hint})")


class UnknownPromptVersionError(PromptError, LookupError):
    """A version that does not exist; separate from an unknown name for clearer replies."""

    def __init__(self, name: str, version: int, available: Sequence[int]) -> None:
        self.name = name
        self.version = version
        self.available = tuple(available)
        listed = ", ".join(str(v) for v in self.available)
        super().__init__(f"unknown version {name}@{version} (available versions: {listed})")


class UnknownReferenceError(PromptError, LookupError):
    """A function reference was asked for that the prompt version does not declare."""


class TemplateRenderError(PromptError):
    """The event's variables cannot be rendered (undefined variable, sandbox violation)."""

    def __init__(self, ref: str, message: str) -> None:
        self.ref = ref
        super().__init__(f"{ref}: cannot render prompt: {message}")


class LockFileError(PromptError):
    """The lock file itself is unreadable; distinct from a lock *violation*, which is data."""

    exit_code = 1
