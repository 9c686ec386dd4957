"""Resilience layers around a model client: rate limits, breakers, fallbacks, budgets.

Each layer implements ``complete(request, deadline=None)`` like the retry layer, so they
stack; :func:`pipeline.resilience.stack.build_client` composes them in the order its
module docstring justifies.
"""

from pipeline.resilience.base import SYSTEM_CLOCK, Clock, LayerClient, SystemClock
from pipeline.resilience.breaker import (
    QUALITY_DEFAULTS,
    BreakerClient,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    QualityBreaker,
)
from pipeline.resilience.breaker_wait import BreakerWaitClient
from pipeline.resilience.budget import BudgetConfig, BudgetedClient, parse_daily_budgets
from pipeline.resilience.endpoints import (
    EndpointConfigError,
    EndpointRouter,
    Endpoints,
    ModelEndpoint,
    ResolvedEndpoint,
    parse_endpoints,
)
from pipeline.resilience.errors import (
    AllModelsFailed,
    BudgetExceeded,
    CircuitOpen,
    LocalRejection,
    ModelDisabled,
    RateLimitExceeded,
)
from pipeline.resilience.fallback_models import FallbackChainClient
from pipeline.resilience.ratelimit import (
    RateLimit,
    RateLimitedClient,
    RateLimitStats,
    parse_rate_limits,
)
from pipeline.resilience.stack import ResilientClient, StackConfig, build_client

__all__ = [
    "QUALITY_DEFAULTS",
    "SYSTEM_CLOCK",
    "AllModelsFailed",
    "BreakerClient",
    "BreakerConfig",
    "BreakerState",
    "BreakerWaitClient",
    "BudgetConfig",
    "BudgetExceeded",
    "BudgetedClient",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "EndpointConfigError",
    "EndpointRouter",
    "Endpoints",
    "FallbackChainClient",
    "LayerClient",
    "LocalRejection",
    "ModelDisabled",
    "ModelEndpoint",
    "QualityBreaker",
    "RateLimit",
    "RateLimitExceeded",
    "RateLimitStats",
    "RateLimitedClient",
    "ResilientClient",
    "ResolvedEndpoint",
    "StackConfig",
    "SystemClock",
    "build_client",
    "parse_daily_budgets",
    "parse_endpoints",
    "parse_rate_limits",
]
