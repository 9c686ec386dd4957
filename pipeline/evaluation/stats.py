"""``llmpipe prompts stats``: cost, latency, fallback and review rates per prompt version.

Read from ``llm.results``, the system of record for what was delivered, so the numbers
cover every worker and survive restarts, and need no metrics backend. The aggregation is
a plain function over :class:`~pipeline.contract.envelopes.Result` objects (tested
without Kafka); the scan is the dead-letter tools' bounded reader (it stops at the end
offsets seen when it started).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import Result
from pipeline.contract.topology import RESULTS
from pipeline.transport.reader import scan


@dataclass
class PromptStats:
    """One prompt version's delivered results."""

    name: str
    version: int
    results: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    unpriced: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    attempts: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def share(self, source: str) -> float:
        return self.by_source[source] / self.results if self.results else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.share("fallback")

    @property
    def review_rate(self) -> float:
        """Results a reviewer decided (approved, edited or answered)."""
        return self.share("human")

    @property
    def model_rate(self) -> float:
        return self.share("model")

    @property
    def priced(self) -> int:
        return self.results - self.unpriced

    @property
    def cost_per_result_usd(self) -> float | None:
        return self.cost_usd / self.priced if self.priced else None

    @property
    def mean_confidence(self) -> float | None:
        """Over model answers only: fallback and human results are not the model's."""
        return sum(self.confidences) / len(self.confidences) if self.confidences else None

    @property
    def mean_attempts(self) -> float:
        return self.attempts / self.results if self.results else 0.0

    def latency_ms(self, quantile: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))
        return ordered[index]

    def add(self, result: Result) -> None:
        self.results += 1
        self.by_source[result.source] += 1
        if result.model:
            self.models[result.model] += 1
        if result.usage.cost_usd is None:
            self.unpriced += result.usage.total_tokens > 0
        else:
            self.cost_usd += result.usage.cost_usd
        self.latencies_ms.append(result.latency_ms)
        self.attempts += result.attempts
        if result.source == "model":
            self.confidences.append(result.confidence)


def prompt_stats(results: Iterable[Result], name: str | None = None) -> list[PromptStats]:
    """Aggregate per prompt version, ordered by name then version."""
    table: dict[tuple[str, int], PromptStats] = {}
    for result in results:
        if name is not None and result.prompt.name != name:
            continue
        key = (result.prompt.name, result.prompt.version)
        stats = table.get(key)
        if stats is None:
            stats = table[key] = PromptStats(*key)
        stats.add(result)
    return [table[key] for key in sorted(table)]


def read_results(settings: Settings, since_ms: int | None = None) -> tuple[list[Result], int]:
    """Every result on the results topic, and how many records did not decode as one
    (reported, not hidden: only llmpipe should write there)."""
    codec = Codec()
    results: list[Result] = []
    undecodable = 0
    for record in scan(settings, [settings.topic(RESULTS)], since_ms):
        try:
            if record.value is None:
                raise DecodeError("decode_error", "empty record")
            results.append(codec.decode(record.value, Result, record.header("content-type")))
        except DecodeError:
            undecodable += 1
    return results, undecodable


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def stats_table(rows: Iterable[PromptStats]) -> Table:
    table = Table(title="prompt versions on llm.results", title_justify="left")
    columns = (
        "prompt",
        "results",
        "model",
        "fallback",
        "review",
        "mean conf",
        "attempts",
        "p50 ms",
        "p95 ms",
        "cost $",
        "$ / result",
        "models",
    )
    for column in columns:
        table.add_column(
            column, overflow="fold", justify="left" if column in ("prompt", "models") else "right"
        )
    for row in rows:
        cost = f"{row.cost_usd:.6f}" + (f" (+{row.unpriced} unpriced)" if row.unpriced else "")
        table.add_row(
            row.ref,
            str(row.results),
            _pct(row.model_rate),
            _pct(row.fallback_rate),
            _pct(row.review_rate),
            _num(row.mean_confidence, 2),
            _num(row.mean_attempts, 2),
            _num(row.latency_ms(0.5)),
            _num(row.latency_ms(0.95)),
            cost,
            _num(row.cost_per_result_usd, 7),
            ", ".join(f"{m} {n}" for m, n in row.models.most_common()),
        )
    return table


def stats_json(row: PromptStats) -> dict[str, Any]:
    return {
        "prompt": row.name,
        "version": row.version,
        "results": row.results,
        "by_source": dict(row.by_source),
        "model_rate": row.model_rate,
        "fallback_rate": row.fallback_rate,
        "review_rate": row.review_rate,
        "mean_confidence": row.mean_confidence,
        "mean_attempts": row.mean_attempts,
        "latency_ms_p50": row.latency_ms(0.5),
        "latency_ms_p95": row.latency_ms(0.95),
        "cost_usd": row.cost_usd,
        "unpriced_results": row.unpriced,
        "cost_per_result_usd": row.cost_per_result_usd,
        "models": dict(row.models),
    }
