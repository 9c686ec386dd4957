"""Builders for stage unit tests: real prompts, no Kafka, a scripted model client."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pipeline.config import Settings
from pipeline.contract.envelopes import (
    Completion,
    PromptRef,
    Request,
    Usage,
    ValidatedRequest,
    utc_now,
)
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.prompts.registry import PromptRegistry

REGISTRY = PromptRegistry.load(Settings().prompts_dir)
GOOD_ANSWER = {"label": "billing", "priority": "normal", "summary": "Customer was charged twice."}


def validated(
    variables: dict[str, Any] | None = None,
    prompt: str = "ticket_triage",
    version: int | None = 2,
    flags: Sequence[str] = (),
    deadline: datetime | None = None,
) -> ValidatedRequest:
    """Version 2 unless told: these tests exercise v2's policies (v3 adds confidence
    components, which tests/stages/test_settle_confidence.py covers)."""
    pv = REGISTRY.get(prompt, version)
    request = Request(
        request_id="r-1",
        prompt=prompt,
        variables=variables or {"subject": "Charged twice", "body": "My invoice charged me twice."},
        metadata={"tenant": "acme"},
        deadline=deadline,
    )
    ref = PromptRef(name=pv.name, version=pv.version, hash=pv.content_hash)
    return ValidatedRequest(request=request, prompt=ref, flags=list(flags), received_at=utc_now())


def completion(
    text: str, logprobs: Sequence[float] = (-0.05,) * 5, v: ValidatedRequest | None = None
) -> Completion:
    return Completion(
        validated=v or validated(),
        model="gpt-4o-mini",
        raw_text=text,
        finish_reason="stop",
        usage=Usage(prompt_tokens=100, completion_tokens=20),
        token_logprobs=list(logprobs),
        latency_ms=12.0,
        attempts=1,
        completed_at=utc_now(),
    )


class ScriptedClient:
    """Answers from a list; records every request it was asked."""

    def __init__(self, answers: Sequence[str | ModelError]) -> None:
        self.answers = list(answers)
        self.requests: list[ChatRequest] = []
        self.budgets: list[tuple[str | None, list[str]]] = []
        """The budget (prompt name) and model chain of each call."""

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        self.requests.append(request)
        self.budgets.append((prompt, list(models or [])))
        answer = self.answers.pop(0)
        if isinstance(answer, ModelError):
            raise answer
        return ChatCompletion(answer, request.model, "stop", 10, 10, [-0.05] * 5)


def dumps(value: Any) -> str:
    return json.dumps(value)
