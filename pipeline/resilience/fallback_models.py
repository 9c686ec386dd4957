"""Try a prompt's models in order until one answers: the primary, then its fallbacks.

A request names its primary model; the prompt version lists ordered alternates
(``model.fallback_models``). The caller passes ``models=[primary, *fallback_models]``
(or the chain derives the list from ``alternates``). For each model in turn:

* skip it without a call when an operator disabled it (``endpoint_enabled:<model>``) or
  its circuit is open: both are known before spending any of the deadline;
* otherwise call it through its own stack (retries, breaker, rate limit). A model that
  fails *after its retries*, or whose rate limit cannot fit the deadline, hands over to
  the next one. Every :class:`~pipeline.llm.protocol.ModelError` hands over: errors that
  look like the request's fault (401, 404, context too long) are usually specific to the
  endpoint or model, and trying the next costs one call;
* stop when the deadline has passed.

The answer records the model that produced it (``ChatCompletion.model``) and the attempts
of every model tried. When all fail the error is :class:`AllModelsFailed` (``unavailable``)
with one reason per model and the attempts summed; with a single model the chain is
transparent and its error passes through unchanged, so existing reasons
(``model_timeout``, ``model_rate_limited``...) keep their meaning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from pipeline.llm.protocol import CallRecord, ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.base import SYSTEM_CLOCK, Clock, LayerClient, remaining_s
from pipeline.resilience.errors import AllModelsFailed, CircuitOpen, ModelDisabled


class FallbackChainClient:
    """Ordered fallback over models; each model's client comes from ``clients_by_model``.

    ``is_enabled(model)`` is the operator's switch (wire it to
    ``ControlState.flag(ENDPOINT_ENABLED, model)``); ``circuit_refusal(model)`` is the
    breaker's view (wire it to :meth:`BreakerClient.refusal`): the :class:`CircuitOpen`
    a call would get, with its ``retry_after_s``, or None. ``alternates(model)`` gives
    the fallbacks when the caller does not pass ``models``.
    """

    def __init__(
        self,
        clients_by_model: Callable[[str], LayerClient],
        *,
        is_enabled: Callable[[str], bool] | None = None,
        circuit_refusal: Callable[[str], CircuitOpen | None] | None = None,
        alternates: Callable[[str], Sequence[str]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        closers: Sequence[LayerClient] = (),
    ) -> None:
        self._clients_by_model = clients_by_model
        self._is_enabled = is_enabled
        self._circuit_refusal = circuit_refusal
        self._alternates = alternates
        self._clock = clock
        self._closers = tuple(closers)
        self.answered_by: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.skipped: Counter[tuple[str, str]] = Counter()

    async def aclose(self) -> None:
        """Close the layers passed as ``closers`` (the chain does not own per-model clients)."""
        for closer in self._closers:
            await closer.aclose()

    def chain_for(self, request: ChatRequest, models: Sequence[str] | None) -> list[str]:
        if models:
            chain = list(models)
        else:
            extra = self._alternates(request.model) if self._alternates else ()
            chain = [request.model, *extra]
        return list(dict.fromkeys(chain))  # keep order, drop repeats

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        chain = self.chain_for(request, models)
        reasons: dict[str, str] = {}
        errors: list[ModelError] = []
        called: list[ModelError] = []  # failures of models actually called, not skipped
        attempts = 0
        calls: list[CallRecord] = []
        for index, model in enumerate(chain):
            skipped = self._skip(model, deadline)
            if skipped is not None:
                label, skip = skipped
                reasons[model] = str(skip)
                self.skipped[(model, label)] += 1
                errors.append(skip)
                calls.append(CallRecord(model, 0, f"skipped:{label}"))
                if label == "deadline":
                    for rest in chain[index + 1 :]:
                        reasons[rest] = "deadline passed"
                    break
                continue
            try:
                call = request if model == request.model else replace(request, model=model)
                answer = await self._clients_by_model(model).complete(call, deadline)
            except ModelError as exc:
                attempts += exc.attempts
                calls.extend(exc.calls or [CallRecord(model, exc.attempts, exc.kind)])
                reasons[model] = f"{exc.kind}: {exc}"
                errors.append(exc)
                called.append(exc)
                self.failed[model] += 1
                continue
            self.answered_by[model] += 1
            if not attempts and not calls:
                return answer  # the first model answered: nothing to add
            return replace(
                answer, attempts=attempts + answer.attempts, calls=(*calls, *answer.calls)
            )
        if len(chain) == 1 and len(errors) == 1:
            errors[0].attempts = attempts
            errors[0].calls = tuple(calls)
            raise errors[0]
        waits = [e.retry_after_s for e in errors if e.retry_after_s is not None]
        # The reason reported is how the called models failed; alternates skipped because
        # their circuit is open (they only ever see traffic that failed already) must not
        # mask the primary's timeout or 5xx as a vaguer "unavailable".
        kinds = {e.kind for e in called} or {e.kind for e in errors}
        failed = AllModelsFailed(
            reasons,
            attempts=attempts,
            retry_after_s=min(waits) if waits else None,
            kind=kinds.pop() if len(kinds) == 1 else "unavailable",
        )
        failed.calls = tuple(calls)
        raise failed

    def _skip(self, model: str, deadline: datetime | None) -> tuple[str, ModelError] | None:
        """Why ``model`` is not called at all, as (metrics label, error); None to call it."""
        left = remaining_s(deadline, self._clock)
        if left is not None and left <= 0:
            return "deadline", ModelError("timeout", "deadline passed", attempts=0)
        if self._is_enabled is not None and not self._is_enabled(model):
            return "disabled", ModelDisabled(model)
        refusal = self._circuit_refusal(model) if self._circuit_refusal is not None else None
        if refusal is not None:
            return "circuit_open", refusal
        return None
