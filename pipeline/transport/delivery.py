"""How a stage's outputs and consumed offsets reach Kafka.

Every commit interval the runner commits, per partition, the committable position with
the finished offsets above it in the commit metadata (:mod:`pipeline.transport.offsets`).
The commit calls block (librdkafka), so the runner makes them off the event loop: on its
Kafka thread, or (the at-least-once offset commit) on a committer thread of its own.

- :class:`TransactionalDelivery` (``exactly_once``, the default): one transaction per
  commit interval holds the outputs of the messages finished since the last one: begin,
  produce them, ``send_offsets_to_transaction`` with the consumer's group metadata
  (KIP-447: a member that lost its partitions in a rebalance is fenced and its commit
  fails), commit. Outputs and offsets become visible together or not at all; a failed or
  fenced transaction is aborted, so ``read_committed`` readers never see its outputs, and
  whoever owns the partitions next redoes those messages. An output waits for its
  transaction: up to one interval per hop.
- :class:`IdempotentDelivery` (``at_least_once``, for clusters without transactions):
  each message's outputs go out through the idempotent producer as soon as the stage has
  decided (:meth:`IdempotentDelivery.send`; the producer's own ``linger.ms`` batches), and
  the message counts as finished only once every one of them is acknowledged; the commit
  then covers only finished messages (with the same metadata). A crash between the two
  repeats outputs: duplicates bounded by what was in flight or delivered-but-uncommitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.errors import LlmpipeError
from pipeline.transport.message import Outbound

log = logging.getLogger("llmpipe.runner")

CALL_TIMEOUT_S = 10.0
# How long one commit may keep retrying while the broker is unreachable before the runner
# gives up on that attempt (an open transaction is then aborted by the broker at its
# transaction.timeout.ms, so nothing half-done becomes visible).
COMMIT_DEADLINE_S = 20.0
PRODUCE_QUEUE_WAIT_S = 0.1
# A librdkafka call given CALL_TIMEOUT_S that has not returned this much later is stuck
# (see TransactionalDelivery); so is a commit that has not returned after WATCHDOG_S (one
# that is merely retrying through an outage returns within COMMIT_DEADLINE_S plus a call).
CALL_GRACE_S = 10.0
WATCHDOG_S = COMMIT_DEADLINE_S + CALL_TIMEOUT_S + CALL_GRACE_S
# A commit still running this long is stuck beyond what the watchdog heals (it abandons a
# hung call by WATCHDOG_S, then asks the broker with one more call): /readyz says so.
STUCK_COMMIT_S = WATCHDOG_S + CALL_TIMEOUT_S + CALL_GRACE_S
WATCH_INTERVAL_S = 0.25
# at_least_once: delivery reports are served on the loop by a non-blocking poll, whenever
# a stage sends and the last poll is REPORT_POLL_S old (the loop is awake anyway), else by
# a timer REPORT_TIMER_S after the last one while outputs are unacknowledged. Waking the
# loop costs more than what it serves: at a steady trickle a 1 ms timer was one wake-up per
# message and ~55 us of the loop's CPU per message (measured, one runner at 500 msg/s:
# 231 -> 177 us). A report served later only holds its message's slot longer; nothing
# downstream waits for it (the next stage reads an output once the broker has it). Sends
# poll no more often than the timer would: reports come in batches, one per linger
# (LLMPIPE_KAFKA_STAGE_LINGER_MS, 5 ms), and a poll every 1 ms mostly found none, at ~3 %
# of the loop's CPU (py-spy, three stages at 1,900 req/s).
REPORT_POLL_S = 0.005
REPORT_TIMER_S = 0.005
# The pause before outputs whose delivery failed (librdkafka gave up after
# message.timeout.ms, or refused them) are sent again.
RESEND_WAIT_S = 1.0


class Outcome(enum.Enum):
    COMMITTED = "committed"  # the offsets (and, exactly once, the outputs) are durable
    # Not committed: exactly once, nothing of the batch is visible (retried with the next
    # transaction); at least once, the offsets are retried with the next commit.
    FAILED = "failed"


class ProducerLike(Protocol):
    def produce(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        *,
        on_delivery: Any = ...,
        headers: list[tuple[str, str | bytes | None]] | None = ...,
    ) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...

    def init_transactions(self, timeout: float = ...) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = ...
    ) -> None: ...

    def commit_transaction(self, timeout: float = ...) -> None: ...

    def abort_transaction(self, timeout: float = ...) -> None: ...


class CommitterLike(Protocol):
    """The consumer calls a delivery makes (on the runner's Kafka thread)."""

    def consumer_group_metadata(self) -> Any: ...

    def commit(self, *args: Any, **kwargs: Any) -> Any: ...

    def committed(self, partitions: list[TopicPartition], timeout: float = ...) -> Any: ...


def _error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def _produce(producer: ProducerLike, out: Outbound) -> None:
    headers: list[tuple[str, str | bytes | None]] = list(out.headers)
    while True:
        try:
            producer.produce(out.topic, value=out.value, key=out.key, headers=headers)
            return
        except BufferError:  # librdkafka's local queue is full: let it drain
            producer.poll(PRODUCE_QUEUE_WAIT_S)


class Delivery(Protocol):
    mode: str

    def start(self) -> None: ...

    def commit(
        self,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        stopping: Callable[[], bool],
    ) -> Outcome: ...

    def close(self) -> None: ...


class KafkaFatalError(LlmpipeError):
    """A Kafka client can no longer work (librdkafka's fatal errors: a static member
    fenced, a transactional id refused; committed offsets that stay unreadable): the
    worker exits 1 with this one line so that its supervisor starts a fresh one, instead
    of staying up and consuming nothing. A fresh process rejoins its groups and resumes
    from the committed offsets, skipping what their metadata records as done."""

    exit_code = 1


class _Abandoned(Exception):
    """This attempt was given up by the watchdog; it must not commit anything."""


class _OutcomeUnknown(Exception):
    """``commit_transaction`` was sent but its answer never came: committed or not?"""


class TransactionalDelivery:
    """Exactly-once hops: outputs and input offsets in one transaction per commit.

    One transactional producer at a time, replaced (a new producer with the same
    ``transactional.id``, whose ``init_transactions`` fences the old one and aborts
    whatever it left open on the broker) whenever it may be unusable:

    - after any failed transaction, instead of aborting and reusing it: a fresh producer
      has a fresh coordinator cache, and aborting needs the very coordinator that just
      failed;
    - before the first transaction after a broker outage (``outages`` counts them): a
      producer that lived through one keeps its group coordinator cached, and
      librdkafka's ``send_offsets_to_transaction`` can then block past its timeout,
      forever (confluentinc/librdkafka#5456 and #5511, open in 2.16; reproduced here:
      every stage's first commit after a 20-30 s broker stop hung);
    - when a call hangs all the same (the watchdog): a librdkafka call that has not
      returned :data:`CALL_GRACE_S` after its own timeout, or a commit that has run
      :data:`WATCHDOG_S`, is abandoned with its thread; the batch is reported not
      committed, and the attempt counter makes sure the abandoned thread can neither
      commit it later nor touch the new producer.

    The calls run on a thread of their own. A retriable error (a timeout while the broker
    is away) retries the same call, as librdkafka documents, within
    :data:`COMMIT_DEADLINE_S`; anything else fails the batch, which the runner retries.
    A producer that cannot even be initialised for a non-retriable reason raises
    :class:`KafkaFatalError`.

    A ``commit_transaction`` that was sent but never answered (the broker went away, or
    the call hung) has an unknown outcome: the broker may have committed it. Redoing the
    batch would then deliver it twice, so the outcome is resolved first
    (:meth:`_resolve`): a new producer's ``init_transactions`` makes the broker finish the
    old transaction one way or the other, and the group's committed offsets say which:
    the batch's own offsets (position and metadata) mean it was committed.
    """

    mode = "exactly_once"

    def __init__(
        self,
        make_producer: Callable[[], ProducerLike],
        consumer: CommitterLike,
        outages: Callable[[], int] = lambda: 0,
        name: str = "",
    ) -> None:
        self._make_producer = make_producer
        self._consumer = consumer
        self._outages = outages
        self._name = f"stage {name}: " if name else ""
        self._lock = threading.Lock()
        self._producer: ProducerLike | None = None
        self._producer_outages = 0
        self._thread = self._new_thread()
        self._attempt = 0
        self._call_since: float | None = None  # when the current librdkafka call began
        self._committing = False  # the current call is commit_transaction
        self._failing = False

    @staticmethod
    def _new_thread() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-txn")

    def start(self) -> None:
        self._attempt += 1
        attempt = self._attempt
        self._thread.submit(self._start, attempt).result(timeout=COMMIT_DEADLINE_S + WATCHDOG_S)

    def _start(self, attempt: int) -> ProducerLike:
        outages = self._outages()
        producer = self._make_producer()
        deadline = time.monotonic() + COMMIT_DEADLINE_S
        while True:
            try:
                # Fences an earlier producer with the same transactional.id and aborts what
                # it left open.
                self._timed(attempt, lambda: producer.init_transactions(CALL_TIMEOUT_S))
                break
            except KafkaException as exc:
                error = _error(exc)
                if error is None or (not error.retriable() and error.fatal()):
                    raise KafkaFatalError(
                        f"{self._name}the transactional producer cannot start: {exc}"
                    ) from exc
                if not error.retriable() or time.monotonic() > deadline:
                    raise
        with self._lock:
            if attempt != self._attempt:
                raise _Abandoned
            self._producer = producer
            self._producer_outages = outages
        return producer

    def _timed(self, attempt: int, fn: Callable[[], None]) -> None:
        """One librdkafka call, visible to the watchdog while it runs."""
        if attempt != self._attempt:
            raise _Abandoned
        self._call_since = time.monotonic()
        try:
            fn()
        finally:
            if attempt == self._attempt:
                self._call_since = None

    def commit(
        self,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        stopping: Callable[[], bool],
    ) -> Outcome:
        """Called on the runner's Kafka thread (the group metadata is a consumer call)."""
        group = self._consumer.consumer_group_metadata() if offsets else None
        self._attempt += 1
        self._call_since = None
        started = time.monotonic()
        future = self._thread.submit(self._commit, self._attempt, outputs, offsets, group, stopping)
        while True:
            try:
                return future.result(timeout=WATCH_INTERVAL_S)
            except concurrent.futures.TimeoutError:
                call_since = self._call_since
                now = time.monotonic()
                if now - started > WATCHDOG_S or (
                    call_since is not None and now - call_since > CALL_TIMEOUT_S + CALL_GRACE_S
                ):
                    break
            except KafkaException as exc:  # a replacement producer could not start
                self._warn(f"transactional producer unavailable ({exc}); the batch is retried")
                return Outcome.FAILED
            except _OutcomeUnknown as exc:
                self._warn(f"transaction outcome unknown ({exc}); asking the broker")
                return self._resolve(offsets, stopping)
        committing = self._committing
        self._warn(
            f"a transactional call hangs in librdkafka after {time.monotonic() - started:.0f} s "
            "(librdkafka#5456); replacing the producer"
        )
        self._replace()
        return self._resolve(offsets, stopping) if committing else Outcome.FAILED

    def _resolve(self, offsets: list[TopicPartition], stopping: Callable[[], bool]) -> Outcome:
        """Committed or not: a new producer ends the old transaction on the broker, then the
        committed offsets tell. Retried while the broker is away (nothing else can be
        committed meanwhile); given up only when the runner stops (the batch is then
        redone, as the limit the README names)."""
        sent = {(tp.topic, tp.partition): (tp.offset, tp.metadata or "") for tp in offsets}
        wanted = [TopicPartition(t, p) for t, p in sorted(sent)]
        while sent and not stopping():
            self._attempt += 1
            try:
                self._thread.submit(self._start, self._attempt).result(timeout=WATCHDOG_S)
                committed = self._consumer.committed(wanted, timeout=CALL_TIMEOUT_S)
            except (KafkaException, _Abandoned, concurrent.futures.TimeoutError) as exc:
                log.debug("%sresolving a transaction's outcome: %s", self._name, exc)
                if isinstance(exc, concurrent.futures.TimeoutError):
                    self._replace()
                continue
            got = {
                (tp.topic, tp.partition): (tp.offset, tp.metadata or "")
                for tp in committed
                if tp.error is None
            }
            if len(got) == len(sent):
                outcome = Outcome.COMMITTED if got == sent else Outcome.FAILED
                log.info("%sthe unanswered transaction was %s", self._name, outcome.value)
                return outcome
        return Outcome.FAILED

    def _replace(self) -> None:
        """Abandon the stuck thread and producer; the next commit makes a new producer."""
        with self._lock:
            self._attempt += 1  # the stuck attempt no longer matches: it will not commit
            self._producer = None
            self._call_since = None
        self._thread.shutdown(wait=False)
        self._thread = self._new_thread()

    def _commit(
        self,
        attempt: int,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        group: Any,
        stopping: Callable[[], bool],
    ) -> Outcome:
        deadline = time.monotonic() + COMMIT_DEADLINE_S

        def call(fn: Callable[[], None]) -> None:
            while True:
                try:
                    self._timed(attempt, fn)
                    return
                except KafkaException as exc:
                    error = _error(exc)
                    retry = error is not None and error.retriable()
                    retry = retry and not error.txn_requires_abort()  # type: ignore[union-attr]
                    if not retry or time.monotonic() > deadline or stopping():
                        raise

        try:
            producer = self._producer
            if producer is not None and self._producer_outages != self._outages():
                log.info("%sa new transactional producer after the broker outage", self._name)
                producer = None
            if producer is None:
                producer = self._start(attempt)
            producer.begin_transaction()
            for out in outputs:
                _produce(producer, out)
            if offsets:
                call(lambda: producer.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S))
            self._committing = True
            try:
                call(lambda: producer.commit_transaction(CALL_TIMEOUT_S))
            except KafkaException as exc:
                error = _error(exc)
                if (
                    error is not None
                    and error.retriable()
                    and not error.txn_requires_abort()
                    and not error.fatal()
                ):
                    with self._lock:
                        if attempt == self._attempt:
                            self._producer = None
                    raise _OutcomeUnknown(str(exc)) from exc
                raise
            finally:
                if attempt == self._attempt:
                    self._committing = False
        except _Abandoned:
            return Outcome.FAILED
        except KafkaException as exc:
            with self._lock:
                if attempt != self._attempt:  # abandoned meanwhile: fenced, say nothing
                    return Outcome.FAILED
                # Not aborted here: the next producer's init_transactions aborts it (the
                # broker would at transaction.timeout.ms); nothing of it is visible.
                self._producer = None
            self._warn(f"transaction failed ({exc}); the batch is retried with a new producer")
            return Outcome.FAILED
        if self._failing:
            log.info("%stransactional commits succeed again", self._name)
            self._failing = False
        return Outcome.COMMITTED

    def _warn(self, message: str) -> None:
        log.log(logging.DEBUG if self._failing else logging.WARNING, self._name + message)
        self._failing = True

    def close(self) -> None:
        try:
            self._thread.submit(self._close).result(timeout=WATCHDOG_S)
        except concurrent.futures.TimeoutError:
            log.warning("%sthe transactional producer did not close; abandoned", self._name)
        self._thread.shutdown(wait=False)

    def _close(self) -> None:
        producer = self._producer
        self._producer = None
        if producer is not None:  # no transaction is open between commits
            producer.flush(CALL_TIMEOUT_S)


