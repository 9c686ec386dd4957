"""Stage 1: decide whether a request may reach a model at all.

Cheap checks run before expensive ones (size before decoding, decoding before rendering)
so that a hostile 5 MB payload costs almost nothing. Every refusal is a dead letter with a
precise reason code; a request whose deadline has passed skips the model and goes to the
fallback path instead, because an answer is still owed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.decisions import DeadLetter, Decision
from pipeline.contract.envelopes import (
    Escalation,
    PromptRef,
    Request,
    ValidatedRequest,
    ValidationReport,
    utc_now,
)
from pipeline.contract.topology import ROUTE_FALLBACK, ROUTE_VALIDATED, VALIDATE
from pipeline.control.state import ControlState
from pipeline.observability.redact import Redactor, folded
from pipeline.prompts.errors import (
    TemplateRenderError,
    UnknownPromptError,
    UnknownPromptVersionError,
)
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import input_errors, render_messages
from pipeline.prompts.serving import select
from pipeline.stages.decisions import emit, emit_escalation

STAGE = VALIDATE
CHARS_PER_TOKEN = 4

_INJECTION = (
    r"ignore (all |any )?(the )?(previous|prior|above) (instructions|prompts?)",
    r"disregard (all |the )?(previous|prior|above)",
    r"you are now (?:in )?(?:developer|dan|jailbreak)",
    r"(reveal|print|show) (me )?(your|the) (system )?prompt",
    r"</?(system|assistant)>",
)
INJECTION_PATTERNS = [re.compile(p, re.IGNORECASE) for p in _INJECTION]
# The same patterns, for ASCII text lowered once: written in lower case, so on ASCII text
# they match exactly where the case-insensitive ones do, at a fifth of the cost (a
# case-insensitive search folds every character it compares). tests/stages keeps both equal.
_INJECTION_LOWER = [re.compile(p) for p in _INJECTION]


INJECTION_NEEDLES = ("ignore ", "disregard ", "you are now ", "prompt", "system>", "assistant>")
"""What every match of one of the patterns contains in
:func:`~pipeline.observability.redact.folded` text: a request that holds none (most) is
not scanned five times (substring tests: 1 against 6 us on a ticket)."""


def injection_suspected(text: str) -> bool:
    """Whether ``text`` holds one of the prompt-injection phrases, in any letter case."""
    probe = folded(text)
    if not any(needle in probe for needle in INJECTION_NEEDLES):
        return False
    if text.isascii():
        return any(p.search(probe) for p in _INJECTION_LOWER)
    return any(p.search(text) for p in INJECTION_PATTERNS)


@dataclass(frozen=True)
class InputLimits:
    max_request_bytes: int = 1_000_000
    max_prompt_chars: int = 50_000
    max_prompt_tokens: int = 8_000


@dataclass(frozen=True)
class ContentRules:
    deny_patterns: Sequence[re.Pattern[str]] = ()
    pii_policy: str = "flag"  # allow | flag | block
    injection_check: bool = True


def estimate_tokens(text: str) -> int:
    """A deliberately simple estimate: limits need to be stable, not exact."""
    return len(text) // CHARS_PER_TOKEN + 1


class Validator:
    def __init__(
        self,
        codec: Codec,
        registry: PromptRegistry,
        control: ControlState,
        redactor: Redactor,
        limits: InputLimits = InputLimits(),
        rules: ContentRules = ContentRules(),
    ) -> None:
        self._codec = codec
        self._registry = registry
        self._control = control
        self._redactor = redactor
        self._limits = limits
        self._rules = rules

    def __call__(
        self,
        value: bytes | None,
        key: bytes | None,
        content_type: str | None,
        now: datetime | None = None,
    ) -> Decision:
        now = now or utc_now()
        if value is None:
            return _dead("decode_error", "EmptyMessage", "the message has no value (tombstone)")
        if len(value) > self._limits.max_request_bytes:
            return _dead(
                "too_large",
                "RequestTooLarge",
                f"{len(value)} bytes exceeds the limit of {self._limits.max_request_bytes}",
            )
        try:
            fields = self._codec.decode_fields(value, Request, content_type)
        except DecodeError as exc:
            return _dead(exc.reason, "DecodeError", exc.detail)
        request_id = fields.get("request_id")
        if not isinstance(request_id, str) or not request_id.strip():
            return _dead("missing_request_id", "MissingRequestId", "request_id is missing or empty")
        try:
            request = Request.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            return _dead("invalid_envelope", "ValidationError", f"{loc}: {err['msg']}", request_id)
        return self._check(request, key if key is not None else request_id.encode(), now)

    def _check(self, request: Request, key: bytes, now: datetime) -> Decision:
        rid = request.request_id
        try:
            selection = select(
                self._registry, self._control.pins, request.prompt, key, request.prompt_version
            )
        except UnknownPromptVersionError as exc:
            return _dead("unknown_prompt_version", "UnknownPromptVersionError", str(exc), rid)
        except UnknownPromptError as exc:
            return _dead("unknown_prompt", "UnknownPromptError", str(exc), rid)
        pv = selection.prompt
        ref = PromptRef(name=pv.name, version=pv.version, hash=pv.content_hash, arm=selection.arm)
        errors = input_errors(pv, request.variables)
        if errors:
            return _dead("invalid_variables", "InvalidVariables", "; ".join(errors[:5]), rid, ref)
        try:
            messages = render_messages(pv, request.variables)
        except TemplateRenderError as exc:
            return _dead("invalid_variables", "TemplateRenderError", str(exc), rid, ref)
        text = "\n".join(m["content"] for m in messages)
        if len(text) > self._limits.max_prompt_chars:
            detail = f"rendered prompt of {len(text)} chars exceeds {self._limits.max_prompt_chars}"
            return _dead("too_large", "PromptTooLarge", detail, rid, ref)
        tokens = estimate_tokens(text)
        if tokens > self._limits.max_prompt_tokens:
            detail = f"about {tokens} prompt tokens exceeds {self._limits.max_prompt_tokens}"
            return _dead("too_large", "PromptTooLarge", detail, rid, ref)
        variables_text = _flatten(request.variables)
        for pattern in self._rules.deny_patterns:
            if pattern.search(variables_text):
                detail = f"variables match deny pattern {pattern.pattern!r}"
                return _dead("blocked_content", "BlockedContent", detail, rid, ref)
        flags: list[str] = []
        if self._rules.pii_policy != "allow":
            kinds = sorted(self._redactor.kinds(variables_text))
            if kinds and self._rules.pii_policy == "block":
                detail = f"personal data in variables: {', '.join(kinds)}"
                return _dead("blocked_content", "PersonalData", detail, rid, ref)
            flags.extend(f"pii:{k}" for k in kinds)
        if self._rules.injection_check and injection_suspected(variables_text):
            flags.append("prompt_injection_suspected")
        validated = ValidatedRequest(request=request, prompt=ref, flags=flags, received_at=now)
        if request.deadline is not None and request.deadline <= now:
            return emit_escalation(STAGE, ROUTE_FALLBACK, deadline_escalation(validated, now))
        return emit(STAGE, ROUTE_VALIDATED, validated, rid, ref)


def deadline_escalation(validated: ValidatedRequest, now: datetime) -> Escalation:
    return Escalation(
        validated=validated,
        reason="deadline_exceeded",
        detail=f"deadline {validated.request.deadline} passed before the model call",
        validation=ValidationReport(checks=["deadline"], errors=["deadline_exceeded"]),
        escalated_at=now,
    )


def _flatten(value: object) -> str:
    """All strings in the variables, keys included: content rules look at every piece of text."""
    parts: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, dict):
            parts.extend(str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return "\n".join(parts)


def _dead(
    reason: str,
    error_class: str,
    message: str,
    request_id: str | None = None,
    prompt: PromptRef | None = None,
) -> DeadLetter:
    return DeadLetter(STAGE, reason, error_class, message, request_id, prompt)
