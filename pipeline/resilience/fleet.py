"""What protects the model account, shared by the whole fleet: plain state, no Kafka.

Every worker that calls models (the model and settle stages) folds the compacted
``llm.fleet`` topic into one :class:`FleetState` and writes its own part of it. The
topic has one partition, so every worker folds the same records in the same order; each
kind of record is keyed so that compaction keeps what a worker starting later needs:

``quality:<prompt@version>:<worker>``: **quality-breaker outcomes.** The settle stage
    judges answers; the model stage decides whether to trust a prompt version. They may run
    in different processes, and even in one process the two consumer groups are assigned
    independently. So a settle stage does not feed its own process's breaker: it publishes
    its outcomes (a batch every ``flush_s``) and *every* worker, itself included, folds
    every batch into its :class:`FleetQualityBreaker`. Each worker's breaker therefore sees
    the whole fleet's answers in the same order and opens (and closes after its probes)
    within one flush and fetch of the others. A distribution monitor's trip travels the same
    way. Batches older than the breaker's open interval are ignored when a worker starts.
``endpoint:<model>``: **endpoint-breaker news.** When a worker's breaker for a model
    opens, or a probe closes it, the worker says so; the others open (or close) theirs on
    the news instead of each spending ``min_calls`` failing calls of its own (the probe
    storm). News a worker applies is not repeated. News older than the open interval is
    ignored on start.
``lease:<worker>``: **membership and demand, for rate-limit shares.** Every worker that
    calls models renews a lease every ``lease_every_s`` with, per rate-limited model, the
    calls per minute it made and whether it had to wait (it wanted more). A lease not
    renewed within ``lease_ttl_s`` has expired (a SIGKILLed worker); a stopping worker
    deletes its lease (a tombstone). Each worker computes the whole fleet's allocation from
    the same table (:func:`allocate`), so the shares add up to the account limit without
    anyone coordinating: see :class:`FleetShares`.
``spend:<UTC day>:<prompt>:<worker>``: **budget spend.** Each worker owns its key and
    writes its day's totals per prompt (tokens and dollars charged, plus what its calls in
    flight have reserved); a prompt's day is the sum over every worker key, including those
    of workers gone or restarted under a new id. A starting worker reads them back before
    it serves, so a restart (a deploy) forgets nothing: see :class:`FleetSpend`.

Ages (a lease's, a batch's, a piece of news') are the reader's wall clock minus the writer's
``at``: the workers' clocks must agree to well within the lease TTL (NTP does).

The Kafka part (following the topic, publishing records) is
:mod:`pipeline.transport.compacted`; the wiring is :mod:`pipeline.runtime.fleet`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

from pipeline.contract.envelopes import FleetEvent
from pipeline.resilience.base import SYSTEM_CLOCK, Clock
from pipeline.resilience.breaker import (
    BreakerClient,
    BreakerConfig,
    BreakerState,
    QualityBreaker,
    StateListener,
)
from pipeline.resilience.budget import PromptUsage
from pipeline.resilience.ratelimit import Demand

log = logging.getLogger("llmpipe.fleet")

QUALITY = "quality"
ENDPOINT = "endpoint"
LEASE = "lease"
SPEND = "spend"

LEASE_EVERY_S = 1.0
LEASE_TTL_S = 5.0
FLUSH_S = 0.1
IDLE_SHARE = 0.1
"""An unsaturated member's floor, as a part of an equal share: enough to notice load."""
HEADROOM = 1.25
"""An unsaturated member is allotted this much more than it used."""
GROW_AFTER_S = 1.0
"""How long a larger in-flight share must stand before it is used (see FleetShares.slots)."""
SLOT_EPOCH_S = 10.0
"""How often ties in the in-flight slot split move on to other members (no starvation)."""

Outbox = list[tuple[str, FleetEvent | None]]


def worker_id(configured: str | None = None) -> str:
    """This process's name in the fleet: the static membership id when there is one."""
    if configured:
        return configured
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def utc_day(wall: float) -> date:
    return datetime.fromtimestamp(wall, UTC).date()


