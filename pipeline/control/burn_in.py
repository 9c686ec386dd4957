"""Burn-in counted across the fleet: the first N answers of a new prompt version, exactly.

Several settle workers answer the same prompt version at once, and any of them may crash
and restart. "Exactly the first N answers go to review" therefore needs one order that all
of them agree on and that survives restarts: the order of records in the one partition of
``llm.burn_in``. The broker appends, so it decides the order; nobody coordinates.

How a worker decides for one answer of a version in burn-in:

1. Its folded view of the topic may already settle it: the request was claimed before
   (a redelivery: the same verdict as the first time), or the version already has N
   claims and its days are over (burn-in has ended; no claim needed).
2. Otherwise it appends a :class:`BurnInClaim` for the request, waits for the broker's
   acknowledgement, and waits until its view has read a claim of the request (its own,
   or one another worker appended first: the one partition is read in order, so every
   claim before the request's first one has been read by then). The request's rank is the
   number of distinct requests of that version whose first claim comes before its own
   first claim. Rank < N: review first.

A request claimed twice (a crash between claim and commit, then a redelivery) keeps its
first rank, so two workers and a restart still hold back exactly N answers. Compaction
(the topic is keyed by version and request) only ever drops a later duplicate's earlier
copy, which changes no rank that a new claim could see.

The claim is produced outside the stage's transaction on purpose: it must stay durable
even if the transaction of the answer it counts aborts, or a retry would count anew.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from asyncio import FIRST_COMPLETED
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from confluent_kafka import KafkaError, Message

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import BurnInClaim, PromptRef, utc_now
from pipeline.prompts.model import BurnInPolicy
from pipeline.prompts.registry import PromptRegistry
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from pipeline.transport.compacted import CompactedFollower, Record, close_producer

log = logging.getLogger("llmpipe.burn_in")

BURN_IN_TOPIC = "llm.burn_in"
CLAIM_TIMEOUT_S = 30.0
CLAIM_THREADS = 8


def version_key(prompt: PromptRef) -> str:
    return f"{prompt.name}@{prompt.version}"


@dataclass
class VersionClaims:
    """What the topic says about one prompt version, in topic order."""

    ranks: dict[str, int] = field(default_factory=dict)
    claimed_at: dict[str, datetime] = field(default_factory=dict)
    first_at: datetime | None = None


class BurnInBook:
    """The folded ``llm.burn_in`` topic: plain data, thread-safe, no Kafka."""

    def __init__(self) -> None:
        self._versions: dict[str, VersionClaims] = {}
        self._lock = threading.Lock()

    def apply(self, claim: BurnInClaim) -> None:
        """Fold the next claim in topic order; only a request's first claim ranks."""
        with self._lock:
            claims = self._versions.setdefault(version_key(claim.prompt), VersionClaims())
            if claim.request_id in claims.ranks:
                return
            claims.ranks[claim.request_id] = len(claims.ranks)
            claims.claimed_at[claim.request_id] = claim.claimed_at
            if claims.first_at is None:
                claims.first_at = claim.claimed_at

    def verdict(
        self, prompt: PromptRef, policy: BurnInPolicy, request_id: str, now: datetime
    ) -> bool | None:
        """True: held for review; False: deliver; None: only a claim can tell."""
        with self._lock:
            claims = self._versions.get(version_key(prompt))
            if claims is None:
                return None
            rank = claims.ranks.get(request_id)
            at = claims.claimed_at.get(request_id, now)
            in_days = (
                policy.days > 0
                and claims.first_at is not None
                and at < claims.first_at + timedelta(days=policy.days)
            )
            if rank is not None:
                return rank < policy.answers or in_days
            if in_days:
                return True
            if policy.answers > len(claims.ranks):
                return None  # it may still be one of the first N
            return False

    def count(self, prompt: PromptRef) -> int:
        with self._lock:
            claims = self._versions.get(version_key(prompt))
            return len(claims.ranks) if claims is not None else 0


class BurnInUnavailable(Exception):
    """The burn-in topic could not be written or read in time."""


