"""One stage as a Kafka group member: many messages in flight, exactly-once hops.

The runner fetches up to ``max_in_flight`` messages at a time and hands each to the stage
in its own asyncio task. In ``exactly_once`` mode a finished message's outputs wait in an
outbox; every ``commit_interval_ms`` one transaction (:mod:`pipeline.transport.delivery`)
writes the outbox and the consumed offsets, and a message counts as done only once it
committed. In ``at_least_once`` mode a message's outputs are sent as soon as the stage has
decided and it counts as done once the broker acknowledged them; every commit interval
the offsets of done messages are committed.

Offsets: the committed position is the lowest unfinished offset, and the finished offsets
above it travel in the commit metadata (:mod:`pipeline.transport.offsets`). On assignment
the runner reads them back and skips those messages, so after a crash or a rebalance only
what was unfinished is processed again.

librdkafka and asyncio: the consumer's fetches and rebalances are served on one Kafka
thread per runner (the transactional calls block too), while the stage's work runs on the
event loop. The one exception is the at-least-once offset commit, which runs on a
committer thread of its own so that the fetch never waits for it (librdkafka's clients are
thread-safe; one commit is in flight at a time, ordered with a revocation's, see
:meth:`StageRunner.commit`). Rebalance callbacks run inside
``poll()`` on that thread, and librdkafka rejoins the group only once they return, so
none of them waits for a message task without a bound. A revocation asks the loop to
finish or cancel the revoked partitions' work (within ``revoke_grace_s``, then
:data:`CANCEL_WAIT_S` for the cancelled tasks to end), then commits what is done on the
spot, before the partitions go. A loss (the partitions are someone else's already) waits
for nothing: the loop lets them go and cancels their work, and the consumer rejoins at
once. A task that outlives its partition's assignment (a cancellation it swallowed, a slow
cleanup) counts for nothing: each message remembers the assignment it was fetched in, and
its result is kept only while that assignment lasts.

Back-pressure: a full runner pauses its partitions (it keeps polling, so it stays in the
group and answers rebalances); a partition whose window of finished-but-uncommittable
offsets reaches :data:`~pipeline.transport.offsets.MAX_WINDOW` is paused alone, so the
commit metadata always fits. Per-key order for ``x-ordered`` messages: a message waits for
the previous one with the same key. Whatever a message's task raises becomes a dead
letter, so no exception can hold its partition's offsets back.

Kafka clients come from a factory (:class:`RunnerClients`; :class:`~pipeline.transport.
clients.KafkaClients` in production, a fake in unit tests), and everything the runner
reports goes through an instrumentation hook (:mod:`pipeline.transport.instrumentation`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, TopicPartition

from pipeline.contract.codec import Codec
from pipeline.contract.decisions import DeadLetter, Decision, Emit
from pipeline.contract.topology import DLQ, decoded_inputs
from pipeline.observability.redact import Redactor
from pipeline.transport import headers as h
from pipeline.transport.delivery import (
    Delivery,
    IdempotentDelivery,
    KafkaFatalError,
    Outcome,
    ProducerLike,
    TransactionalDelivery,
)
from pipeline.transport.instrumentation import Instrumentation, MessageTrace, StageInstrumentation
from pipeline.transport.message import Inbound, Outbound
from pipeline.transport.offsets import FETCH_OVERSHOOT, MAX_WINDOW, MetadataError, OffsetTracker

__all__ = ["Handler", "Inbound", "RunnerClients", "StageRunner"]

log = logging.getLogger("llmpipe.runner")

T = TypeVar("T")

STAGE_INPUTS = decoded_inputs()
"""Outputs to these are remembered by their bytes (:meth:`Codec.encode`), so the next stage
in this worker does not decode them again; a frozenset, looked up per output."""
Handler = Callable[[Inbound], Awaitable[Decision]]
DeliveryMode = Literal["exactly_once", "at_least_once"]
Partition = tuple[str, int]

POLL_TIMEOUT_S = 0.1
# A runner with nothing under way and nothing to commit waits this long in one poll: a
# message, or a rebalance (served inside the poll), still ends the wait at once, so the
# only cost is a stop taking up to this long to be noticed. At POLL_TIMEOUT_S an idle
# worker's five fetch loops woke 50 times a second for nothing.
IDLE_POLL_TIMEOUT_S = 0.5
# When every slot is busy the runner still polls (paused) this often: it stays in the
# group and answers a rebalance within this time.
FULL_POLL_INTERVAL_S = 0.5
COMMITTED_TIMEOUT_S = 10.0
# How long a new assignment may wait for its committed offsets before the worker gives up
# (well inside max.poll.interval.ms: the wait blocks this consumer's poll).
COMMITTED_DEADLINE_S = 120.0
COMMITTED_RETRY_S = 0.5
LAG_SAMPLE_INTERVAL_S = 1.0
# Finished messages waiting for their commit, per max_in_flight: beyond this (commits
# failing, e.g. while the broker is down) the runner stops fetching.
OUTBOX_FACTOR = 8
# How long a revocation waits for the tasks it cancelled to end (they normally end at
# once); one still running after it is left behind, its result counting for nothing.
CANCEL_WAIT_S = 1.0
# How long a revocation's commit waits for an at-least-once commit still in flight on the
# committer thread. librdkafka answers an offset commit made from another thread only
# after the rebalance callback that is running returns (seen on 2.16: the committer's
# commit, sent just before the revocation, came back only when its request timed out
# after 60 s), so waiting for it in the callback deadlocked the consumer for that long
# and held the whole group in PREPARING_REBALANCE.
REVOKE_COMMIT_WAIT_S = 0.5
# A consumer out of its group this long while the process's other clients reach the
# broker asks the broker for metadata (at most every ORPHAN_PROBE_S, waiting up to
# ORPHAN_PROBE_TIMEOUT_S); if it cannot, it has no broker left (see _check_orphaned).
# A rejoin after an outage normally takes about one session timeout (10 s).
ORPHAN_AFTER_S = 20.0
ORPHAN_PROBE_S = 5.0
ORPHAN_PROBE_TIMEOUT_S = 5.0
# A freeze: the process did not run for FREEZE_GAP_S or more (SIGSTOP, a paused VM or
# container, a starved machine). Its group may have given its partitions away meanwhile (a
# replacement with its static membership takes them at once; any member is expelled after
# the session timeout, clients.SESSION_TIMEOUT_MS), and librdkafka only finds out from its
# first heartbeat after the freeze, which is due at once (heartbeat.interval.ms is 1 s):
# measured, the fencing of a SIGSTOPped worker reached the runner 10-60 ms after SIGCONT.
# Meanwhile the loop would finish every task whose model answer arrived during the freeze
# and send its outputs, at least once each a duplicate of the new owner's redo (64-110 per
# bench.chaos fencing run). So at least once, output waits FREEZE_HOLD_S after a freeze
# (see _frozen): time for that heartbeat's answer to come back and for the loss (on_lost)
# or the fencing (a fatal error) to cancel the work, as it does for any loss. Nothing is
# given up on a guess: if the group did not move on (a long loop turn while librdkafka
# kept heartbeating), the hold only delays output. FREEZE_HOLD_S covers a heartbeat round
# trip and a full runner's poll interval (FULL_POLL_INTERVAL_S), the longest the loop
# takes to read what librdkafka reports. The loop notes that it runs every FREEZE_TICK_S
# while it has messages in flight; the Kafka thread notes a poll that came back a gap late.
# Why not assume the partitions lost once a gap exceeds the session timeout: a static
# replacement took them during freezes of 0.7-2.8 s (bench.chaos fencing, 2-core machine),
# and a loss assumed for a member still in its group strands the partition (librdkafka
# keeps it assigned and fetched, _accept drops its messages as not owned, and cooperative
# rebalancing never assigns it again). Freezes under FREEZE_GAP_S (one heartbeat interval)
# are not told apart from a slow loop turn on a loaded machine, and are not held.
FREEZE_GAP_S = 1.0
FREEZE_TICK_S = 0.25
FREEZE_HOLD_S = 1.5


class ConsumerLike(Protocol):
    """The confluent-kafka ``Consumer`` calls the runner makes (all on its Kafka thread)."""

    def subscribe(
        self, topics: list[str], on_assign: Any = ..., on_revoke: Any = ..., on_lost: Any = ...
    ) -> None: ...

    def poll(self, timeout: float = ...) -> Any: ...

    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Any]: ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...

    def committed(self, partitions: list[TopicPartition], timeout: float = ...) -> Any: ...

    def commit(self, *args: Any, **kwargs: Any) -> Any: ...

    def consumer_group_metadata(self) -> Any: ...

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = ..., cached: bool = ...
    ) -> tuple[int, int]: ...

    def position(self, partitions: list[TopicPartition]) -> Any: ...

    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...

    def close(self) -> None: ...


class HealthLike(Protocol):
    @property
    def outages(self) -> int: ...

    @property
    def down(self) -> bool: ...

    def ok(self) -> None: ...

    def probe_due(self, every_s: float = ...) -> bool: ...


class RunnerClients(Protocol):
    """Where a runner gets its Kafka clients: :class:`~pipeline.transport.clients.KafkaClients`."""

    @property
    def health(self) -> HealthLike: ...

    def stage_consumer(self, group: str, **overrides: Any) -> ConsumerLike: ...

    def producer(self, **overrides: Any) -> ProducerLike: ...

    def stage_producer(self) -> ProducerLike: ...

    def transactional_producer(self, transactional_id: str, **overrides: Any) -> ProducerLike: ...


@dataclass
class RunnerStats:
    """What tests and benchmarks read off a runner; operational numbers are OTel metrics."""

    max_in_flight_seen: int = 0
    skipped: int = 0  # offsets recorded as done by an earlier owner, not processed again
    commits: int = 0
    failed_commits: int = 0
    cancelled: int = 0  # in-flight messages abandoned at a revocation or shutdown


@dataclass
class _Finished:
    partition: Partition
    offset: int
    outputs: list[Outbound]
    decision: Decision | None
    trace: MessageTrace | None
    epoch: int  # the partition's assignment the message was fetched in


@dataclass
class _Plan:
    """One commit, taken on the loop (a consistent snapshot), executed on the Kafka thread."""

    finished: list[_Finished]
    offsets: list[TopicPartition]
    versions: dict[Partition, tuple[int, int]] = field(default_factory=dict)
    # The partitions' assignments when the snapshot was taken: a commit answered after a
    # partition went (and perhaps came back) records nothing for it.
    epochs: dict[Partition, int] = field(default_factory=dict)
    # Snapshots are taken in this order on the loop; a later one never says less.
    seq: int = 0

    @property
    def outputs(self) -> list[Outbound]:
        return [out for item in self.finished for out in item.outputs]


def transactional_id(group: str, instance: str | None) -> str:
    """Unique per process and stage; stable when static membership names the process, so a
    restarted worker fences its predecessor's transaction at once."""
    suffix = instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"{group}.{suffix}"


