"""Prompts as versioned code: validated YAML files, content hashes, a release lock, canaries.

Import from here; the submodules are an implementation layout, not an API.
"""

from pipeline.prompts.diff import canonical_yaml, diff_versions
from pipeline.prompts.errors import (
    LoadProblem,
    LockFileError,
    PromptError,
    PromptLoadError,
    TemplateRenderError,
    UnknownPromptError,
    UnknownPromptVersionError,
    UnknownReferenceError,
)
from pipeline.prompts.lock import LOCK_FILE_NAME, LockViolation, check, lock, read_lock
from pipeline.prompts.model import (
    ConfidencePolicy,
    FallbackSpec,
    MessageTemplate,
    ModelParams,
    OutputRules,
    PromptSpec,
    PromptTestCase,
    PromptVersion,
    TestExpectation,
)
from pipeline.prompts.references import CheckFn, FallbackFn
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import (
    SCHEMA_INSTRUCTION,
    SCHEMA_LINE_PREFIX,
    input_errors,
    render_messages,
)
from pipeline.prompts.serving import Arm, Pin, Selection, canary_bucket, select

__all__ = [
    "LOCK_FILE_NAME",
    "SCHEMA_INSTRUCTION",
    "SCHEMA_LINE_PREFIX",
    "Arm",
    "CheckFn",
    "ConfidencePolicy",
    "FallbackFn",
    "FallbackSpec",
    "LoadProblem",
    "LockFileError",
    "LockViolation",
    "MessageTemplate",
    "ModelParams",
    "OutputRules",
    "Pin",
    "PromptError",
    "PromptLoadError",
    "PromptRegistry",
    "PromptSpec",
    "PromptTestCase",
    "PromptVersion",
    "Selection",
    "TemplateRenderError",
    "TestExpectation",
    "UnknownPromptError",
    "UnknownPromptVersionError",
    "UnknownReferenceError",
    "canary_bucket",
    "canonical_yaml",
    "check",
    "diff_versions",
    "input_errors",
    "lock",
    "read_lock",
    "render_messages",
    "select",
]
