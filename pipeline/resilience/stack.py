"""Compose the resilience layers into the one client the model-call stage uses.

The order, outermost first, and why each layer sits where it does::

    BudgetedClient                 once per request
      BreakerWaitClient            once per request; holds it while every circuit is open
        FallbackChainClient        once per request; walks [primary, *fallback_models]
          RetryingClient           per model: attempts, backoff, Retry-After, time budget
            BreakerClient          per model: every attempt is one breaker outcome
              RateLimitedClient    per model: every attempt is paced and counted
                EndpointRouter     per model: base URL + key, deadline -> HTTP timeout
                  OpenAIChatClient one per (base URL, key), shared connection pool

Budget outside everything
    A budget is about the request, not about a model: it is checked once, before any
    call, and charged the usage of whichever model answered. Outside the chain a refusal
    cannot be mistaken for a model failure (no breaker counts it, no fallback is tried).

Breaker wait outside the chain
    Only the whole chain can say "no model may take a call now": the wait starts when
    every enabled model of the request's chain is refused by its breaker, and retries the
    whole chain (primary first) once a probe closes one, so the request is answered by
    the best model that is back. Inside the budget, the request's reservation is held
    while it waits, as it would be during a slow call.

Fallback chain outside the retries
    A model is abandoned only after its own retry policy gave up (or a local rate limit
    said it cannot fit the deadline), and each model gets its own attempts and breaker.
    The chain asks the breakers and the control flags first, so an open circuit or a
    disabled endpoint is skipped without spending a call or any of the deadline.

Retries outside the breaker: each attempt counts, not each request
    We chose per-attempt outcomes, for three reasons. (1) When a circuit opens, the
    retries of every request already in flight stop at once: their next attempt gets
    :class:`~pipeline.resilience.errors.CircuitOpen`, which is not retryable, and they
    move to the fallback model. With the breaker outside the retries, all of those
    retries would keep hammering the endpoint that just proved to be down. (2) It opens
    after ``min_calls`` failed *calls*, so a dead endpoint sees ``min_calls`` calls
    rather than ``min_calls x max_attempts``. (3) A half-open probe is one HTTP call,
    not a whole retry sequence with backoff. The price is that one request's retries can
    contribute several failures; the failure *rate* over a window of ``min_calls`` or
    more, and the retry layer's small attempt count, keep one bad request from opening a
    circuit on its own.

Breaker outside the rate limit
    An open circuit must refuse before the call reserves rate-limit budget or waits for a
    slot. The limiter's own refusals (:class:`~pipeline.resilience.errors.RateLimitExceeded`)
    pass up through the breaker as neutral: they say nothing about the endpoint's health.

Rate limit inside the retries
    The provider counts every HTTP call, retries included, so every attempt must take
    its turn in the buckets. A local refusal carries the wait it would have needed as
    ``retry_after_s``; the retry layer then sleeps that long if its budget allows, or gives
    up at once so the chain can move on. The server's own ``Retry-After`` on a 429 is
    obeyed by the retry layer in the same way.

Router at the bottom
    Models live at different base URLs with different keys
    (:class:`~pipeline.resilience.endpoints.Endpoints`); the router also turns the time
    left before the deadline into the HTTP timeout and refuses to send a call whose
    deadline has passed.

:class:`~pipeline.resilience.retry.RetryingClient` does not pass the deadline down; it shrinks
``timeout_s`` to what is left instead, which is what the layers below use as their
bound when they are given no deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pipeline.llm.cost import PriceTable
from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.resilience.base import SYSTEM_CLOCK, Clock
from pipeline.resilience.breaker import BreakerClient, BreakerConfig, StateListener
from pipeline.resilience.breaker_wait import BreakerWaitClient
from pipeline.resilience.budget import BudgetConfig, BudgetedClient, SharedSpend
from pipeline.resilience.endpoints import ClientFactory, EndpointRouter, Endpoints, openai_factory
from pipeline.resilience.fallback_models import FallbackChainClient
from pipeline.resilience.ratelimit import RateLimit, RateLimitedClient, ShareSource
from pipeline.resilience.retry import RetryingClient


@dataclass(frozen=True)
class StackConfig:
    """Everything :func:`build_client` needs; the lead maps ``Settings`` onto it.

    Rate limits and daily budgets are account-wide numbers; a worker's part of them comes
    from the fleet (``shares`` and ``spend`` of :func:`build_client`, see
    :mod:`pipeline.resilience.fleet`).
    """

    endpoints: Endpoints
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    default_rate_limit: RateLimit | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    max_attempts: int = 3
    initial_wait_s: float = 0.2
    max_wait_s: float = 10.0
    retry_budget_s: float = 60.0
    max_connections: int = 256
    breaker_wait_s: float = 0.0
    prices: PriceTable = field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.breaker_wait_s < 0:
            raise ValueError(f"breaker_wait_s must be >= 0, got {self.breaker_wait_s}")


class ResilientClient:
    """The composed stack; the layers stay reachable for metrics and health checks."""

    def __init__(
        self,
        budget: BudgetedClient,
        breaker_wait: BreakerWaitClient,
        chain: FallbackChainClient,
        breakers: BreakerClient,
        rate_limits: RateLimitedClient,
        router: EndpointRouter,
    ) -> None:
        self.budget = budget
        self.breaker_wait = breaker_wait
        self.chain = chain
        self.breakers = breakers
        self.rate_limits = rate_limits
        self.router = router

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        """Call with the prompt's name (for its budget) and ``[primary, *fallbacks]``."""
        return await self.budget.complete(request, deadline, prompt=prompt, models=models)

    async def aclose(self) -> None:
        await self.budget.aclose()