class KafkaBurnInLedger:
    """:class:`~pipeline.stages.policy.BurnInGate` on ``llm.burn_in``.

    The topic is followed into a :class:`BurnInBook` by a
    :class:`~pipeline.transport.compacted.CompactedFollower` (the one home for following a
    compacted topic), which applies records on the event loop; claims are produced with an
    idempotent producer and acknowledged on a small thread pool, so the event loop never
    blocks. When Kafka does not answer in time the answer is held for review (and logged):
    more review, never an unreviewed answer of a version still in burn-in.
    """

    def __init__(self, settings: Settings, codec: Codec | None = None) -> None:
        self._topic = settings.topic(BURN_IN_TOPIC)
        self._codec = codec or Codec()
        self.book = BurnInBook()
        self._clients = KafkaClients(settings)
        self._producer = self._clients.producer(**{"linger.ms": 0})
        self._follower = CompactedFollower(self._topic, self._apply, self._clients)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading: dict[str, list[asyncio.Future[None]]] = {}
        """Claims produced and not read back yet, by record key: their waiters."""
        self._pool = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="burn-in")
        self._closing = threading.Event()
        """Set by :meth:`stop`: a claim still waiting for its acknowledgement gives up."""
        self.claimed = 0
        """Claims this process wrote (answers it had to count itself)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Follow the topic and wait until everything on it now has been read."""
        self._task = asyncio.create_task(self._follower.run(self._stop), name="burn-in")
        ready = asyncio.create_task(self._follower.ready.wait())
        await asyncio.wait({self._task, ready}, timeout=timeout_s, return_when=FIRST_COMPLETED)
        if ready.done():
            return
        ready.cancel()
        failed = self._task.done() and not self._task.cancelled()
        cause = self._task.exception() if failed else None
        await self.stop()
        raise BurnInUnavailable(
            f"{self._topic} not read to its end in {timeout_s}s" + (f": {cause}" if cause else "")
        ) from cause

    async def stop(self) -> None:
        """Stop following and destroy the producer (:func:`close_producer`), on a thread.

        A claim whose stage task was cancelled may still be waiting on a pool thread for
        its acknowledgement: it gives up within one poll (``_closing``), and the pool is
        joined before the producer is closed, so no thread uses it while it is destroyed.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        dropped = close_producer(self._producer)
        if dropped:
            log.warning("%d burn-in claims not acknowledged at shutdown; dropped", dropped)

    # -- the gate ----------------------------------------------------------------------

    async def holds(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        known = self.book.verdict(prompt, policy, request_id, utc_now())
        if known is not None:
            return known
        try:
            return await self._claim(prompt, policy, request_id)
        except BurnInUnavailable as exc:
            log.warning("burn-in of %s unknown, holding for review: %s", prompt.ref, exc)
            return True

    async def _claim(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        """Append a claim and wait until the follower has read a claim of this request:
        its first claim (this one or an earlier one) fixes its rank."""
        claim = BurnInClaim(prompt=prompt, request_id=request_id, claimed_at=utc_now())
        value, content_type = self._codec.encode(claim)
        key = _claim_key(prompt, request_id)
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        self._reading.setdefault(key, []).append(read)
        try:
            await loop.run_in_executor(self._pool, self._produce, key.encode(), value, content_type)
            self.claimed += 1
            try:
                await asyncio.wait_for(read, CLAIM_TIMEOUT_S)
            except TimeoutError:
                raise BurnInUnavailable(f"{self._topic} not read up to the claim") from None
        finally:
            waiting = self._reading.get(key, [])
            if read in waiting:
                waiting.remove(read)
            if not waiting:
                self._reading.pop(key, None)
        verdict = self.book.verdict(prompt, policy, request_id, claim.claimed_at)
        assert verdict is not None  # a claim of the request has been read
        return verdict

    def _produce(self, key: bytes, value: bytes, content_type: str) -> None:
        done = threading.Event()
        outcome: list[KafkaError | None] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            outcome.append(error)
            done.set()

        self._producer.produce(
            self._topic,
            value=value,
            key=key,
            headers=[(h.CONTENT_TYPE, content_type.encode())],
            on_delivery=delivered,
        )
        deadline = time.monotonic() + CLAIM_TIMEOUT_S
        while not done.is_set():
            if self._closing.is_set():
                raise BurnInUnavailable(f"stopping before {self._topic} acknowledged")
            if time.monotonic() > deadline:
                raise BurnInUnavailable(f"no acknowledgement from {self._topic}")
            self._producer.poll(0.05)
        if outcome[0] is not None:
            raise BurnInUnavailable(f"claim not written to {self._topic}: {outcome[0]}")

    # -- following the topic -------------------------------------------------------------

    def _apply(self, record: Record) -> None:
        """Fold one record (on the event loop) and wake the claims waiting for it."""
        if record.value is None:
            return
        content_type = h.text(record.headers, h.CONTENT_TYPE)
        try:
            claim = self._codec.decode(record.value, BurnInClaim, content_type)
        except DecodeError as exc:
            log.error("ignoring an unreadable burn-in claim: %s", exc)
            return
        self.book.apply(claim)
        for read in self._reading.pop(_claim_key(claim.prompt, claim.request_id), []):
            if not read.done():
                read.set_result(None)


def _claim_key(prompt: PromptRef, request_id: str) -> str:
    """The record key: compaction keeps one claim per version and request."""
    return f"{version_key(prompt)}/{request_id}"


async def start_burn_in_ledger(
    settings: Settings, registry: PromptRegistry, codec: Codec | None = None
) -> KafkaBurnInLedger | None:
    """The fleet-wide burn-in counter, caught up, when some prompt version declares a
    burn-in; None otherwise. Everything that settles answers (workers, DLQ re-parse) takes
    it from here, so no path delivers an answer of a version still in burn-in unreviewed."""
    if not any(pv.review.burn_in.active for pv in registry):
        return None
    ledger = KafkaBurnInLedger(settings, codec)
    await ledger.start()
    return ledger
