"""``dlq stats``: what is in the DLQ, grouped the way an incident is investigated.

Grouping by (reason, stage, prompt version) answers "what broke" (one bad deploy usually
shows up as one group), and sorting the groups oldest first answers "what has waited
longest". Age is measured from ``x-dlq-first-failure-at``, which survives replays, so a
request that has bounced three times still shows how long its caller has been waiting.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.dlq.model import DeadLetterView, Filter
from pipeline.transport.reader import SourceRecord

AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1h", 3600.0),
    ("1h-24h", 86_400.0),
    ("1d-7d", 604_800.0),
    (">= 7d", float("inf")),
)


Ref = tuple[str, int, int]


@dataclass
class Group:
    """``replayed``: dead letters of the group that a replay sent back (counted from the
    replay records, the replayed messages' ``x-dlq-replay-source`` markers); ``replays``:
    how many such messages; ``max_replays``: the highest ``x-dlq-replay-count`` of a dead
    letter in the group (a request that failed again after that many replays)."""

    reason: str
    stage: str
    prompt: str
    count: int = 0
    replayed: int = 0
    replays: int = 0
    max_replays: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    refs: list[Ref] = field(default_factory=list)

    def add(self, view: DeadLetterView) -> None:
        self.count += 1
        self.refs.append(view.record.ref)
        self.max_replays = max(self.max_replays, view.replay_count)
        when = view.first_failure_at
        if when is not None:
            self.oldest = when if self.oldest is None else min(self.oldest, when)
            self.newest = when if self.newest is None else max(self.newest, when)


@dataclass
class Stats:
    total: int = 0
    groups: list[Group] = field(default_factory=list)
    by_reason: Counter[str] = field(default_factory=Counter)
    by_stage: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)
    by_age: Counter[str] = field(default_factory=Counter)

    first_ms: int | None = None
    """The earliest dead letter's timestamp: no replay record of these can be older."""

    def count_replays(self, records: Mapping[Ref, int]) -> None:
        """Fill in ``replayed``/``replays`` from the replay records found per dead letter."""
        for group in self.groups:
            found = [records.get(ref, 0) for ref in group.refs]
            group.replayed = sum(1 for n in found if n)
            group.replays = sum(found)

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.groups)

    @property
    def oldest(self) -> datetime | None:
        dates = [g.oldest for g in self.groups if g.oldest is not None]
        return min(dates) if dates else None

    def as_dict(self, now: datetime) -> dict[str, Any]:
        def age(moment: datetime | None) -> float | None:
            return round((now - moment).total_seconds(), 1) if moment else None

        return {
            "total": self.total,
            "replays": self.replays,
            "oldest_age_s": age(self.oldest),
            "groups": [
                {
                    "reason": g.reason,
                    "stage": g.stage,
                    "prompt": g.prompt,
                    "count": g.count,
                    "replayed": g.replayed,
                    "replays": g.replays,
                    "max_replay_count": g.max_replays,
                    "oldest": g.oldest.isoformat() if g.oldest else None,
                    "newest": g.newest.isoformat() if g.newest else None,
                    "oldest_age_s": age(g.oldest),
                }
                for g in self.groups
            ],
            "by_reason": dict(self.by_reason),
            "by_stage": dict(self.by_stage),
            "by_prompt": dict(self.by_prompt),
            "by_age": {label: self.by_age[label] for label, _ in AGE_BUCKETS},
        }


def age_bucket(seconds: float) -> str:
    for label, limit in AGE_BUCKETS:
        if seconds < limit:
            return label
    return AGE_BUCKETS[-1][0]


def collect(records: Iterable[SourceRecord], selection: Filter, now: datetime) -> Stats:
    stats = Stats()
    groups: dict[tuple[str, str, str], Group] = {}
    for record in records:
        view = DeadLetterView(record)
        if not selection.matches(view.facts()):
            continue
        stats.total += 1
        ms = record.timestamp_ms
        if ms is not None:
            stats.first_ms = ms if stats.first_ms is None else min(stats.first_ms, ms)
        key = (view.reason, view.stage, view.prompt_label)
        groups.setdefault(key, Group(*key)).add(view)
        stats.by_reason[view.reason] += 1
        stats.by_stage[view.stage] += 1
        stats.by_prompt[view.prompt_label] += 1
        when = view.first_failure_at
        stats.by_age[age_bucket((now - when).total_seconds()) if when else AGE_BUCKETS[-1][0]] += 1
    stats.groups = sorted(
        groups.values(),
        key=lambda g: (g.oldest is None, g.oldest or now, -g.count, g.reason),
    )
    return stats