@dataclass
class _Sending:
    """One message's outputs on their way: settled when every delivery report is in.

    ``late`` hears the outcome of a send its waiter gave up on (:meth:`abandon`, the task
    cancelled): once, True if every output went out after all, False if some never will
    (refused, timed out, or never handed to librdkafka)."""

    future: asyncio.Future[None]
    pending: int  # reports still to come (every output, until abandoned)
    failed: list[tuple[Outbound, KafkaError]] = field(default_factory=list)
    late: Callable[[bool], None] | None = None
    unproduced: int = 0  # not handed to librdkafka yet (set by send())
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.unproduced = self.pending

    def report(self, out: Outbound, error: KafkaError | None) -> None:
        self.pending -= 1
        if error is not None:
            self.failed.append((out, error))
        if self.pending > 0:
            return
        if self.abandoned:
            self._settle_late()
        elif not self.future.done():
            self.future.set_result(None)

    def abandon(self) -> None:
        """The waiter is gone: outputs never handed over will not report, and ``late``
        hears the outcome once every report of the others is in (now, if all are)."""
        self.abandoned = True
        self.pending -= self.unproduced
        if self.pending <= 0:
            self._settle_late()

    def _settle_late(self) -> None:
        late, self.late = self.late, None  # exactly once
        if late is not None:
            late(not self.failed and not self.unproduced)


