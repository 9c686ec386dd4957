"""The one interface every model client and every resilience layer implements.

Resilience (retries, rate limits, breakers, fallback models) wraps this protocol instead of
living inside a client, so each layer is small, testable alone and composable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pipeline.llm.structured import StructuredOutput

ErrorKind = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "client_error",
    "bad_response",
    "unavailable",
]
RETRYABLE: frozenset[str] = frozenset({"timeout", "connection", "rate_limited", "server_error"})


TokenLimitParam = Literal["max_tokens", "max_completion_tokens"]


@dataclass(frozen=True)
class EndpointOptions:
    """How one model's endpoint wants its requests: deployment, not prompt logic.

    Set from configuration (``LLMPIPE_MODEL_ENDPOINTS`` and the ``LLMPIPE_MODEL_*``
    defaults) by the router, so the same prompt can be served by OpenAI, a gateway and
    llama.cpp in one fallback chain. Not part of a prompt's content hash: changing where
    a prompt runs is a deployment change (see ``docs/models.md``).

    ``reasoning`` marks a reasoning model (o-series, gpt-5...): it rejects ``temperature``,
    ``top_p``, the penalties, ``logprobs`` and ``max_tokens``, so those are left out and
    the limit is sent as ``max_completion_tokens``.
    """

    structured_output: StructuredOutput = "none"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    token_limit_param: TokenLimitParam = "max_tokens"
    reasoning: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """One call. The sampling fields come from the prompt file (prompt logic, hashed);
    ``endpoint`` is filled in by the router from configuration."""

    model: str
    messages: list[dict[str, str]]
    temperature: float | None = 0.0
    max_tokens: int = 512
    logprobs: bool = False
    timeout_s: float = 30.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    reasoning_effort: str | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    output_schema: Mapping[str, Any] | None = None
    schema_name: str = "output"
    schema_strict: bool = False
    structured_output: StructuredOutput | None = None
    """The prompt's override of the endpoint's mode; None uses the endpoint's."""
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)

    @property
    def mode(self) -> StructuredOutput:
        """The structured-output mode this call asks for."""
        if self.structured_output is not None:
            return self.structured_output
        return self.endpoint.structured_output


@dataclass(frozen=True)
class CallRecord:
    """One attempt at one model, or one model of a fallback chain passed over unasked.

    The resilience layers fill these in as they go (the retry layer one per attempt, the
    chain one per skipped model), so the answer, or the error, says exactly which models
    were asked, how often, and how each try ended: what ``llmpipe trace`` shows and what
    the provider bills.
    """

    model: str
    attempt: int
    """1-based within this model's retries; 0 for a model that was skipped."""
    outcome: str
    """``ok``, an :data:`ErrorKind`, or ``skipped:<why>`` (``circuit_open``, ``disabled``,
    ``deadline``)."""
    latency_ms: float = 0.0


@dataclass(frozen=True)
class ChatCompletion:
    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    """The text of each token in ``token_logprobs`` (same length), or empty when the
    API returned none: lets confidence read the probability of one field's value."""
    latency_ms: float = 0.0
    attempts: int = 1
    cached_tokens: int = 0
    cost_usd: float | None = None
    """Priced by the endpoint layer from the reported usage; None when no price is known."""
    structured_output: StructuredOutput = "none"
    """The mode the answering endpoint actually applied (``none`` after a refusal)."""
    calls: tuple[CallRecord, ...] = ()
    """Every try behind this answer, in order (see :class:`CallRecord`); the last one is
    the answer's own."""

    def with_attempts(self, attempts: int) -> ChatCompletion:
        return evolve(self, attempts=attempts)

    def with_calls(self, calls: tuple[CallRecord, ...]) -> ChatCompletion:
        return evolve(self, calls=calls)


_Call = TypeVar("_Call", ChatRequest, ChatCompletion)
_FIELDS = {cls: frozenset(f.name for f in fields(cls)) for cls in (ChatRequest, ChatCompletion)}


def evolve(value: _Call, **changes: Any) -> _Call:
    """``dataclasses.replace`` for a request or an answer, at a fraction of its cost.

    Every layer of the resilience stack adjusts the call or its answer on the way (the
    endpoint's options, the time left, the price, the attempts): ``replace`` runs the
    generated ``__init__`` again (twenty frozen-field assignments, 3 µs a copy), which these
    plain value classes (no ``__post_init__``, every field an init field) do not need: a
    copy of the fields with the changes applied is the same object.
    """
    unknown = changes.keys() - _FIELDS[type(value)]
    if unknown:
        raise TypeError(f"{type(value).__name__} has no field {sorted(unknown)[0]!r}")
    copy = object.__new__(type(value))
    copy.__dict__.update(value.__dict__, **changes)
    return copy


class ModelError(Exception):
    """A failed call, classified so that retry and fallback policies can decide on ``kind``."""

    local: ClassVar[bool] = False
    """True for a call our own policy refused before sending anything (see
    ``pipeline.resilience.errors.LocalRejection``): telemetry names those by class."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
        attempts: int = 1,
        refused_response_format: bool = False,
    ) -> None:
        """``refused_response_format``: the endpoint rejected the structured-output form."""
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.retry_after_s = retry_after_s
        self.status = status
        self.attempts = attempts
        self.refused_response_format = refused_response_format
        self.calls: tuple[CallRecord, ...] = ()
        """Every try that ended in this error, as on :attr:`ChatCompletion.calls`."""

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


class ModelClient(Protocol):
    async def complete(self, request: ChatRequest) -> ChatCompletion: ...

    async def aclose(self) -> None: ...