class StageRunner:
    def __init__(
        self,
        *,
        stage: str,
        input_topic: str,
        group: str,
        handler: Handler,
        clients: RunnerClients,
        codec: Codec,
        redactor: Redactor,
        topic_name: Callable[[str], str],
        max_in_flight: int = 64,
        delivery: DeliveryMode = "exactly_once",
        commit_interval_ms: int = 100,
        revoke_grace_s: float = 10.0,
        group_instance_id: str | None = None,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self.stage = stage
        self.input_topic = input_topic
        self.group = group
        self.delivery_mode = delivery
        self._handler = handler
        self._clients = clients
        self._codec = codec
        self._redactor = redactor
        self._topic_name = topic_name
        self._max_in_flight = max_in_flight
        self._commit_interval_s = commit_interval_ms / 1000
        self._revoke_grace_s = revoke_grace_s
        self._transactional_id = transactional_id(group, group_instance_id)
        self._hooks: Instrumentation = instrumentation or StageInstrumentation(stage, group)
        self._tracker = OffsetTracker()
        self._owned: set[Partition] = set()
        self._paused: set[Partition] = set()
        self._backlog: deque[Inbound] = deque()
        self._outbox: list[_Finished] = []
        # at_least_once: offsets whose outputs were delivered but never committed when
        # their partition went (lost, or its last commit failed), kept so that getting
        # the partition back skips them.
        self._sent: dict[Partition, set[int]] = {}
        # at_least_once: offsets whose outputs were on their way when their task was
        # cancelled (the partition lost or revoked), until the delivery reports say whether
        # they went out: a redo of one waits for that answer (True: delivered, skip it).
        self._in_transit: dict[tuple[Partition, int], asyncio.Future[bool]] = {}
        self._sender: IdempotentDelivery | None = None  # at_least_once: sends at once
        # Per partition, bumped when it is assigned and when a revocation lets its work
        # go: a message's result counts only within the epoch it was fetched in.
        self._epochs: dict[Partition, int] = {}
        self._tasks: dict[asyncio.Task[None], Inbound] = {}
        self._key_chains: dict[bytes, asyncio.Task[None]] = {}
        self._progress = asyncio.Event()
        self._consumer: ConsumerLike | None = None
        self._delivery: Delivery | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kafka = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{stage}")
        self._stopping = False
        self._fatal: KafkaFatalError | None = None  # found in a rebalance callback
        self._rebalances = 0  # rebalance callbacks served so far (on the Kafka thread)
        self._handed_error: Exception | None = None  # raised accepting a handed-on batch
        self._lag: list[tuple[dict[str, str | int], int]] = []
        self._last_lag_sample = 0.0
        # The commit interval runs from the start: the first commit comes one interval
        # after it, like every later one (an assigned position alone is never committed).
        self._last_commit = time.monotonic()
        self._plans = 0  # snapshots taken so far (_Plan.seq)
        # Serialises commits (the committer's and a revocation's on the Kafka thread) and
        # guards _committed_seq: the seq of the newest plan committed per partition.
        self._commit_lock = threading.Lock()
        self._committed_seq: dict[Partition, int] = {}
        # at_least_once: offset commits run on a thread of their own, one at a time, so
        # that the fetch never waits for one (see commit()).
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._commit_in_flight: asyncio.Future[Outcome | None] | None = None
        self._commit_error: BaseException | None = None
        self.stats = RunnerStats()
        self.started = asyncio.Event()
        # In the group: given its share (possibly none: more members than partitions) and
        # not lost since. Set on the Kafka thread, read by /readyz's thread.
        self.joined = False
        self._out_since = time.monotonic()  # when it last left its group (Kafka thread)
        # When the commit now running (Kafka or committer thread) began, None when none is;
        # read by /readyz's thread, which reports a commit that never returns.
        self.commit_since: float | None = None
        self._orphan_probed = 0.0
        # at_least_once freezes (see FREEZE_GAP_S): when the loop last ran (the ticker's
        # note), when the Kafka thread last saw a poll return a gap late, until when
        # output is held, and the hold's end (set) for the tasks waiting on it.
        self._alive_at = time.monotonic()
        self._ticker: asyncio.TimerHandle | None = None
        self._late_poll_at = 0.0
        self._freeze_seen_at = 0.0
        self._held_until = 0.0
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._thaw_timer: asyncio.TimerHandle | None = None

    # -- the loop ------------------------------------------------------------------------

    async def _on_kafka(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kafka, call, *args)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        consumer = await self._on_kafka(self._clients.stage_consumer, self.group)
        self._consumer = consumer
        self._delivery = self._make_delivery(consumer)
        unwatch_lag = self._hooks.watch_lag(lambda: self._lag)
        try:
            await self._on_kafka(self._delivery.start)
            await self._on_kafka(self._subscribe, consumer)
            self.started.set()
            while not stop.is_set():
                self._spawn_from_backlog()
                if not self._has_room():
                    await self._until(self._has_room, self._full_wait(), stop)
                    if not self._has_room() and self._commit_due():
                        await self.commit()  # the room a full outbox waits for
                free = self._free() if self._has_room() else 0
                owned = sorted(self._owned)
                pause = set(owned) if free <= 0 else self._windows_full()
                messages = await self._on_kafka(
                    self._fetch,
                    consumer,
                    min(free, FETCH_OVERSHOOT),
                    self._poll_timeout(),
                    pause,
                    owned,
                )
                if self._handed_error is not None:
                    raise self._handed_error
                if self._commit_error is not None:
                    raise self._commit_error
                self._accept(messages)
                if self._commit_due():
                    await self.commit()
            self._stopping = True
            await self._drain(None, self._revoke_grace_s)
            await self.commit(wait=True)
        finally:
            self._stopping = True
            unwatch_lag()
            for timer in (self._ticker, self._thaw_timer):
                if timer is not None:
                    timer.cancel()
            await self._cancel(set(self._tasks))
            # close() revokes what is still assigned: the callback commits what is done.
            with contextlib.suppress(Exception):
                await self._on_kafka(consumer.close)
            with contextlib.suppress(Exception):
                await self._on_kafka(self._delivery.close)
            self._kafka.shutdown(wait=False)
            if self._committer is not None:
                self._committer.shutdown(wait=False)

    def _make_delivery(self, consumer: ConsumerLike) -> Delivery:
        if self.delivery_mode == "exactly_once":
            tid = self._transactional_id
            health = self._clients.health
            return TransactionalDelivery(
                lambda: self._clients.transactional_producer(tid),
                consumer,
                outages=lambda: health.outages,
                name=self.stage,
            )
        self._sender = IdempotentDelivery(self._clients.stage_producer, consumer, name=self.stage)
        self._committer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"commit-{self.stage}"
        )
        return self._sender

    def _subscribe(self, consumer: ConsumerLike) -> None:
        consumer.subscribe(
            [self.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _free(self) -> int:
        return self._max_in_flight - len(self._tasks) - len(self._backlog)

    def _has_room(self) -> bool:
        return self._free() > 0 and len(self._outbox) < OUTBOX_FACTOR * self._max_in_flight

    def _poll_timeout(self) -> float:
        """Short while work is under way, so a finished message is committed on time."""
        if not self._has_room():
            return 0.0
        if self._outbox or self._tracker_changed():  # something to commit: until it is due
            due = self._last_commit + self._commit_interval_s - time.monotonic()
            return max(0.0, min(POLL_TIMEOUT_S, due))
        if self._tasks or self._backlog:  # work under way: back soon to commit what ends
            return min(POLL_TIMEOUT_S, self._commit_interval_s / 4)
        return IDLE_POLL_TIMEOUT_S

    def _full_wait(self) -> float:
        """How long a full runner waits for room before it polls (paused) again: at most
        :data:`FULL_POLL_INTERVAL_S`, and, exactly once, no later than its next commit is
        due while finished messages wait in the outbox: a full outbox is room only that
        commit makes (the loop commits before polling). A stage finishing more than
        ``OUTBOX_FACTOR x max_in_flight`` messages per commit interval otherwise waited out
        the whole interval for a room that could not come (measured: one runner relaying
        with 64 in flight, ~700 msg/s, a commit every ~400 ms instead of every 100)."""
        if self._outbox:
            due = self._last_commit + self._commit_interval_s - time.monotonic()
            return max(0.0, min(FULL_POLL_INTERVAL_S, due))
        return FULL_POLL_INTERVAL_S

    def _tracker_changed(self) -> bool:
        return any(self._tracker.changed(*tp) for tp in self._owned)

    def _commit_due(self) -> bool:
        if time.monotonic() - self._last_commit < self._commit_interval_s:
            return False
        return bool(self._outbox) or self._tracker_changed()

    def _windows_full(self) -> set[Partition]:
        return {tp for tp in self._owned if self._tracker.window(*tp) >= MAX_WINDOW}

    async def _until(
        self, condition: Callable[[], bool], timeout_s: float, stop: asyncio.Event | None = None
    ) -> bool:
        """Wait until ``condition`` holds, re-checking whenever a message finishes."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if stop is not None and stop.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    # -- on the Kafka thread -------------------------------------------------------------

    def _fetch(
        self,
        consumer: ConsumerLike,
        count: int,
        timeout_s: float,
        wanted: set[Partition],
        owned: list[Partition],
    ) -> list[Any]:
        """Pause what must not be fetched, then take up to ``count`` messages within
        ``timeout_s`` (polling also serves rebalances).

        Each batch librdkafka has ready is handed to the loop as it arrives (one loop
        callback, :meth:`_hand_on`) while this call goes on polling, and the call returns
        (with its last batch) once ``count`` messages were taken or at ``timeout_s``, and
        no later than :data:`POLL_TIMEOUT_S` after it began once it handed some on: an
        idle runner asks for a long :data:`IDLE_POLL_TIMEOUT_S`, and what arrives must
        still be committed on time (a commit runs only between fetches). Returning
        sooner than that cost CPU at light load: about one more fetch per message and
        stage (20 req/s: 7.7-9.1 -> 9.4-11.9 ms of CPU per request). A message trickling
        in therefore costs one hand-over, not a round trip of this thread per fetch
        (about 30 µs of CPU, measured): at a steady load each stage received about one
        message per fetch. ``count`` is the room the loop had when it
        asked; the room only grows meanwhile (only these messages take slots), so the
        in-flight bound holds. A rebalance ends the call: the loop then decides afresh
        what to pause.

        ``wanted`` (the partitions to keep paused) and ``owned`` are computed on the loop,
        which owns the bookkeeping; this thread only talks to librdkafka. ``_paused`` is
        what this consumer has paused in librdkafka, kept on this thread only.
        """
        pause = wanted - self._paused
        resume = self._paused - wanted
        if pause:
            consumer.pause([TopicPartition(t, p) for t, p in sorted(pause)])
        if resume:
            consumer.resume([TopicPartition(t, p) for t, p in sorted(resume)])
        self._paused = set(wanted)
        started = time.monotonic()
        deadline = started + timeout_s
        rebalances = self._rebalances
        taken = 0
        drained = False  # the local queue was empty at the last consume()
        while True:
            room = max(count - taken, 1)
            # consume() waits for a full batch or the timeout; poll() returns on the first
            # message, then whatever else is already fetched comes without waiting.
            asked = time.monotonic()
            messages: list[Any] = [] if drained else consumer.consume(room, 0)
            remaining = deadline - time.monotonic()
            if not messages and remaining > 0:
                first = consumer.poll(remaining)
                if first is not None:
                    messages = [first]
                    if room > 1:
                        messages += consumer.consume(room - 1, 0)
            self._note_late_poll(asked, max(remaining, 0.0), rebalances)
            if self._fatal is not None:
                raise self._fatal
            drained = len(messages) < room
            taken += len(messages)
            if taken >= count or self._rebalances != rebalances:
                break
            if messages:
                self._hand_on(messages)
                messages = []
                # Work under way now: back within a short poll's time, to commit it.
                deadline = min(deadline, started + POLL_TIMEOUT_S)
            if deadline - time.monotonic() <= 0:
                break
        self._sample_lag(consumer, owned)
        if not taken and owned and self._clients.health.probe_due():
            self._probe(consumer, owned[0])
        if not self.joined:
            self._check_orphaned(consumer)
        return messages

    def _note_late_poll(self, asked: float, timeout_s: float, rebalances: int) -> None:
        """On the Kafka thread: a poll that returned :data:`FREEZE_GAP_S` past its timeout
        without serving a rebalance callback (which may legitimately take that long) means
        the process did not run meanwhile; the loop holds output before it takes what this
        poll fetched (:meth:`_frozen`). It covers a runner with nothing in flight, whose
        loop notes nothing while it waits for the fetch."""
        now = time.monotonic()
        if now - asked - timeout_s >= FREEZE_GAP_S and self._rebalances == rebalances:
            self._late_poll_at = now

    def _check_orphaned(self, consumer: ConsumerLike) -> None:
        """Exit (:class:`KafkaFatalError`) if this consumer has lost every broker.

        librdkafka 2.16 can leave a client with no broker to talk to after a broker
        restart: when every connection fails it re-bootstraps, dropping its learned
        broker handles, and now and then (a race with the broker coming back) no handle
        is left that ever connects again (related upstream: confluentinc/librdkafka#5301,
        open). Seen in the worker-endpoints test and reproduced with repeated 8-14 s
        outages of one broker (4 of about 60): the consumer's debug log says "Group
        coordinator decommissioned", then only "no broker available for coordinator
        query" with no connection attempt for minutes; its thread polls on, and it never
        rejoins its group while the process's other clients, and the other process,
        work. Only a new client recovers, so the worker exits and its supervisor (or
        orchestrator) starts a fresh process, which resumes from the committed offsets.

        Asked only when the consumer has been out of its group for
        :data:`ORPHAN_AFTER_S` while the process is not in an outage (another client
        reached the broker since the last failure): a metadata request this consumer
        cannot make then is not the broker's doing, and one it can make clears it."""
        now = time.monotonic()
        if (
            now - self._out_since < ORPHAN_AFTER_S
            or now - self._orphan_probed < ORPHAN_PROBE_S
            or self._clients.health.down
        ):
            return
        self._orphan_probed = now
        try:
            consumer.list_topics(self.input_topic, timeout=ORPHAN_PROBE_TIMEOUT_S)
        except KafkaException as exc:
            if self._clients.health.down:  # an outage began meanwhile: not orphaned
                return
            raise KafkaFatalError(
                f"stage {self.stage}: out of its group for {now - self._out_since:.0f} s "
                f"and its consumer reaches no broker ({exc}) while this process's other "
                "clients do (librdkafka has no broker handle left after the broker "
                "restarted); exiting so that a fresh process rejoins"
            ) from exc

    def _hand_on(self, messages: list[Any]) -> None:
        """Give fetched messages to the loop while the fetch goes on (from this thread)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._accept_handed, messages)

    def _accept_handed(self, messages: list[Any]) -> None:
        """:meth:`_accept` from a loop callback: what it raises (a fatal consumer error)
        is kept for :meth:`run`, which raises it when the fetch returns."""
        try:
            self._accept(messages)
        except Exception as exc:
            if self._handed_error is None:
                self._handed_error = exc

    def _probe(self, consumer: ConsumerLike, partition: Partition) -> None:
        """One request to a partition leader during an outage (metadata could come from
        the client's cache): its success ends the outage."""
        try:
            consumer.get_watermark_offsets(TopicPartition(*partition), timeout=1.0, cached=False)
        except KafkaException:
            return
        self._clients.health.ok()

    def _sample_lag(self, consumer: ConsumerLike, owned: list[Partition]) -> None:
        """Lag per partition = high watermark - position, both local to the client."""
        now = time.monotonic()
        if now - self._last_lag_sample < LAG_SAMPLE_INTERVAL_S:
            return
        self._last_lag_sample = now
        tps = [TopicPartition(t, p) for t, p in owned]
        samples: list[tuple[dict[str, str | int], int]] = []
        try:
            positions = consumer.position(tps) if tps else []
            for tp in positions:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset < 0 or high is None or high < 0:
                    continue
                attributes = self._hooks.lag_attributes(tp.topic, tp.partition)
                samples.append((attributes, max(0, high - tp.offset)))
        except KafkaException:
            return
        self._lag = samples

    def _on_assign(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        """Read the committed offsets with their metadata: what an earlier owner finished."""
        self.joined = True
        self._rebalances += 1
        if not partitions:
            return
        try:
            committed = self._read_committed(consumer, partitions)
        except KafkaFatalError as exc:
            # Raised after poll() returns, not through librdkafka's callback machinery
            # (an exception escaping a rebalance callback taints later client calls,
            # confluent-kafka-python#729); the partitions are never marked as owned.
            self._fatal = exc
            return
        self._call_loop(self._assigned(committed))

    def _read_committed(
        self, consumer: ConsumerLike, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        """The committed offsets and metadata of newly assigned partitions, retried until read.

        Never given up on quietly: without the metadata the finished offsets above the
        committed one would be processed again, and their outputs, already committed,
        would be duplicates. Right after a broker restart the group coordinator answers
        ``NOT_COORDINATOR`` or ``COORDINATOR_LOAD_IN_PROGRESS`` for a while, and a
        transaction left open by a dead producer makes the offsets unstable until the broker
        aborts it (``transaction.timeout.ms``); past :data:`COMMITTED_DEADLINE_S` the
        worker exits (:class:`KafkaFatalError`) rather than redo committed work.
        """
        deadline = time.monotonic() + COMMITTED_DEADLINE_S
        read: dict[Partition, TopicPartition] = {}
        pending = list(partitions)
        warned = False
        while True:
            failure: object = None
            try:
                result = consumer.committed(pending, timeout=COMMITTED_TIMEOUT_S)
            except KafkaException as exc:
                failure = exc
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.fatal():
                    raise KafkaFatalError(f"stage {self.stage}: {error.str()}") from exc
            else:
                for tp in result:
                    if tp.error is None:
                        read[(tp.topic, tp.partition)] = tp
                    else:
                        failure = tp.error
                pending = [tp for tp in pending if (tp.topic, tp.partition) not in read]
            if not pending:
                return [read[(tp.topic, tp.partition)] for tp in partitions]
            if time.monotonic() > deadline:
                raise KafkaFatalError(
                    f"stage {self.stage}: committed offsets of {len(pending)} assigned "
                    f"partitions unreadable for {COMMITTED_DEADLINE_S:.0f} s ({failure}); "
                    "exiting rather than redo committed work"
                )
            if not warned:
                log.warning(
                    "stage %s: committed offsets unreadable (%s); retrying before consuming",
                    self.stage,
                    failure,
                )
                warned = True
            time.sleep(COMMITTED_RETRY_S)

    def _unpause(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        """Let revoked or lost partitions go unpaused.

        librdkafka keeps a partition's pause flag across its revocation and a later
        re-assignment (checked on 2.16: a partition paused while full, revoked, then
        assigned again fetches nothing until resumed). The runner only pauses partitions
        it owns, so one that comes back would stay paused for good: after a broker outage
        that ended every stage's session while it was full, the worker took no more work.
        """
        going = {(tp.topic, tp.partition) for tp in partitions} & self._paused
        if going:
            consumer.resume([TopicPartition(t, p) for t, p in sorted(going)])
            self._paused -= going

    def _on_revoke(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        """Finish (or cancel) the revoked partitions' work, commit what is done, let go."""
        self._rebalances += 1
        self._unpause(consumer, partitions)
        revoked = {(tp.topic, tp.partition) for tp in partitions} & self._owned
        if not revoked:
            return
        plan = self._call_loop(self._prepare_revocation(revoked))
        outcome = self._execute(plan, wait_s=REVOKE_COMMIT_WAIT_S)
        self._call_loop(self._committed(plan, outcome, revoked))

    def _on_lost(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        """Partitions already owned by someone else: nothing may be committed for them.

        Waits for nothing, so that librdkafka rejoins the group at once. This callback
        used to wait until the loop had cancelled the partitions' tasks and each had
        ended: one that took its time winding down held the consumer out of its groups
        for as long, in a broker outage that ended every session with work in flight.
        The loop lets the partitions go (:meth:`_lose`) before anything this thread hands
        it later: its callbacks run in the order this thread schedules them, and the loop
        plans its next commit only after the current fetch returned to it, so no commit
        can cover a lost partition."""
        self.joined = False  # out of the group until it rejoins and is assigned again
        self._out_since = time.monotonic()
        self._rebalances += 1
        self._unpause(consumer, partitions)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._lose, {(tp.topic, tp.partition) for tp in partitions})

    def _call_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _execute(self, plan: _Plan | None, wait_s: float | None = None) -> Outcome | None:
        """Commit ``plan`` (on the Kafka thread, or the committer's).

        One commit at a time, and never an older snapshot after a newer one: a
        revocation's commit waits here for an at-least-once commit still in flight, and
        a partition that a newer plan already committed is left out of an older one (the
        commit queued behind the revocation's), so its committed offset never moves back.
        A revocation waits at most ``wait_s`` (:data:`REVOKE_COMMIT_WAIT_S`) and then
        commits beside the one in flight: librdkafka sends a consumer's commits in the
        order they were made, over its one coordinator connection, so the older still
        lands first.
        """
        if plan is None or self._delivery is None:
            return None
        locked = self._commit_lock.acquire(timeout=-1 if wait_s is None else wait_s)
        if not locked:
            log.info("stage %s: revocation commits beside a commit still in flight", self.stage)
        try:
            stale = {tp for tp in plan.versions if self._committed_seq.get(tp, -1) > plan.seq}
            if stale:
                plan.offsets = [tp for tp in plan.offsets if (tp.topic, tp.partition) not in stale]
                plan.versions = {tp: v for tp, v in plan.versions.items() if tp not in stale}
            self.commit_since = time.monotonic()
            try:
                outcome = self._delivery.commit(plan.outputs, plan.offsets, lambda: self._stopping)
            finally:
                self.commit_since = None
            if outcome is Outcome.COMMITTED:
                for tp in plan.versions:
                    self._committed_seq[tp] = max(self._committed_seq.get(tp, -1), plan.seq)
            return outcome
        finally:
            if locked:
                self._commit_lock.release()

    # -- on the loop ---------------------------------------------------------------------

    async def _assigned(self, committed: Sequence[TopicPartition]) -> None:
        skipped: dict[str, int] = {}  # partition -> offsets done above its committed one
        for tp in committed:
            key = (tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else None
            # Delivered by this worker but never committed (at_least_once: the commit
            # failed, e.g. its session timed out in a broker outage): done all the same.
            sent = self._sent.pop(key, set())
            try:
                skip = self._tracker.assign(
                    tp.topic, tp.partition, position, tp.metadata or "", sent
                )
            except MetadataError as exc:
                log.warning(
                    "stage %s: %s/%d commit metadata not ours (%s); redoing from the offset",
                    self.stage,
                    tp.topic,
                    tp.partition,
                    exc,
                )
                skip = self._tracker.assign(tp.topic, tp.partition, position, "", sent)
            self._owned.add(key)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            if skip:
                skipped[f"{tp.topic}/{tp.partition}@{position}"] = skip
        self._end_hold()
        if skipped:  # one line per assignment: a rejoin after an outage assigns them all
            log.info(
                "stage %s: %d partitions assigned, %d offsets above their committed ones "
                "already done (skipped when they arrive)",
                self.stage,
                len(committed),
                sum(skipped.values()),
                extra={"already_done": skipped},
            )

    def _accept(self, messages: list[Any]) -> None:
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal() or error.code() == KafkaError._FATAL:
                    # e.g. a static member fenced by its own rejoin after a long outage
                    # (librdkafka#3437): the consumer will never fetch again.
                    raise KafkaFatalError(f"stage {self.stage}: consumer failed: {error.str()}")
                if error.code() != KafkaError._PARTITION_EOF:
                    log.debug("stage %s: consume error %s", self.stage, error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            key = (topic, partition)
            if key not in self._owned:
                continue  # fetched just before a revocation
            self._tracker.start(topic, partition, offset)
            if self._tracker.is_done(topic, partition, offset):
                self._tracker.done(topic, partition, offset)
                self.stats.skipped += 1
                continue
            kind, timestamp = message.timestamp()
            self._backlog.append(
                Inbound(
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp,
                    key=message.key(),
                    value=message.value(),
                    headers=h.as_map(message.headers()),
                )
            )
        if messages:
            self._clients.health.ok()
        self._spawn_from_backlog()

    def _frozen(self) -> bool:
        """Whether output must wait (at least once): a freeze (:data:`FREEZE_GAP_S`) was
        just noticed, or is still held out. Asked before every send and every spawn, and
        by the ticker, so that whichever of them runs first after a freeze notices it,
        before anything is sent or started: the hold begins there."""
        if self._sender is None:
            return False
        now = time.monotonic()
        if self._ticker is not None and now - self._alive_at >= FREEZE_GAP_S:
            self._hold(now, now - self._alive_at)
        elif self._late_poll_at > self._freeze_seen_at:
            self._hold(now, None)
        return now < self._held_until

    def _hold(self, now: float, gap_s: float | None) -> None:
        """Hold output for :data:`FREEZE_HOLD_S`: a loss or fencing that librdkafka reports
        meanwhile cancels the held work (:meth:`_lose`, or :meth:`run` ending on the fatal
        error); otherwise :meth:`_thaw` lets it go on."""
        log.warning(
            "stage %s: the process did not run for %s (stopped, or starved of CPU): output "
            "held %.1f s, so that a lost membership is reported before anything is sent",
            self.stage,
            "a poll's wait" if gap_s is None else f"{gap_s:.1f} s",
            FREEZE_HOLD_S,
        )
        self._alive_at = self._freeze_seen_at = now
        self._held_until = now + FREEZE_HOLD_S
        self._thawed.clear()
        if self._thaw_timer is None:
            self._thaw_timer = asyncio.get_running_loop().call_later(FREEZE_HOLD_S, self._thaw)

    def _thaw(self) -> None:
        """The hold is over (unless a later freeze extended it): the held tasks send, the
        backlog is spawned; stopping, the backlog is left to the partitions' next owner."""
        self._thaw_timer = None
        remaining = self._held_until - time.monotonic()
        if remaining > 0:
            self._thaw_timer = asyncio.get_running_loop().call_later(remaining, self._thaw)
            return
        self._thawed.set()
        if self._stopping:
            self._backlog.clear()
        else:
            self._spawn_from_backlog()
        self._progress.set()

    def _end_hold(self) -> None:
        """librdkafka has reported on the group since the freeze (a rebalance callback,
        served on the loop): the hold has done its work. After a loss the held work is
        cancelled already; an assignment or a revocation says the member is in the group."""
        if self._thaw_timer is None:
            return
        self._thaw_timer.cancel()
        self._held_until = time.monotonic()
        self._thaw()

    def _tick(self) -> None:
        """Every :data:`FREEZE_TICK_S` while messages are in flight (at least once): the
        loop ran. A tick that comes a gap late notices the freeze."""
        self._frozen()
        self._alive_at = time.monotonic()
        self._ticker = None
        if self._tasks and self._loop is not None:
            self._ticker = self._loop.call_later(FREEZE_TICK_S, self._tick)

    def _spawn_from_backlog(self) -> None:
        if self._frozen():  # the hold's end spawns them, unless their partitions went
            return
        while self._backlog and len(self._tasks) < self._max_in_flight:
            self._spawn(self._backlog.popleft())

    def _spawn(self, inbound: Inbound) -> None:
        ordered = inbound.key is not None and h.ORDERED in inbound.headers
        previous = self._key_chains.get(inbound.key) if ordered and inbound.key else None
        epoch = self._epochs.get((inbound.topic, inbound.partition), 0)
        loop = self._loop
        assert loop is not None, "run() first"
        # The loop kept by run(), never asyncio.create_task: on Python 3.11 each
        # get_running_loop() is a getpid() system call, a few per message per stage.
        task = loop.create_task(self._process(inbound, previous, epoch))
        if ordered and inbound.key is not None:
            self._key_chains[inbound.key] = task
        self._tasks[task] = inbound
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(self._tasks))
        task.add_done_callback(self._task_done)
        if self._sender is not None and self._ticker is None:
            self._alive_at = time.monotonic()
            self._ticker = loop.call_later(FREEZE_TICK_S, self._tick)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        inbound = self._tasks.pop(task, None)
        if (
            inbound is not None
            and inbound.key is not None
            and (self._key_chains.get(inbound.key) is task)
        ):
            del self._key_chains[inbound.key]
        if task.cancelled():
            self.stats.cancelled += 1
        self._progress.set()

    async def _process(
        self, inbound: Inbound, previous: asyncio.Task[None] | None, epoch: int
    ) -> None:
        """Handle one message. Only cancellation leaves it unfinished (to be redone), and
        so does the end of the assignment it was fetched in (``epoch``)."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if self._in_transit and await self._delivered_before(inbound, epoch):
            return  # (the check first: nothing is in transit but after a loss)
        try:
            with self._hooks.message(inbound) as trace:
                decision = await self._decide(inbound, trace)
                decision, outputs = self._outputs(inbound, decision, trace)
                trace.decided(decision)
            finished = _Finished(
                (inbound.topic, inbound.partition), inbound.offset, outputs, decision, trace, epoch
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug outside the stage: one dead letter, never a stall
            log.exception(
                "stage %s: message task failed on %s/%s@%s",
                self.stage,
                inbound.topic,
                inbound.partition,
                inbound.offset,
            )
            finished = _Finished(
                (inbound.topic, inbound.partition),
                inbound.offset,
                [self._bare_dead_letter(inbound, exc)],
                None,
                None,
                epoch,
            )
        held = False
        while self._frozen():  # at_least_once, after a freeze: the group may have moved on
            held = True
            await self._thawed.wait()
        if held and self._stopping:
            # Stopped meanwhile (another stage of the worker fenced, a SIGTERM): this
            # runner no longer polls, so no loss would reach it; left to the next owner.
            return
        if self._sender is not None and self._live(finished.partition, epoch):
            # at_least_once: out now; done once acknowledged (a cancelled send is redone,
            # unless its outputs turn out delivered all the same: then it is skipped).
            await self._send(finished)
            if not self._live(finished.partition, epoch):  # went while they were on their way
                self._delivered_late(finished)
                return
        self._finish(finished)

    async def _send(self, finished: _Finished) -> None:
        """at_least_once: deliver a message's outputs; if the task is cancelled meanwhile,
        the message stays in transit until the delivery reports tell whether they went
        (a future made only then: most sends are never cancelled)."""
        assert self._sender is not None and self._loop is not None
        key = (finished.partition, finished.offset)
        settled_early = False

        def settled(delivered: bool) -> None:
            nonlocal settled_early
            settled_early = True
            if delivered:
                self._delivered_late(finished)
            transit = self._in_transit.pop(key, None)
            if transit is not None:
                transit.set_result(delivered)

        try:
            await self._sender.send(finished.outputs, settled)
        except asyncio.CancelledError:
            if not settled_early:
                self._in_transit[key] = self._loop.create_future()
            raise

    async def _delivered_before(self, inbound: Inbound, epoch: int) -> bool:
        """A redo of a message whose earlier outputs are still in transit (the partition
        was lost in a broker outage with them queued, and came back before the broker
        acknowledged them) waits for their delivery reports: delivered, it is done
        without being handled again; not delivered, it is redone. Without the wait it
        raced them: redone first, its outputs went out twice."""
        transit = self._in_transit.get(((inbound.topic, inbound.partition), inbound.offset))
        if transit is None:
            return False
        if not await asyncio.shield(transit):
            return False
        tp = (inbound.topic, inbound.partition)
        if self._live(tp, epoch):
            self._tracker.done(*tp, inbound.offset)
            self.stats.skipped += 1
        return True

    def _delivered_late(self, finished: _Finished) -> None:
        """A message's outputs acknowledged after its task was cancelled because its
        partition went (lost in a broker outage, its outputs queued until the broker came
        back): remember it as done, so the partition's next assignment skips it, and
        record its outcome: those outputs are durable now, and no redo will record it."""
        if finished.trace is not None and finished.decision is not None:
            finished.trace.committed(finished.decision)
        tp, offset = finished.partition, finished.offset
        if tp not in self._owned:
            self._sent.setdefault(tp, set()).add(offset)
        elif self._epochs.get(tp, 0) != finished.epoch:  # back: skipped when it arrives
            self._tracker.add_done(*tp, offset)

    def _finish(self, finished: _Finished) -> None:
        if not self._live(finished.partition, finished.epoch):
            return  # revoked or lost meanwhile: its next owner redoes it
        if self._sender is None:
            self._outbox.append(finished)  # exactly_once: written by the next transaction
        elif finished.trace is not None and finished.decision is not None:
            finished.trace.committed(finished.decision)  # delivered: durable
        self._tracker.done(*finished.partition, finished.offset)

    async def _decide(self, inbound: Inbound, trace: MessageTrace) -> Decision:
        try:
            return await self._handler(inbound)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a stage must cost one dead letter, not the worker
            log.exception(
                "stage %s failed on %s/%s@%s",
                self.stage,
                inbound.topic,
                inbound.partition,
                inbound.offset,
            )
            trace.failed(exc)
            return DeadLetter(
                self.stage,
                "internal_error",
                type(exc).__name__,
                str(exc),
                h.text(inbound.headers, h.REQUEST_ID),
            )

    def _outputs(
        self, inbound: Inbound, decision: Decision, trace: MessageTrace
    ) -> tuple[Decision, list[Outbound]]:
        """Encode before routing: a value Avro cannot hold (a lone surrogate from model text,
        a token count beyond a long) turns into a dead letter instead of a stuck offset.
        One output per ``decision.outputs()`` (a result and its audit copy, say), all in the
        same commit."""
        if isinstance(decision, Emit):
            try:
                encoded = [
                    self._codec.encode(out.envelope, remember=out.topic in STAGE_INPUTS)
                    for out in decision.outputs()
                ]
            except Exception as exc:  # fastavro raises several unrelated types on bad values
                message = f"{decision.topic} envelope cannot be encoded: {exc}"[:500]
                decision = DeadLetter(
                    self.stage,
                    "unencodable",
                    type(exc).__name__,
                    message,
                    decision.request_id,
                    decision.prompt,
                )
            else:
                key = inbound.key if inbound.key is not None else decision.request_id.encode()
                outputs = []
                for out, (value, content_type) in zip(decision.outputs(), encoded, strict=True):
                    topic = self._topic_name(out.topic)
                    headers = h.output_headers(
                        out.request_id,
                        out.prompt,
                        out.route,
                        content_type,
                        trace.output_trace(out.topic, topic, key, out.route, out.request_id),
                        out.reason,
                        inbound.headers,
                    )
                    outputs.append(Outbound(topic, key, value, headers))
                return decision, outputs
        assert isinstance(decision, DeadLetter)
        dlq = self._topic_name(DLQ)
        trace_headers = trace.output_trace(
            DLQ, dlq, inbound.key, decision.route, decision.request_id
        )
        return decision, [self._dead_letter(inbound, decision, trace_headers)]

    def _dead_letter(
        self, inbound: Inbound, decision: DeadLetter, trace_headers: dict[str, str]
    ) -> Outbound:
        headers = h.dead_letter_headers(
            inbound.headers,
            topic=inbound.topic,
            partition=inbound.partition,
            offset=inbound.offset,
            timestamp_ms=inbound.timestamp_ms,
            group=self.group,
            stage=decision.stage,
            reason=decision.reason,
            error_class=decision.error_class,
            error_message=self._redactor.text(decision.message),
            attempts=decision.attempts,
            request_id=decision.request_id,
            prompt=decision.prompt,
        )
        # The dead letter continues the request's trace (same trace id as the original's
        # traceparent, if it had one), so a replay from the DLQ joins that trace too.
        if trace_headers:
            headers = [(k, v) for k, v in headers if k not in trace_headers]
            headers += [(k, v.encode()) for k, v in trace_headers.items()]
        log.info(
            "dead-lettered",
            extra={
                "stage": decision.stage,
                "reason": decision.reason,
                "error_class": decision.error_class,
                "detail": decision.message[: h.MAX_ERROR_MESSAGE],
                "request_id": decision.request_id,
            },
        )
        return Outbound(self._topic_name(DLQ), inbound.key, inbound.value, headers)

    def _bare_dead_letter(self, inbound: Inbound, exc: Exception) -> Outbound:
        """The last resort: the original message and its provenance, nothing that can fail."""
        decision = DeadLetter(
            self.stage,
            "internal_error",
            type(exc).__name__,
            type(exc).__name__,
            h.text(inbound.headers, h.REQUEST_ID),
        )
        try:
            return self._dead_letter(inbound, decision, {})
        except Exception:
            headers = [(name, value) for name, value in inbound.headers.items()]
            headers += [(h.DLQ_STAGE, self.stage.encode()), (h.DLQ_REASON, b"internal_error")]
            return Outbound(self._topic_name(DLQ), inbound.key, inbound.value, headers)

    # -- commits -------------------------------------------------------------------------

    def _plan(self, only: set[Partition] | None = None) -> _Plan | None:
        """A consistent snapshot of what to commit: every finished message's outputs and
        every owned partition's position (which covers exactly those messages)."""
        keep = self._owned if only is None else self._owned & only
        finished = [f for f in self._outbox if f.partition in keep]
        self._outbox = [f for f in self._outbox if f.partition not in keep]
        offsets: list[TopicPartition] = []
        versions: dict[Partition, tuple[int, int]] = {}
        for tp in sorted(keep):
            point = self._tracker.commit_point(*tp)
            if point is None:
                continue
            offsets.append(TopicPartition(tp[0], tp[1], point.position, metadata=point.metadata))
            versions[tp] = (point.position, point.version)
        if not finished and not offsets:
            return None
        self._plans += 1
        epochs = {tp: self._epochs.get(tp, 0) for tp in versions}
        return _Plan(finished, offsets, versions, epochs, self._plans)

    async def commit(self, wait: bool = False) -> None:
        """Commit what is finished now (the loop calls this every commit interval).

        Exactly once, the transaction runs on the Kafka thread and the loop waits for it
        before it fetches again. At least once, the offset commit runs on the committer
        thread and the loop goes on fetching: a synchronous commit held the stage's fetch
        for its round trip (p50 1-3 ms, p99 40-70 ms on a loaded machine), ten times a
        second, and the messages arriving meanwhile waited. One commit is in flight at a
        time (a commit due while one is still out waits for the next interval), and
        :meth:`_execute` orders it with a revocation's commit. ``wait``: wait for the one
        in flight, then commit and wait for that too (at shutdown, before ``close()``).
        """
        if self._committer is None:
            plan = self._plan()
            self._last_commit = time.monotonic()
            if plan is None:
                return
            outcome = await self._on_kafka(self._execute, plan)
            await self._committed(plan, outcome, set())
            return
        if self._commit_in_flight is not None:
            if not wait:
                self._last_commit = time.monotonic()
                return
            await asyncio.wait([self._commit_in_flight])
        plan = self._plan()
        self._last_commit = time.monotonic()
        if plan is None:
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._committer, self._execute, plan)
        self._commit_in_flight = future
        future.add_done_callback(lambda done: self._async_committed(plan, done))
        if wait:
            await asyncio.wait([future])

    def _async_committed(self, plan: _Plan, done: asyncio.Future[Outcome | None]) -> None:
        """An at-least-once commit answered (on the loop): record it for the partitions
        still held in the assignment it was planned in."""
        self._commit_in_flight = None
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:  # not a refused commit (that is Outcome.FAILED): a bug
            self._commit_error = error
            return
        self._record_commit(plan, done.result(), set())

    async def _committed(
        self, plan: _Plan | None, outcome: Outcome | None, release: set[Partition]
    ) -> None:
        self._record_commit(plan, outcome, release)

    def _record_commit(
        self, plan: _Plan | None, outcome: Outcome | None, release: set[Partition]
    ) -> None:
        if plan is not None and outcome is Outcome.FAILED:
            self.stats.failed_commits += 1
            # Retried with the next commit, unless the partitions are going.
            self._outbox[:0] = [f for f in plan.finished if f.partition not in release]
        elif plan is not None and outcome is Outcome.COMMITTED:
            self.stats.commits += 1
            self._clients.health.ok()
            for item in plan.finished:
                if item.trace is not None and item.decision is not None:
                    item.trace.committed(item.decision)
            for tp, (position, version) in plan.versions.items():
                if tp in self._owned and self._epochs.get(tp, 0) == plan.epochs.get(tp):
                    self._tracker.mark_committed(*tp, position, version)
        for tp in release:
            self._forget(tp, remember_done=outcome is Outcome.FAILED)

    async def _prepare_revocation(self, revoked: set[Partition]) -> _Plan | None:
        self._end_hold()  # a member still: what is held may finish within the grace
        await self._release_tasks(revoked, self._revoke_grace_s)
        for tp in revoked:  # what a task left behind finishes from now on counts for nothing
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        return self._plan(revoked)

    def _lose(self, partitions: set[Partition]) -> None:
        """Let lost partitions go now and cancel their work without waiting for it (on
        the loop, a callback of :meth:`_on_lost`)."""
        lost = partitions & self._owned
        if not lost:
            return
        log.warning("stage %s: lost %d partitions; their work is abandoned", self.stage, len(lost))
        self._backlog = deque(m for m in self._backlog if (m.topic, m.partition) not in lost)
        for tp in lost:
            self._forget(tp, remember_done=True)
        for task, inbound in self._tasks.items():
            if (inbound.topic, inbound.partition) in lost:
                task.cancel()
        self._end_hold()

    async def _release_tasks(self, partitions: set[Partition], grace_s: float) -> None:
        """Let the partitions' in-flight messages finish within ``grace_s``, cancel the rest."""
        self._backlog = deque(m for m in self._backlog if (m.topic, m.partition) not in partitions)
        await self._drain(partitions, grace_s)
        await self._cancel(
            {t for t, m in self._tasks.items() if (m.topic, m.partition) in partitions}
        )

    def _live(self, partition: Partition, epoch: int) -> bool:
        """Whether the assignment a message was fetched in still holds its partition."""
        return partition in self._owned and self._epochs.get(partition, 0) == epoch

    def _forget(self, tp: Partition, remember_done: bool = False) -> None:
        """Let a partition go. ``remember_done``: it goes without its last commit (lost,
        or that commit failed); at least once, every offset it finished since the last
        successful commit has its outputs acknowledged, and is remembered so that getting
        the partition back skips it. That includes what an earlier re-assignment skipped
        and no commit has recorded since: a partition lost twice in a row (a frozen
        worker's session, then a broker outage) redid it otherwise (duplicates)."""
        if remember_done and self._sender is not None:
            done = self._tracker.finished(*tp)
            if done:
                self._sent.setdefault(tp, set()).update(done)
        self._owned.discard(tp)
        self._tracker.forget(*tp)
        # Exactly once: outputs not in the partition's last commit are never committed.
        self._outbox = [f for f in self._outbox if f.partition != tp]

    async def _drain(self, partitions: set[Partition] | None, grace_s: float) -> None:
        def idle() -> bool:
            if partitions is None:
                return not self._tasks and not self._backlog
            return not any((m.topic, m.partition) in partitions for m in self._tasks.values())

        if not await self._until(idle, grace_s):
            log.warning(
                "stage %s: in-flight work unfinished after %.0fs; cancelled, to be redone",
                self.stage,
                grace_s,
            )

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` and wait up to :data:`CANCEL_WAIT_S` for them to end."""
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, running = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
        if running:
            log.warning(
                "stage %s: %d cancelled messages still running after %.0f s; left behind "
                "(their results count for nothing, the partitions' next owner redoes them)",
                self.stage,
                len(running),
                CANCEL_WAIT_S,
            )