class _ReportPoller:
    """The delivery reports of one producer, served on the loop for every stage sending
    through it (a ``poll(0)`` serves all of their reports at once): when a stage sends
    (:data:`REPORT_POLL_S` apart), and by one timer (:data:`REPORT_TIMER_S`) however
    many stages share the producer, where a 1 ms timer per stage woke the loop once per
    stage every millisecond."""

    def __init__(self, producer: ProducerLike) -> None:
        self.producer = producer
        self.unacknowledged = 0
        self.users = 0
        self.thread = 0  # the loop's thread: where reports are served
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polled = 0.0  # loop time of the last poll

    def soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve what is due if the last poll is old enough, and keep the timer set while
        outputs are unacknowledged (on the loop; never blocks)."""
        if self._loop is not loop:  # a new loop (tests run several): the old timer is gone
            self._loop, self._timer, self.thread = loop, None, threading.get_ident()
        if self.unacknowledged <= 0:
            return
        now = loop.time()
        if now - self._polled >= REPORT_POLL_S:
            self._polled = now
            self.producer.poll(0)
        if self._timer is None and self.unacknowledged > 0:
            self._timer = loop.call_at(self._polled + REPORT_TIMER_S, self._serve, loop)

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self.users > 0:
            self._polled = 0.0  # due now
            self.soon(loop)


# One per producer object in use (the process's shared stage producer in a worker).
_POLLERS: dict[int, _ReportPoller] = {}
_POLLERS_LOCK = threading.Lock()


class IdempotentDelivery:
    """At-least-once hops: each message's outputs sent at once, offsets committed after.

    ``make_producer`` gives the process's shared stage producer
    (:meth:`~pipeline.transport.clients.KafkaClients.stage_producer`): every stage's
    outputs go into the same batches.

    :meth:`send` (on the event loop) produces a message's outputs the moment the stage
    has decided and returns once the broker has acknowledged all of them; the runner
    only then counts the message as finished, so :meth:`commit` (offsets only, on the
    runner's Kafka thread) never covers an output that is not durable. Delivery reports
    are served on the loop itself, by a non-blocking ``producer.poll(0)`` when a stage
    sends and by one timer per producer for all the stages sharing it while any output
    is unacknowledged (:class:`_ReportPoller`): no thread of its own, so
    no handing reports between threads (measured: a report thread per stage cost more
    CPU per request than the sends themselves). Outputs whose delivery failed (the
    broker gone past ``message.timeout.ms``, or a refusal) are sent again after
    :data:`RESEND_WAIT_S`, in their order; the message holds its slot (and, for
    ``x-ordered`` keys, its successors) until they are delivered, so a long outage stops
    fetching instead of piling up outputs.
    """

    mode = "at_least_once"

    def __init__(
        self, make_producer: Callable[[], ProducerLike], consumer: CommitterLike, name: str = ""
    ) -> None:
        self._make_producer = make_producer
        self._consumer = consumer
        self._name = f"stage {name}: " if name else ""
        self._producer: ProducerLike | None = None
        self._poller: _ReportPoller | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop sends run on
        self._closed = False
        self._failing = False
        self._send_failing = False

    def start(self) -> None:
        producer = self._make_producer()
        with _POLLERS_LOCK:
            poller = _POLLERS.get(id(producer))
            if poller is None or poller.producer is not producer:
                poller = _POLLERS[id(producer)] = _ReportPoller(producer)
            poller.users += 1
        self._producer, self._poller = producer, poller

    async def send(
        self, outputs: Sequence[Outbound], late: Callable[[bool], None] | None = None
    ) -> None:
        """Produce ``outputs`` now; return when every one is acknowledged by the broker.

        Cancelling it (a partition lost or revoked past its grace, a shutdown) leaves the
        message unfinished, but its outputs may be queued and still be delivered (the
        broker back after an outage): ``late`` is then called on the loop, once, with
        whether all of them were, so the runner can skip the message instead of
        delivering it twice, and hold a redo of it until it knows.
        """
        producer, poller = self._producer, self._poller
        assert producer is not None and poller is not None, "start() first"
        loop = self._loop
        if loop is None or loop.is_closed():  # kept: a getpid() per call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        todo = list(outputs)
        while todo:
            sending = _Sending(loop.create_future(), len(todo), late=late)
            try:
                for out in todo:
                    while not self._produce(producer, poller, out, sending, loop):
                        poller.soon(loop)  # librdkafka's local queue is full: let it drain
                        await asyncio.sleep(PRODUCE_QUEUE_WAIT_S)
                if sending.pending <= 0 and not sending.future.done():
                    sending.future.set_result(None)
                poller.soon(loop)
                await sending.future
            except asyncio.CancelledError:
                sending.abandon()
                raise
            if not sending.failed:
                if self._send_failing:
                    log.info("%soutputs are delivered again", self._name)
                    self._send_failing = False
                return
            out, error = sending.failed[0]
            self._warn_send(
                f"{len(sending.failed)} outputs not delivered ({error}); sending them again"
            )
            todo = [out for out, _ in sending.failed]
            try:
                await asyncio.sleep(RESEND_WAIT_S)
            except asyncio.CancelledError:
                sending.abandon()  # settled, with failures: late hears False
                raise

    def _produce(
        self,
        producer: ProducerLike,
        poller: _ReportPoller,
        out: Outbound,
        sending: _Sending,
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        """Hand ``out`` to librdkafka; False when its local queue is full (try again).

        Plain, not a coroutine: nearly every output goes at the first try, and a
        coroutine per output cost more than the produce call itself.
        """

        def settle(error: KafkaError | None) -> None:
            poller.unacknowledged -= 1
            if not self._closed:
                sending.report(out, error)

        def report(error: KafkaError | None, _message: Any) -> None:
            if threading.get_ident() == poller.thread:
                settle(error)
            else:  # served by another stage's closing flush, on its Kafka thread
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(settle, error)

        headers: list[tuple[str, str | bytes | None]] = list(out.headers)
        try:
            producer.produce(
                out.topic, value=out.value, key=out.key, headers=headers, on_delivery=report
            )
        except BufferError:
            return False
        except KafkaException as exc:  # refused before sending: retried like a failure
            error = _error(exc)
            if error is None:
                raise
            sending.unproduced -= 1
            sending.report(out, error)
            return True
        sending.unproduced -= 1
        poller.unacknowledged += 1
        return True

    def commit(
        self,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        stopping: Callable[[], bool],
    ) -> Outcome:
        """Commit the offsets of finished messages, whose outputs :meth:`send` delivered
        (``outputs`` is always empty here)."""
        if outputs:
            raise ValueError("at_least_once outputs go through send(), not commit()")
        if not offsets:
            return Outcome.COMMITTED
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._warn(f"offset commit failed ({exc}); retried with the next commit")
            return Outcome.FAILED
        if self._failing:
            log.info("%scommits succeed again", self._name)
            self._failing = False
        return Outcome.COMMITTED

    def _warn(self, message: str) -> None:
        log.log(logging.DEBUG if self._failing else logging.WARNING, self._name + message)
        self._failing = True

    def _warn_send(self, message: str) -> None:
        log.log(logging.DEBUG if self._send_failing else logging.WARNING, self._name + message)
        self._send_failing = True

    def close(self) -> None:
        """On the runner's Kafka thread, after its tasks are gone: what is still queued
        is flushed (the producer is shared: flushed, never closed); this stage's reports
        go to nobody (the loop may be gone)."""
        self._closed = True
        producer, poller = self._producer, self._poller
        self._producer = self._poller = None
        if poller is not None:
            with _POLLERS_LOCK:
                poller.users -= 1
                if poller.users <= 0:  # its timer, if pending, finds no users and stops
                    _POLLERS.pop(id(poller.producer), None)
        if producer is not None:
            producer.flush(CALL_TIMEOUT_S)