# -- quality ----------------------------------------------------------------------------


class FleetQualityBreaker(QualityBreaker):
    """A :class:`QualityBreaker` fed by the fleet's outcomes instead of its own process's.

    :meth:`record` and :meth:`trip` (called by the settle stage and the distribution
    monitor) queue the outcome for the topic; :meth:`fold` applies a batch read from it.
    :meth:`allow` (the model stage) reads the folded state.
    """

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateListener | None = None,
    ) -> None:
        super().__init__(config, clock=clock, on_state_change=on_state_change)
        self._outcomes: dict[str, list[bool]] = {}
        self._trips: set[str] = set()

    @property
    def open_s(self) -> float:
        return self._config.open_s

    def record(self, prompt_ref: str, ok: bool) -> None:
        self._outcomes.setdefault(prompt_ref, []).append(ok)

    def trip(self, prompt_ref: str) -> None:
        self._trips.add(prompt_ref)

    def fold(self, prompt_ref: str, outcomes: str, trip: bool) -> None:
        """Apply one published batch: ``outcomes`` is a string of ``1`` (ok) and ``0``."""
        for outcome in outcomes:
            super().record(prompt_ref, outcome == "1")
        if trip:
            super().trip(prompt_ref)

    def drain(self) -> dict[str, tuple[str, bool]]:
        """The queued outcomes per prompt version (as a ``1``/``0`` string) and trips."""
        refs = set(self._outcomes) | self._trips
        batches = {
            ref: (
                "".join("1" if ok else "0" for ok in self._outcomes.get(ref, ())),
                ref in self._trips,
            )
            for ref in refs
        }
        self._outcomes.clear()
        self._trips.clear()
        return batches


# -- endpoint-breaker news ----------------------------------------------------------------


class EndpointNews:
    """Announces this worker's endpoint-breaker openings and closings; applies others'.

    Hook :meth:`on_state_change` into :class:`~pipeline.resilience.breaker.BreakerClient`
    and :meth:`attach` the client once it exists.
    """

    def __init__(self, config: BreakerConfig) -> None:
        self._open_s = config.open_s
        self._breakers: BreakerClient | None = None
        self._applying = False
        self._queued: dict[str, str] = {}
        self.applied = 0

    def attach(self, breakers: BreakerClient) -> None:
        self._breakers = breakers

    def on_state_change(self, model: str, old: BreakerState, new: BreakerState) -> None:
        if self._applying:
            return  # news we are applying is not news
        if new is BreakerState.OPEN:
            self._queued[model] = "open"
        elif new is BreakerState.CLOSED and old is BreakerState.HALF_OPEN:
            self._queued[model] = "closed"

    def fold(self, model: str, state: str) -> None:
        if self._breakers is None:
            return
        breaker = self._breakers.breaker(model)
        self._applying = True
        try:
            if state == "open" and breaker.state is not BreakerState.OPEN:
                breaker.trip()
                self.applied += 1
            elif state == "closed" and breaker.state is not BreakerState.CLOSED:
                breaker.close()
                self.applied += 1
        finally:
            self._applying = False

    def drain(self) -> dict[str, str]:
        queued, self._queued = self._queued, {}
        return queued

    @property
    def stale_after_s(self) -> float:
        return self._open_s


# -- rate-limit shares ------------------------------------------------------------------


