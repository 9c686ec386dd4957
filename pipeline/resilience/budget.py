"""Budgets in tokens and in money: a cap per request and a daily allowance per prompt.

Why: one runaway prompt (a template bug that pastes a whole document, a traffic spike on
one use case) can spend a month's model budget in an afternoon and starve every other
prompt of its rate limit. Refusing early is cheap and explicit: a refused request goes
to the fallback route with reason ``budget_exceeded`` instead of being silently dropped.

* Per request: estimated prompt tokens (characters / 4) plus ``max_tokens`` over
  ``max_request_tokens`` is refused before any call.
* Per prompt per UTC day: each call reserves its estimate up front, so concurrent
  requests cannot all slip under the limit together, and is then charged what the
  endpoint reports it used (failed calls are not charged: nothing was generated, and
  usage is not reported for them). A request that would push the prompt past its
  allowance is refused; ``retry_after_s`` says when the next UTC day starts.

Money budgets (``max_request_cost_usd``, ``daily_cost_usd`` per prompt) work the same
way in US dollars: the estimate prices the estimated prompt plus ``max_tokens`` at the
primary model's price (:class:`~pipeline.llm.cost.PriceTable`), and the charge is the
answer's ``cost_usd`` (the estimate when the answering model has no known price, which
errs on the side of refusing rather than overspending). A request whose primary model has
no price is not checked against money budgets; its tokens still are.

This layer sits above the fallback chain: it is checked once per request whichever
model ends up answering, it charges the usage of the model that did, and a refusal is
never mistaken for a model failure (no breaker counts it, no fallback model is tried).

Account-wide and durable
    The allowances are account-wide. Each worker keeps its own day in memory (so the call
    path never waits on the network) and reports it to a :class:`SharedSpend`; in a worker
    that is :class:`~pipeline.resilience.fleet.FleetSpend`, published on the compacted
    ``llm.fleet`` topic within a flush interval (100 ms) and read back by every worker,
    and by a restarted one before it serves. A prompt's day is this worker's charges and
    reservations plus every other worker key's (gone or restarted workers included), so a
    deploy forgets nothing and N workers share one allowance. The overshoot is bounded by
    what was reserved at once by calls the others could not see yet (in flight, or started
    within the last flush interval). A worker killed with calls in flight leaves their
    reservations charged: the provider may have been paid for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from pipeline.llm.cost import PriceTable
from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.resilience.base import (
    SYSTEM_CLOCK,
    Clock,
    RoutedClient,
    estimate_request_tokens,
    used_tokens,
)
from pipeline.resilience.errors import BudgetExceeded


@dataclass(frozen=True)
class BudgetConfig:
    """``None`` means unlimited; ``daily_tokens`` maps prompt name -> tokens per UTC day,
    ``daily_cost_usd`` prompt name -> US dollars per UTC day."""

    max_request_tokens: int | None = None
    daily_tokens: Mapping[str, int] = field(default_factory=dict)
    default_daily_tokens: int | None = None
    max_request_cost_usd: float | None = None
    daily_cost_usd: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in [
            ("max_request_tokens", self.max_request_tokens),
            ("default_daily_tokens", self.default_daily_tokens),
            *((f"daily_tokens[{p}]", v) for p, v in self.daily_tokens.items()),
        ]:
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, money in [
            ("max_request_cost_usd", self.max_request_cost_usd),
            *((f"daily_cost_usd[{p}]", v) for p, v in self.daily_cost_usd.items()),
        ]:
            if money is not None and (isinstance(money, bool) or not money > 0):
                raise ValueError(f"{name} must be a positive amount, got {money!r}")

    def daily_limit(self, prompt: str) -> int | None:
        return self.daily_tokens.get(prompt, self.default_daily_tokens)


@dataclass
class PromptUsage:
    """One prompt's day so far: tokens (and dollars) charged and reserved by calls in flight."""

    day: date
    spent: int = 0
    reserved: int = 0
    spent_usd: float = 0.0
    reserved_usd: float = 0.0


class SharedSpend(Protocol):
    """The rest of the fleet's spend (see the module docstring)."""

    def others(self, day: date, prompt: str) -> tuple[int, float]:
        """Tokens and dollars charged or reserved today by every other worker."""
        ...

    def carried(self, day: date, prompt: str) -> tuple[int, float]:
        """What this worker had spent today before it (re)started under the same id."""
        ...

    def report(self, prompt: str, usage: PromptUsage) -> None:
        """This worker's day for ``prompt`` now."""
        ...


