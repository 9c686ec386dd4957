"""Which message the current code is working on, as a context variable.

Why a context variable: the retry layer, the log formatter and the metrics deep inside a
model call need the request id and prompt version, but threading them through every
client signature would couple the resilience layers to Kafka envelopes. The runner sets
the scope inside each message's own task; ``asyncio`` gives every task a copy of the
context, so 64 messages in flight each see their own scope and never a neighbour's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

from pipeline.observability import semconv as sc


@dataclass(frozen=True, slots=True)
class MessageScope:
    stage: str
    request_id: str | None = None
    prompt_name: str | None = None
    prompt_version: int | None = None

    def prompt_attributes(self) -> dict[str, str | int]:
        attrs: dict[str, str | int] = {}
        if self.prompt_name is not None:
            attrs[sc.GEN_AI_PROMPT_NAME] = self.prompt_name
        if self.prompt_version is not None:
            attrs[sc.GEN_AI_PROMPT_VERSION] = self.prompt_version
        return attrs


_SCOPE: ContextVar[MessageScope | None] = ContextVar("llmpipe_message_scope", default=None)


def current_scope() -> MessageScope | None:
    return _SCOPE.get()


@contextmanager
def message_scope(scope: MessageScope) -> Iterator[MessageScope]:
    token = enter_scope(scope)
    try:
        yield scope
    finally:
        leave_scope(token)


def enter_scope(scope: MessageScope) -> Token[MessageScope | None]:
    """:func:`message_scope` without the context manager, for a caller that is one."""
    return _SCOPE.set(scope)


def leave_scope(token: Token[MessageScope | None]) -> None:
    _SCOPE.reset(token)


def parse_prompt_ref(ref: str | None) -> tuple[str | None, int | None]:
    """``ticket_triage@2`` (the ``x-prompt`` header) -> ``("ticket_triage", 2)``."""
    if not ref:
        return None, None
    name, sep, version = ref.rpartition("@")
    if not sep or not name:
        return ref, None
    try:
        return name, int(version)
    except ValueError:
        return ref, None
