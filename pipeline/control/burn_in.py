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
   acknowledgement (which gives the claim's offset), and waits until its view has read up
   to that offset. The request's rank is the number of distinct requests of that version
   whose first claim comes before its own first claim. Rank < N: review first.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import BurnInClaim, PromptRef, utc_now
from pipeline.prompts.model import BurnInPolicy
from pipeline.prompts.registry import PromptRegistry
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients

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

    A thread follows the topic into a :class:`BurnInBook`; claims are produced with an
    idempotent producer and waited for on a small thread pool, so the event loop never
    blocks. When Kafka does not answer in time the answer is held for review (and logged):
    more review, never an unreviewed answer of a version still in burn-in.
    """

    def __init__(self, settings: Settings, codec: Codec | None = None) -> None:
        self._settings = settings
        self._topic = settings.topic(BURN_IN_TOPIC)
        self._codec = codec or Codec()
        self.book = BurnInBook()
        self._clients = KafkaClients(settings)
        self._producer = self._clients.producer(**{"linger.ms": 0})
        self._position = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="burn-in")
        self.error: BaseException | None = None
        self.claimed = 0
        """Claims this process wrote (answers it had to count itself)."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Follow the topic and wait until everything on it now has been read."""
        consumer = self._clients.consumer(
            f"{self._settings.topic_prefix}llmpipe.burn-in-reader", **{"fetch.wait.max.ms": 50}
        )
        end = _end_offset(consumer, self._topic, timeout_s)
        consumer.assign([KafkaTopicPartition(self._topic, 0, OFFSET_BEGINNING)])
        self._thread = threading.Thread(
            target=self._follow, args=(consumer,), name="burn-in-follower", daemon=True
        )
        self._thread.start()
        if not self._wait_for(end, timeout_s):
            raise BurnInUnavailable(f"{self._topic} not read to offset {end} in {timeout_s}s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._producer.flush(5)

    # -- the gate ----------------------------------------------------------------------

    async def holds(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        known = self.book.verdict(prompt, policy, request_id, utc_now())
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._claim, prompt, policy, request_id)
        except BurnInUnavailable as exc:
            log.warning("burn-in of %s unknown, holding for review: %s", prompt.ref, exc)
            return True

    def _claim(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        claim = BurnInClaim(prompt=prompt, request_id=request_id, claimed_at=utc_now())
        value, content_type = self._codec.encode(claim)
        offset = self._produce(f"{version_key(prompt)}/{request_id}".encode(), value, content_type)
        with self._changed:
            self.claimed += 1
        if not self._wait_for(offset + 1, CLAIM_TIMEOUT_S):
            raise BurnInUnavailable(f"{self._topic} not read up to the claim at {offset}")
        verdict = self.book.verdict(prompt, policy, request_id, claim.claimed_at)
        assert verdict is not None  # the claim itself has been read
        return verdict

    def _produce(self, key: bytes, value: bytes, content_type: str) -> int:
        done = threading.Event()
        result: dict[str, int | KafkaError] = {}

        def delivered(error: KafkaError | None, message: Message) -> None:
            result["outcome"] = error if error is not None else int(message.offset() or 0)
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
            if time.monotonic() > deadline:
                raise BurnInUnavailable(f"no acknowledgement from {self._topic}")
            self._producer.poll(0.05)
        outcome = result["outcome"]
        if isinstance(outcome, KafkaError):
            raise BurnInUnavailable(f"claim not written to {self._topic}: {outcome}")
        return outcome

    # -- following the topic -------------------------------------------------------------

    def _wait_for(self, position: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.error is not None:
                    return False
                self._changed.wait(min(remaining, 0.5))
            return True

    def _follow(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                try:
                    messages = consumer.consume(num_messages=500, timeout=0.1)
                except KafkaException as exc:
                    log.warning("burn-in follower: %s; retrying", exc)
                    self._stop.wait(0.5)
                    continue
                position = self._position
                for message in messages:
                    if message.error() is not None:
                        continue
                    position = max(position, int(message.offset() or 0) + 1)
                    self._apply(message)
                if position != self._position:
                    with self._changed:
                        self._position = position
                        self._changed.notify_all()
        except BaseException as exc:
            log.exception("burn-in follower stopped")
            with self._changed:
                self.error = exc
                self._changed.notify_all()
        finally:
            consumer.close()

    def _apply(self, message: Message) -> None:
        value = message.value()
        if value is None:
            return
        pairs = cast("list[tuple[str, bytes | None]]", message.headers() or [])
        try:
            claim = self._codec.decode(value, BurnInClaim, h.text(h.as_map(pairs), h.CONTENT_TYPE))
        except DecodeError as exc:
            log.error("ignoring an unreadable burn-in claim: %s", exc)
            return
        self.book.apply(claim)


def _end_offset(consumer: Consumer, topic: str, timeout_s: float) -> int:
    """Retry while a just-created topic's leader is still being elected."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(KafkaTopicPartition(topic, 0), 5.0)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise BurnInUnavailable(
                    f"{topic} does not answer; run `llmpipe topics apply`"
                ) from None
            time.sleep(0.1)


async def start_burn_in_ledger(
    settings: Settings, registry: PromptRegistry, codec: Codec | None = None
) -> KafkaBurnInLedger | None:
    """The fleet-wide burn-in counter, caught up, when some prompt version declares a
    burn-in; None otherwise. Everything that settles answers (workers, DLQ re-parse) takes
    it from here, so no path delivers an answer of a version still in burn-in unreviewed."""
    if not any(pv.review.burn_in.active for pv in registry):
        return None
    ledger = KafkaBurnInLedger(settings, codec)
    await asyncio.to_thread(ledger.start)
    return ledger