def build_client(
    config: StackConfig,
    *,
    is_enabled: Callable[[str], bool] | None = None,
    alternates: Callable[[str], Sequence[str]] | None = None,
    on_breaker_change: StateListener | None = None,
    may_wait: Callable[[], bool] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    client_factory: ClientFactory | None = None,
    environ: Mapping[str, str] | None = None,
    shares: ShareSource | None = None,
    spend: SharedSpend | None = None,
) -> ResilientClient:
    """Build the stack described in the module docstring.

    ``is_enabled(model)`` is the operator switch (``endpoint_enabled:<model>``);
    ``may_wait()`` is the kill switch a request held by open breakers obeys;
    ``client_factory`` replaces the production :class:`OpenAIChatClient` factory (tests
    wrap it to observe calls); ``shares`` gives this worker's part of the account-wide rate
    limits and ``spend`` the rest of the fleet's budget spend (without them this client
    has the whole account to itself). A model whose key variable is missing fails here, at
    start-up, rather than on its first fallback in the middle of an incident.
    """
    config.endpoints.check(environ)
    router = EndpointRouter(
        config.endpoints,
        client_factory or openai_factory(config.max_connections),
        clock=clock,
        environ=environ,
        prices=config.prices,
    )
    rate_limits = RateLimitedClient(
        router,
        config.rate_limits,
        default=config.default_rate_limit,
        clock=clock,
        shares=shares,
    )
    breakers = BreakerClient(
        rate_limits, config.breaker, clock=clock, on_state_change=on_breaker_change
    )
    retrying = RetryingClient(
        breakers,
        max_attempts=config.max_attempts,
        initial_wait_s=config.initial_wait_s,
        max_wait_s=config.max_wait_s,
        budget_s=config.retry_budget_s,
    )
    chain = FallbackChainClient(
        lambda model: retrying,
        is_enabled=is_enabled,
        circuit_refusal=breakers.refusal,
        alternates=alternates,
        clock=clock,
        closers=[retrying],
    )
    breaker_wait = BreakerWaitClient(
        chain,
        breakers,
        wait_s=config.breaker_wait_s,
        is_enabled=is_enabled,
        may_wait=may_wait,
        clock=clock,
    )
    budget = BudgetedClient(
        breaker_wait, config.budget, clock=clock, prices=config.prices, shared=spend
    )
    return ResilientClient(budget, breaker_wait, chain, breakers, rate_limits, router)