def allocate(demands: Mapping[str, Demand], total: float) -> dict[str, float]:
    """Max-min fair split of ``total`` (an account-wide per-minute limit) over members.

    A saturated member (it had to wait: it wants more) asks for everything; an unsaturated
    one for what it used plus :data:`HEADROOM`, at least :data:`IDLE_SHARE` of an equal
    share. Water-filling gives each member its ask or an equal part of what is left,
    whichever is less; whatever nobody asked for is spread equally. The parts always add up
    to ``total``, and every member computes the same split from the same leases.
    """
    if not demands:
        return {}
    n = len(demands)
    floor = IDLE_SHARE * total / n

    def ask(d: Demand) -> float:
        return math.inf if d.saturated else max(d.calls_per_min * HEADROOM, floor)

    order = sorted(demands, key=lambda m: (ask(demands[m]), m))
    alloc: dict[str, float] = {}
    remaining = total
    for i, member in enumerate(order):
        fair = remaining / (n - i)
        part = min(ask(demands[member]), fair)
        alloc[member] = part
        remaining -= part
    if remaining > 1e-9:
        for member in alloc:
            alloc[member] += remaining / n
    return alloc


def split_slots(fractions: Mapping[str, float], cap: int, epoch: int) -> dict[str, int]:
    """Integer in-flight slots per member adding up to exactly ``cap`` (largest remainder).

    No floor of one per member: with fewer slots than members some member has none for a
    while (its calls wait) rather than the account cap being exceeded. Ties go by a hash of
    the member and ``epoch``, so over time they go to everyone in turn.
    """
    if not fractions:
        return {}
    exact = {m: f * cap for m, f in fractions.items()}
    slots = {m: math.floor(v + 1e-9) for m, v in exact.items()}
    left = cap - sum(slots.values())

    def tie(member: str) -> str:
        return hashlib.sha256(f"{member}/{epoch}".encode()).hexdigest()

    by_remainder = sorted(exact, key=lambda m: (-(exact[m] - slots[m]), tie(m)))
    for member in by_remainder[: max(left, 0)]:
        slots[member] += 1
    return slots


@dataclass
class _Lease:
    expires_at: float
    demands: dict[str, Demand]


