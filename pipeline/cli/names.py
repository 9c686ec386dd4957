"""Names an operator types, checked against what exists before anything is written.

A typo in a kill switch's scope (``--scope gpt-4o-mni``) must not switch off a model that
does not exist while the real one keeps running; a ``send`` to a prompt nobody serves must
not become a dead letter the operator only finds later. Each check raises
:class:`UnknownNameError` (one line, exit 2) with the closest known name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.reasons import DEAD_LETTER_REASONS, ESCALATION_REASONS
from pipeline.errors import LlmpipeError, did_you_mean
from pipeline.prompts.registry import PromptRegistry


class UnknownNameError(LlmpipeError):
    """A name that is not among the known ones; the message suggests the closest."""


def check(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is known, else :class:`UnknownNameError` naming the closest ones."""
    choices = sorted(set(known))
    if name in choices:
        return name
    hint = did_you_mean(name, choices)
    listed = f" (known: {', '.join(choices) or 'none'})" if len(choices) <= 12 else ""
    raise UnknownNameError(f"unknown {kind} {name!r}{hint}{listed}")


def registry(settings: Settings) -> PromptRegistry:
    return PromptRegistry.load(settings.prompts_dir)


def check_prompt(settings: Settings, name: str, version: int | None = None) -> None:
    """The prompt (and version) exist in ``LLMPIPE_PROMPTS_DIR``."""
    prompts = registry(settings)
    check("prompt", name, prompts.names())
    if version is not None:
        versions = [str(p.version) for p in prompts.versions(name)]
        check(f"version of {name}", str(version), versions)


def known_models(settings: Settings) -> set[str]:
    """Models named by the prompt files (primary and fallbacks) and by LLMPIPE_MODEL_ENDPOINTS."""
    models: set[str] = set()
    for prompt in registry(settings):
        models.add(prompt.model.model)
        models.update(prompt.model.fallback_models)
    try:
        configured: Any = json.loads(settings.model_endpoints or "{}")
    except json.JSONDecodeError:
        configured = {}
    if isinstance(configured, dict):
        models.update(str(name) for name in configured)
    return models


def check_reasons(reasons: Iterable[str]) -> None:
    """Dead-letter (and settle-stage escalation) reasons from :mod:`pipeline.contract.reasons`."""
    for reason in reasons:
        check("reason", reason, (*DEAD_LETTER_REASONS, *ESCALATION_REASONS))


def parse_vars(text: str) -> dict[str, Any]:
    """``--vars``: a JSON object, nothing else."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LlmpipeError(f"--vars is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise LlmpipeError(f"--vars must be a JSON object, not {type(parsed).__name__}")
    return parsed


def check_flag_scope(settings: Settings, flag: str, scope: str | None) -> None:
    """A flag's scope names a prompt, or a model for ``endpoint_enabled``."""
    from pipeline.control.state import ENDPOINT_ENABLED

    if scope is None:
        return
    if flag == ENDPOINT_ENABLED:
        check("model endpoint", scope, known_models(settings))
    else:
        check("prompt", scope, registry(settings).names())


def check_stages(stages: Iterable[str]) -> None:
    """Stage names from the topology (``dlq --stage``)."""
    for stage in stages:
        check("stage", stage, topology.stage_names())


def check_topic(name: str) -> None:
    """A logical topic name from the topology (``dlq replay --to``; the prefix is added)."""
    check("topic", name, topology.TOPICS)


UNSERVED_PROMPT_REASONS = frozenset({"unknown_prompt", "unknown_prompt_version"})


def check_prompt_filter(
    settings: Settings, name: str | None, version: int | None, reasons: Iterable[str] = ()
) -> None:
    """``--prompt``/``--version`` filters of the tools reading stored messages: a typo would
    silently match nothing. Only a filter on the dead letters of requests for a prompt or
    version nobody serves (``--reason unknown_prompt``/``unknown_prompt_version``) may name
    one the registry does not hold."""
    if name is not None and not UNSERVED_PROMPT_REASONS & set(reasons):
        check_prompt(settings, name, version)
