"""What a model call cost, in US dollars, from the tokens the endpoint reported.

Prices come from two places, the first that knows the model wins:

1. ``LLMPIPE_MODEL_PRICES``, a JSON table of model -> USD per million tokens, for models
   no public catalogue lists (self-hosted, fine-tuned, negotiated rates)::

       {"smollm2-135m-instruct": {"input": 0, "output": 0},
        "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached_input": 0.075}}

2. the `genai-prices <https://pypi.org/project/genai-prices/>`_ catalogue (maintained by
   Pydantic, bundled in the package). Only the bundled snapshot is used: llmpipe never
   starts its auto-update, so nothing is fetched at run time and a run's costs do not
   change with the network.

A model neither knows has an unknown cost (``None``), never a made-up zero: a result
says ``cost_usd: null`` and money budgets cannot charge it (the token budgets still do).
Cached input tokens (``usage.prompt_tokens_details.cached_tokens``) are part of the
prompt tokens and billed at the cached rate where the price has one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger("pipeline.llm.cost")

PER_MILLION = 1_000_000


class PriceConfigError(ValueError):
    """``LLMPIPE_MODEL_PRICES`` is malformed."""


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(max(cached_tokens, 0), prompt_tokens) if self.cached_input is not None else 0
        rate = self.cached_input if self.cached_input is not None else self.input
        total = (
            (prompt_tokens - cached) * self.input + cached * rate + completion_tokens * self.output
        )
        return total / PER_MILLION


def parse_prices(raw: str | None) -> dict[str, Price]:
    """Parse ``LLMPIPE_MODEL_PRICES`` (see the module docstring); empty means none."""
    if raw is None or not raw.strip():
        return {}
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise PriceConfigError(f"model prices are not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PriceConfigError("model prices must be a JSON object of model -> price")
    prices: dict[str, Price] = {}
    for model, spec in data.items():
        if not isinstance(spec, dict) or not {"input", "output"} <= set(spec):
            raise PriceConfigError(f"price of {model!r} needs input and output (USD per 1M)")
        unknown = set(spec) - {"input", "output", "cached_input"}
        if unknown:
            raise PriceConfigError(f"price of {model!r} has unknown fields {sorted(unknown)}")
        for key, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PriceConfigError(f"price of {model!r}: {key} must be a number")
            if not math.isfinite(value) or value < 0:
                raise PriceConfigError(f"price of {model!r}: {key} must be >= 0")
        cached = spec.get("cached_input")
        prices[str(model)] = Price(
            float(spec["input"]), float(spec["output"]), None if cached is None else float(cached)
        )
    return prices


class PriceTable:
    """Configured prices first, then the bundled catalogue; lookups are cached per model."""

    def __init__(self, configured: Mapping[str, Price] | None = None, catalogue: bool = True):
        self._configured = dict(configured or {})
        self._catalogue = catalogue

    def known(self, model: str) -> bool:
        return model in self._configured or (self._catalogue and _catalogue_knows(model))

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> float | None:
        """USD for one call, or None when no source prices ``model``."""
        price = self._configured.get(model)
        if price is not None:
            return price.cost(prompt_tokens, completion_tokens, cached_tokens)
        if not self._catalogue or not _catalogue_knows(model):
            return None
        return _catalogue_cost(model, prompt_tokens, completion_tokens, cached_tokens)

    def estimate(self, model: str, prompt_tokens: int, max_tokens: int) -> float | None:
        """The most a call can cost: every allowed output token billed."""
        return self.cost(model, prompt_tokens, max_tokens)


@lru_cache(maxsize=1024)
def _catalogue_knows(model: str) -> bool:
    return _catalogue_cost(model, 1, 1, 0) is not None


def _catalogue_cost(
    model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> float | None:
    price = _flat_price(model)
    if price is not None:
        return price.cost(prompt_tokens, completion_tokens, cached_tokens)
    return _calc_price(model, prompt_tokens, completion_tokens, cached_tokens)


def _calc_price(
    model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
) -> float | None:
    from genai_prices import Usage, calc_price  # ~0.5 s import: only when a price is needed

    usage = Usage(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        cache_read_tokens=min(cached_tokens, prompt_tokens) or None,
    )
    try:
        return float(calc_price(usage, model).total_price)
    except LookupError:
        return None


FLAT_UNITS = ("input_mtok", "output_mtok", "cache_read_mtok")
PROBES = ((1_000, 200, 0), (1_000, 200, 400), (7, 0, 7), (0, 3, 0))


@lru_cache(maxsize=1024)
def _flat_price(model: str) -> Price | None:
    """The catalogue's price of ``model`` as a :class:`Price`, when it is one.

    ``calc_price`` walks genai-prices' unit registry on every call (about a tenth of a
    worker's CPU per request when it ran per call); most models have one flat rate per
    token kind, which is three numbers. A model whose price has tiers (by prompt length),
    dates or anything else keeps the exact per-call calculation, and so does one whose
    flat reading disagrees with ``calc_price`` on a few probe usages.
    """
    from decimal import Decimal

    from genai_prices import data_snapshot, types

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, None)
    except LookupError:
        return None
    if not isinstance(info.prices, types.ModelPrice):
        return None  # conditional (dated) prices
    rates = vars(info.prices)
    if any(
        rates.get(unit) is not None and not isinstance(rates[unit], Decimal) for unit in FLAT_UNITS
    ):
        return None  # tiered
    if rates.get("input_mtok") is None or rates.get("output_mtok") is None:
        return None
    cached = rates.get("cache_read_mtok")
    price = Price(
        float(rates["input_mtok"]),
        float(rates["output_mtok"]),
        None if cached is None else float(cached),
    )
    for usage in PROBES:
        exact = _calc_price(model, *usage)
        if exact is None or not math.isclose(
            price.cost(*usage), exact, rel_tol=1e-9, abs_tol=1e-15
        ):
            return None
    return price