class BudgetedClient:
    """Refuses requests over budget with :class:`BudgetExceeded`; passes the rest down."""

    def __init__(
        self,
        inner: RoutedClient,
        config: BudgetConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        prices: PriceTable | None = None,
        shared: SharedSpend | None = None,
    ) -> None:
        self._inner = inner
        self._config = config
        self._clock = clock
        self._prices = prices or PriceTable()
        self._shared = shared
        self._usage: dict[str, PromptUsage] = {}

    async def aclose(self) -> None:
        await self._inner.aclose()

    def usage(self) -> dict[str, PromptUsage]:
        """Today's spending per prompt (a copy), for metrics."""
        today = self._today()
        return {p: replace(u) for p, u in self._usage.items() if u.day == today}

    def _today(self) -> date:
        return datetime.fromtimestamp(self._clock.time(), UTC).date()

    def _day_usage(self, prompt: str) -> PromptUsage:
        today = self._today()
        usage = self._usage.get(prompt)
        if usage is None or usage.day != today:
            usage = PromptUsage(today)
            if self._shared is not None:
                usage.spent, usage.spent_usd = self._shared.carried(today, prompt)
            self._usage[prompt] = usage
        return usage

    def _report(self, prompt: str, usage: PromptUsage) -> None:
        if self._shared is not None:
            self._shared.report(prompt, usage)

    def _seconds_to_midnight(self) -> float:
        now = self._clock.time()
        tomorrow = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)
        midnight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
        return midnight.timestamp() - now

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        estimate = estimate_request_tokens(request)
        cost = self._estimate_cost(request, estimate)
        self._check_request(estimate, cost, prompt)
        limit = self._config.daily_limit(prompt) if prompt is not None else None
        money = self._config.daily_cost_usd.get(prompt) if prompt is not None else None
        if prompt is None or (limit is None and (money is None or cost is None)):
            return await self._inner.complete(request, deadline, models=models)
        usage = self._day_usage(prompt)
        self._check_day(usage, estimate, cost, prompt, limit, money)
        reserved_usd = cost if money is not None and cost is not None else 0.0
        usage.reserved += estimate
        usage.reserved_usd += reserved_usd
        self._report(prompt, usage)
        try:
            completion = await self._inner.complete(request, deadline, models=models)
        except BaseException:
            usage.reserved -= estimate
            usage.reserved_usd -= reserved_usd
            self._report(prompt, usage)
            raise
        usage.reserved -= estimate
        usage.reserved_usd -= reserved_usd
        # Charged to the day the call ends in: after midnight that is the new day's record.
        today = self._day_usage(prompt)
        today.spent += used_tokens(completion, request)
        if reserved_usd:
            today.spent_usd += completion.cost_usd if completion.cost_usd is not None else cost or 0
        self._report(prompt, usage)
        if today is not usage:
            self._report(prompt, today)
        return completion

    def _estimate_cost(self, request: ChatRequest, estimate: int) -> float | None:
        prompt_tokens = estimate - request.max_tokens
        return self._prices.estimate(request.model, prompt_tokens, request.max_tokens)

    def _check_request(self, estimate: int, cost: float | None, prompt: str | None) -> None:
        cap = self._config.max_request_tokens
        if cap is not None and estimate > cap:
            raise BudgetExceeded(
                f"request needs up to {estimate} tokens (prompt estimate + max_tokens), "
                f"over the per-request limit of {cap}",
                scope="request",
                limit=cap,
                requested=estimate,
                prompt=prompt,
            )
        money_cap = self._config.max_request_cost_usd
        if money_cap is not None and cost is not None and cost > money_cap:
            raise BudgetExceeded(
                f"request may cost up to ${cost:.6f} (prompt estimate + max_tokens), "
                f"over the per-request limit of ${money_cap:.6f}",
                scope="request_cost",
                limit=money_cap,
                requested=cost,
                prompt=prompt,
            )

    def _check_day(
        self,
        usage: PromptUsage,
        estimate: int,
        cost: float | None,
        prompt: str,
        limit: int | None,
        money: float | None,
    ) -> None:
        others, others_usd = (
            self._shared.others(usage.day, prompt) if self._shared is not None else (0, 0.0)
        )
        committed = usage.spent + usage.reserved + others
        if limit is not None and committed + estimate > limit:
            raise BudgetExceeded(
                f"prompt {prompt} has {max(limit - committed, 0)} of its {limit} tokens "
                f"left today (UTC), the request needs up to {estimate}",
                scope="daily",
                limit=limit,
                requested=estimate,
                spent=usage.spent + others,
                prompt=prompt,
                retry_after_s=self._seconds_to_midnight(),
            )
        committed_usd = usage.spent_usd + usage.reserved_usd + others_usd
        if money is not None and cost is not None and committed_usd + cost > money:
            raise BudgetExceeded(
                f"prompt {prompt} has ${max(money - committed_usd, 0):.6f} of its "
                f"${money:.6f} left today (UTC), the request may cost up to ${cost:.6f}",
                scope="daily_cost",
                limit=money,
                requested=cost,
                spent=usage.spent_usd + others_usd,
                prompt=prompt,
                retry_after_s=self._seconds_to_midnight(),
            )


def parse_daily_budgets(raw: str | None) -> dict[str, int]:
    """Parse ``LLMPIPE_PROMPT_DAILY_TOKENS``: a JSON object of prompt name -> tokens/day."""
    budgets: dict[str, int] = {}
    for prompt, tokens in _prompt_object(raw, "prompt daily budgets", "tokens").items():
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"daily budget for {prompt!r} must be a positive integer")
        budgets[str(prompt)] = tokens
    return budgets


def parse_daily_costs(raw: str | None) -> dict[str, float]:
    """Parse ``LLMPIPE_PROMPT_DAILY_COST_USD``: a JSON object of prompt name -> USD/day."""
    budgets: dict[str, float] = {}
    for prompt, usd in _prompt_object(raw, "prompt daily cost budgets", "USD").items():
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not usd > 0:
            raise ValueError(f"daily cost budget for {prompt!r} must be a positive amount")
        budgets[str(prompt)] = float(usd)
    return budgets


def _prompt_object(raw: str | None, what: str, unit: str) -> dict[str, Any]:
    """The JSON object of a per-prompt setting (empty when unset): both daily budgets are
    read alike, so a malformed one fails with the same kind of message."""
    if raw is None or not raw.strip():
        return {}
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{what} are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object of prompt -> {unit}")
    return data