class FleetShares:
    """This worker's part of each model's account-wide limit, from the live leases.

    ``fraction(model)`` is what :class:`~pipeline.resilience.ratelimit.RateLimitedClient`
    multiplies its per-minute numbers and bursts by, ``slots(model, cap)`` its in-flight
    cap. Until the lease table has been read (or with no other member) it is 1: a worker
    alone has the whole account. Its own demand comes from :meth:`set_own` (this process's
    limiter, at each heartbeat: the same numbers its lease then publishes), never from the
    topic, so a worker always counts itself.
    """

    def __init__(
        self,
        me: str,
        *,
        ttl_s: float = LEASE_TTL_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.me = me
        self._ttl_s = ttl_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._own: dict[str, Demand] = {}
        self._cache: dict[str, dict[str, float]] = {}
        self._granted: dict[str, int] = {}
        self._heard_at = clock.monotonic()
        self._growing: dict[tuple[str, int], float] = {}
        self.version = 0

    def fold(self, worker: str, value: Any, age_s: float) -> None:
        if worker == self.me:
            return
        if value is None:
            self._leases.pop(worker, None)
        elif age_s < self._ttl_s:
            demands = {
                str(model): Demand(float(d.get("rate", 0.0)), bool(d.get("saturated", False)))
                for model, d in dict(value.get("models", {})).items()
            }
            expires = self._clock.monotonic() + self._ttl_s - max(age_s, 0.0)
            self._leases[worker] = _Lease(expires, demands)
        self._changed()

    def set_own(self, demands: Mapping[str, Demand]) -> None:
        self._own = dict(demands)
        self._changed()

    def heard(self) -> None:
        """A record of any kind was folded: this worker is hearing the topic."""
        self._heard_at = self._clock.monotonic()

    def expire(self) -> bool:
        """Drop expired leases; True when that changed the membership.

        Not while this worker has heard nothing for a TTL (its own lease echoes every
        second): cut off from the broker, it cannot tell a dead worker from silence, and
        taking the whole account on a guess would overspend it."""
        now = self._clock.monotonic()
        if now - self._heard_at > self._ttl_s:
            return False
        gone = [w for w, lease in self._leases.items() if lease.expires_at <= now]
        for worker in gone:
            del self._leases[worker]
        if gone:
            log.info("fleet: leases expired: %s", ", ".join(sorted(gone)))
            self._changed()
        return bool(gone)

    def members(self) -> list[str]:
        return sorted({self.me, *self._leases})

    def fraction(self, model: str) -> float:
        return self._fractions(model).get(self.me, 1.0)

    def slots(self, model: str, cap: int) -> int:
        """This worker's in-flight slots. A decrease applies at once; an increase only once
        it has stood for :data:`GROW_AFTER_S`, by when the others have folded the lease
        that gives them fewer: so the slots in use never add up to more than the cap."""
        epoch = int(self._clock.time() // SLOT_EPOCH_S)
        target = split_slots(self._fractions(model), cap, epoch).get(self.me, cap)
        granted = self._granted.get(model)
        now = self._clock.monotonic()
        if granted is None and not self._leases:
            granted = target  # alone: nobody else holds slots
        elif granted is None or target > granted:
            since = self._growing.setdefault((model, target), now)
            if now - since < GROW_AFTER_S:
                return granted or 0
            granted = target
        else:
            granted = target
        self._granted[model] = granted
        self._growing = {k: v for k, v in self._growing.items() if k[0] != model}
        return granted

    def lease_value(self) -> dict[str, Any]:
        return {
            "models": {
                m: {"rate": round(d.calls_per_min, 3), "saturated": d.saturated}
                for m, d in self._own.items()
            }
        }

    def _fractions(self, model: str) -> dict[str, float]:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        demands = {self.me: self._own.get(model, Demand(0.0, False))}
        for worker, lease in self._leases.items():
            demands[worker] = lease.demands.get(model, Demand(0.0, False))
        fractions = allocate(demands, 1.0)
        self._cache[model] = fractions
        return fractions

    def _changed(self) -> None:
        self._cache.clear()
        self.version += 1


# -- budget spend -----------------------------------------------------------------------


def _spend_value(usage: PromptUsage) -> dict[str, Any]:
    return {
        "tokens": usage.spent,
        "reserved": usage.reserved,
        "usd": usage.spent_usd,
        "reserved_usd": usage.reserved_usd,
    }


def _spend_of(day: date, value: Any) -> PromptUsage:
    return PromptUsage(
        day,
        int(value.get("tokens", 0)),
        int(value.get("reserved", 0)),
        float(value.get("usd", 0.0)),
        float(value.get("reserved_usd", 0.0)),
    )


class FleetSpend:
    """The fleet's spend per prompt per UTC day, as :class:`~pipeline.resilience.budget.
    BudgetedClient` needs it: what every *other* worker key holds (``others``), and a
    place to report this worker's own totals (``report``), published with the next flush.

    A worker's own key is read back too (:meth:`carried`): a worker restarted under the
    same id (static membership) continues its day instead of overwriting it.
    """

    def __init__(self, me: str) -> None:
        self.me = me
        self._book: dict[tuple[date, str], dict[str, PromptUsage]] = {}
        self._dirty: dict[tuple[date, str], PromptUsage] = {}
        self.on_report: Callable[[], None] | None = None
        """Called on every report: the link publishes spend within milliseconds, not at the
        next flush, so a worker killed right after reserving has still said so."""

    def fold(self, day: date, prompt: str, worker: str, value: Any) -> None:
        if worker == self.me and (day, prompt) in self._dirty:
            return  # our own newer totals are about to be published
        entry = self._book.setdefault((day, prompt), {})
        if value is None:
            entry.pop(worker, None)
        else:
            entry[worker] = _spend_of(day, value)

    def carried(self, day: date, prompt: str) -> tuple[int, float]:
        """What this worker's own key held when it started (a restart under the same id):
        its day so far, reservations of calls cut off by the restart included (they may
        have been paid for)."""
        own = self._book.get((day, prompt), {}).get(self.me, PromptUsage(day))
        return own.spent + own.reserved, own.spent_usd + own.reserved_usd

    def others(self, day: date, prompt: str) -> tuple[int, float]:
        """Tokens and dollars charged or reserved today by every other worker key."""
        entry = self._book.get((day, prompt), {})
        tokens = sum(u.spent + u.reserved for w, u in entry.items() if w != self.me)
        usd = sum(u.spent_usd + u.reserved_usd for w, u in entry.items() if w != self.me)
        return tokens, usd

    def report(self, prompt: str, usage: PromptUsage) -> None:
        spend = replace(usage)
        self._dirty[(usage.day, prompt)] = spend
        self._book.setdefault((usage.day, prompt), {})[self.me] = spend
        if self.on_report is not None:
            self.on_report()

    def drain(self) -> dict[tuple[date, str], PromptUsage]:
        dirty, self._dirty = self._dirty, {}
        return dirty


# -- the fold ---------------------------------------------------------------------------


@dataclass
class FleetState:
    """Everything a worker folds from ``llm.fleet`` and everything it publishes there."""

    me: str
    quality: FleetQualityBreaker
    news: EndpointNews
    shares: FleetShares
    spend: FleetSpend
    clock: Clock = SYSTEM_CLOCK
    demand_source: Callable[[], Mapping[str, Demand]] | None = None
    folded: int = 0
    ignored: int = 0
    quality_batches: dict[str, int] = field(default_factory=dict)

    def apply(self, event: FleetEvent | None, key: str) -> None:
        """Fold one record (``event`` None: a tombstone for ``key``)."""
        kind, _, rest = key.partition(":")
        age_s = self.clock.time() - event.at.timestamp() if event is not None else 0.0
        self.folded += 1
        self.shares.heard()
        if kind == QUALITY and event is not None:
            ref = rest.partition(":")[0]  # name@version holds no colon; a worker id may
            if age_s > self.quality.open_s:
                self.ignored += 1
                return
            value = dict(event.value or {})
            self.quality.fold(ref, str(value.get("outcomes", "")), bool(value.get("trip")))
        elif kind == ENDPOINT and event is not None:
            if event.worker == self.me or age_s > self.news.stale_after_s:
                self.ignored += 1
                return
            self.news.fold(rest, str(dict(event.value or {}).get("state", "")))
        elif kind == LEASE:
            self.shares.fold(rest, event.value if event is not None else None, age_s)
        elif kind == SPEND:
            day_text, _, tail = rest.partition(":")
            prompt, _, worker = tail.partition(":")
            try:
                day = date.fromisoformat(day_text)
            except ValueError:
                self.ignored += 1
                return
            self.spend.fold(day, prompt, worker, event.value if event is not None else None)
        else:
            self.ignored += 1

    def flush(self) -> Outbox:
        """Quality outcomes, endpoint news and spend queued since the last flush."""
        out: Outbox = []
        now = self._now()
        for ref, (outcomes, trip) in self.quality.drain().items():
            key = f"{QUALITY}:{ref}:{self.me}"
            out.append((key, self._event(key, {"outcomes": outcomes, "trip": trip}, now)))
        for model, state in self.news.drain().items():
            key = f"{ENDPOINT}:{model}"
            out.append((key, self._event(key, {"state": state}, now)))
        for (day, prompt), spend in self.spend.drain().items():
            key = f"{SPEND}:{day.isoformat()}:{prompt}:{self.me}"
            out.append((key, self._event(key, _spend_value(spend), now)))
        return out

    def heartbeat(self) -> Outbox:
        """Renew this worker's lease (with its demand) and expire the others' stale ones."""
        if self.demand_source is not None:
            self.shares.set_own(self.demand_source())
        self.shares.expire()
        key = f"{LEASE}:{self.me}"
        return [(key, self._event(key, self.shares.lease_value(), self._now()))]

    def leave(self) -> Outbox:
        """The tombstone of this worker's lease: the others take its share at once."""
        return [(f"{LEASE}:{self.me}", None)]

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)

    def _event(self, key: str, value: Any, at: datetime) -> FleetEvent:
        return FleetEvent(key=key, worker=self.me, value=value, at=at)
