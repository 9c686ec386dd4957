"""Settings -> the resilience stack, in one place, so the worker and tools build it alike."""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.control.state import ENDPOINT_ENABLED, ControlState
from pipeline.llm.cost import PriceTable, parse_prices
from pipeline.observability.hooks import record_breaker_change
from pipeline.resilience.breaker import (
    QUALITY_DEFAULTS,
    BreakerConfig,
    BreakerState,
    StateListener,
)
from pipeline.resilience.budget import BudgetConfig, parse_daily_budgets, parse_daily_costs
from pipeline.resilience.endpoints import default_options, parse_endpoints
from pipeline.resilience.fleet import (
    EndpointNews,
    FleetQualityBreaker,
    FleetShares,
    FleetSpend,
    FleetState,
)
from pipeline.resilience.ratelimit import parse_rate_limits
from pipeline.resilience.stack import ResilientClient, StackConfig, build_client


def stack_config(settings: Settings) -> StackConfig:
    api_key = settings.model_api_key.get_secret_value() if settings.model_api_key else None
    rate_limits, default_limit = parse_rate_limits(settings.model_rate_limits)
    return StackConfig(
        endpoints=parse_endpoints(
            settings.model_endpoints,
            settings.model_base_url,
            api_key,
            default_options(
                settings.model_structured_output, settings.model_headers, settings.model_extra_body
            ),
        ),
        rate_limits=rate_limits,
        default_rate_limit=default_limit,
        breaker=BreakerConfig(
            min_calls=settings.breaker_min_calls,
            window_size=max(20, settings.breaker_min_calls),
            failure_rate=settings.breaker_failure_rate,
            open_s=settings.breaker_open_s,
        ),
        budget=BudgetConfig(
            max_request_tokens=settings.max_request_tokens,
            daily_tokens=parse_daily_budgets(settings.prompt_daily_tokens),
            max_request_cost_usd=settings.max_request_cost_usd,
            daily_cost_usd=parse_daily_costs(settings.prompt_daily_cost_usd),
        ),
        prices=PriceTable(parse_prices(settings.model_prices)),
        max_attempts=settings.model_max_attempts,
        retry_budget_s=settings.model_timeout_s * settings.model_max_attempts + 10,
        max_connections=max(settings.max_in_flight * 2, 16),
        breaker_wait_s=settings.breaker_wait_s,
    )


def resilient_client(
    settings: Settings, control: ControlState, fleet: FleetState | None = None
) -> ResilientClient:
    """The model client every stage uses; endpoint and model-call kill switches come from
    ``control`` (a request held by open breakers stops waiting when model calls are off).
    With ``fleet`` its rate limits and budgets are this worker's part of the account's and
    its endpoint breakers share their news with the fleet (unless
    ``LLMPIPE_SHARE_ENDPOINT_BREAKERS`` is off)."""
    config = stack_config(settings)
    on_change: StateListener = record_breaker_change
    news = fleet is not None and settings.share_endpoint_breakers
    if fleet is not None and news:
        on_change = _both(record_breaker_change, fleet.news.on_state_change)
    client = build_client(
        config,
        is_enabled=lambda model: control.flag(ENDPOINT_ENABLED, model),
        on_breaker_change=on_change,
        may_wait=control.model_calls_enabled,
        shares=fleet.shares if fleet is not None else None,
        spend=fleet.spend if fleet is not None else None,
    )
    if fleet is not None:
        if news:
            fleet.news.attach(client.breakers)  # unattached, news from others is not applied
        fleet.demand_source = client.rate_limits.demand
    return client


def _both(first: StateListener, second: StateListener) -> StateListener:
    def both(model: str, old: BreakerState, new: BreakerState) -> None:
        first(model, old, new)
        second(model, old, new)

    return both


def quality_config(settings: Settings) -> BreakerConfig:
    return BreakerConfig(
        window_size=max(QUALITY_DEFAULTS.window_size, settings.quality_breaker_min_calls),
        min_calls=settings.quality_breaker_min_calls,
        failure_rate=settings.quality_breaker_failure_rate,
        open_s=settings.quality_breaker_open_s,
        half_open_calls=QUALITY_DEFAULTS.half_open_calls,
    )


def fleet_state(settings: Settings, me: str) -> FleetState:
    """The state a worker shares with the fleet on ``llm.fleet`` (see
    :mod:`pipeline.resilience.fleet`); ``me`` names this worker there."""
    return FleetState(
        me=me,
        quality=FleetQualityBreaker(
            quality_config(settings), on_state_change=record_breaker_change
        ),
        news=EndpointNews(stack_config(settings).breaker),
        shares=FleetShares(me),
        spend=FleetSpend(me),
    )
