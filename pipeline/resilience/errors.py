"""Typed failures raised by the resilience layers themselves (no call reached an endpoint).

All of them subclass :class:`~pipeline.llm.protocol.ModelError` on purpose: code that only
knows ``ModelError`` (the retry layer, today's ``ModelCaller``) still routes them to the
fallback path instead of crashing, while code that knows them can catch the subclass
first and give a precise reason (``budget_exceeded``, ``circuit_open``...).

:class:`LocalRejection` marks "our own policy said no". The breaker must not count such a
rejection as an endpoint failure: a local rate limit says nothing about the endpoint's
health, and counting it would let a busy worker open its own circuit.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.llm.protocol import ErrorKind, ModelError


class LocalRejection(ModelError):
    """A call refused by a local policy before any request was sent."""

    local = True

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(kind, message, retry_after_s=retry_after_s, attempts=attempts)


class RateLimitExceeded(LocalRejection):
    """The local rate limit would make the call wait past its deadline.

    ``retry_after_s`` is the wait the limiter computed, so the retry layer above either
    sleeps exactly that long or (when that passes its budget) gives up at once, and the
    fallback chain moves to the next model instead of sitting in a queue.
    """

    def __init__(self, model: str, message: str, *, retry_after_s: float | None) -> None:
        super().__init__("rate_limited", message, retry_after_s=retry_after_s)
        self.model = model


class CircuitOpen(LocalRejection):
    """The model's circuit breaker is open (or its half-open probe slots are taken)."""

    def __init__(self, model: str, *, retry_after_s: float | None = None) -> None:
        super().__init__("unavailable", f"circuit open for {model}", retry_after_s=retry_after_s)
        self.model = model


class ModelDisabled(LocalRejection):
    """An operator switched the model endpoint off (``endpoint_enabled:<model>`` flag)."""

    def __init__(self, model: str) -> None:
        super().__init__("unavailable", f"model endpoint {model} is disabled")
        self.model = model


class BudgetExceeded(LocalRejection):
    """A request refused by a budget (too large, or the prompt's day is spent).

    ``scope`` is ``request`` or ``daily`` for token budgets (``limit``, ``requested`` and
    ``spent`` in tokens), ``request_cost`` or ``daily_cost`` for money budgets (in USD).

    ``kind`` is ``client_error`` (not retryable, not a model failure); callers that know
    this class map it to the fallback route with reason :attr:`reason`.
    """

    reason = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        scope: str,
        limit: float,
        requested: float,
        spent: float = 0,
        prompt: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__("client_error", message, retry_after_s=retry_after_s)
        self.scope = scope
        self.limit = limit
        self.requested = requested
        self.spent = spent
        self.prompt = prompt


class AllModelsFailed(ModelError):
    """Every model in a fallback chain failed or was skipped; one reason per model."""

    def __init__(
        self,
        reasons: Mapping[str, str],
        *,
        attempts: int,
        retry_after_s: float | None = None,
        kind: ErrorKind = "unavailable",
    ) -> None:
        """``kind`` is the models' common failure when they all failed alike (so the route's
        reason stays ``model_timeout`` rather than a vaguer ``model_unavailable``)."""
        summary = ", ".join(f"{model}: {why}" for model, why in reasons.items())
        super().__init__(
            kind,
            f"all models failed: {summary}",
            attempts=attempts,
            retry_after_s=retry_after_s,
        )
        self.reasons = dict(reasons)
