"""How a stage's outputs and consumed offsets reach Kafka: one commit per interval.

Both modes take the same batch: the outputs of the messages finished since the last
commit, and per partition the committable position with the finished offsets above it in
the commit metadata (:mod:`pipeline.transport.offsets`). Their calls block (librdkafka), so
the runner calls them on its Kafka thread.

- :class:`TransactionalDelivery` (``exactly_once``, the default): begin a transaction,
  produce the outputs, ``send_offsets_to_transaction`` with the consumer's group metadata
  (KIP-447: a member that lost its partitions in a rebalance is fenced and its commit
  fails), commit. Outputs and offsets become visible together or not at all; a failed or
  fenced transaction is aborted, so ``read_committed`` readers never see its outputs, and
  whoever owns the partitions next redoes those messages.
- :class:`IdempotentDelivery` (``at_least_once``, for clusters without transactions):
  produce with the idempotent producer, wait for every delivery report, then commit the
  offsets (with the same metadata). A crash between the two repeats outputs: duplicates
  bounded by one commit interval plus what was in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.transport.message import Outbound

log = logging.getLogger("llmpipe.runner")

CALL_TIMEOUT_S = 10.0
# How long one commit may keep retrying while the broker is unreachable before the runner
# gives up on that attempt (an open transaction is then aborted by the broker at its
# transaction.timeout.ms, so nothing half-done becomes visible).
COMMIT_DEADLINE_S = 20.0
PRODUCE_QUEUE_WAIT_S = 0.1
# A commit that has not returned after this is stuck in librdkafka (see
# TransactionalDelivery); one that is merely retrying through an outage returns within
# COMMIT_DEADLINE_S plus a call timeout.
WATCHDOG_S = COMMIT_DEADLINE_S + CALL_TIMEOUT_S + 5.0


class Outcome(enum.Enum):
    COMMITTED = "committed"  # outputs and offsets are durable
    SENT = "sent"  # outputs durable, offsets not committed (at_least_once only)
    FAILED = "failed"  # nothing visible: retry the same batch later


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


def _error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def _produce(producer: ProducerLike, out: Outbound, **kwargs: Any) -> None:
    headers: list[tuple[str, str | bytes | None]] = list(out.headers)
    while True:
        try:
            producer.produce(out.topic, value=out.value, key=out.key, headers=headers, **kwargs)
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


class _Abandoned(Exception):
    """This attempt was given up by the watchdog; it must not commit anything."""


class TransactionalDelivery:
    """Exactly-once hops: outputs and input offsets in one transaction per commit.

    The transactional calls run on a thread of their own, watched: librdkafka's
    ``send_offsets_to_transaction`` can block past its timeout, forever, after the broker
    or group coordinator went away (confluentinc/librdkafka#5456 and #5511, open in
    2.16; reproduced here with a 10 s broker stop). When a commit takes longer than
    :data:`WATCHDOG_S` the runner stops waiting, reports the batch as not committed,
    and replaces the producer: the new one, with the same ``transactional.id``, fences
    the stuck one (``init_transactions`` bumps the epoch), so the stuck transaction can
    never commit after its batch was given to the new producer, and the stuck thread is
    abandoned. A retriable error (a timeout while the broker is away) retries the same
    call, as librdkafka documents; an abortable one aborts; a fatal one replaces the
    producer.
    """

    mode = "exactly_once"

    def __init__(self, make_producer: Callable[[], ProducerLike], consumer: CommitterLike) -> None:
        self._make_producer = make_producer
        self._consumer = consumer
        self._producer: ProducerLike | None = None
        self._thread = self._new_thread()
        self._attempt = 0
        self._needs_abort = False
        self._failing = False

    @staticmethod
    def _new_thread() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-txn")

    def start(self) -> None:
        self._thread.submit(self._start).result(timeout=COMMIT_DEADLINE_S + WATCHDOG_S)

    def _start(self) -> None:
        producer = self._make_producer()
        deadline = time.monotonic() + COMMIT_DEADLINE_S
        while True:
            try:
                # Fences an earlier incarnation with the same transactional.id and aborts
                # what it left open.
                producer.init_transactions(CALL_TIMEOUT_S)
                break
            except KafkaException as exc:
                error = _error(exc)
                if error is None or not error.retriable() or time.monotonic() > deadline:
                    raise
        self._producer = producer
        self._needs_abort = False

    def commit(
        self,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        stopping: Callable[[], bool],
    ) -> Outcome:
        """Called on the runner's Kafka thread (the group metadata is a consumer call)."""
        group = self._consumer.consumer_group_metadata() if offsets else None
        self._attempt += 1
        future = self._thread.submit(self._commit, self._attempt, outputs, offsets, group, stopping)
        try:
            return future.result(timeout=WATCHDOG_S)
        except concurrent.futures.TimeoutError:
            log.warning(
                "a transactional commit hangs in librdkafka after %.0f s (librdkafka#5456); "
                "replacing the producer, the batch is retried",
                WATCHDOG_S,
            )
            self._replace()
            return Outcome.FAILED
        except KafkaException as exc:  # init_transactions of a replacement producer failed
            log.warning("transactional producer unavailable (%s); retried", exc)
            return Outcome.FAILED

    def _replace(self) -> None:
        """Abandon the stuck thread and producer; the next commit makes a new producer."""
        self._attempt += 1  # the stuck attempt no longer matches: it will not commit
        self._thread.shutdown(wait=False)
        self._thread = self._new_thread()
        self._producer = None
        self._needs_abort = False

    def _commit(
        self,
        attempt: int,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        group: Any,
        stopping: Callable[[], bool],
    ) -> Outcome:
        if self._producer is None:
            self._start()
        producer = self._producer
        assert producer is not None
        deadline = time.monotonic() + COMMIT_DEADLINE_S

        def call(fn: Callable[[], None]) -> None:
            while True:
                if attempt != self._attempt:
                    raise _Abandoned
                try:
                    fn()
                    return
                except KafkaException as exc:
                    error = _error(exc)
                    retry = error is not None and error.retriable()
                    retry = retry and not error.txn_requires_abort()  # type: ignore[union-attr]
                    if not retry or time.monotonic() > deadline or stopping():
                        raise

        try:
            if self._needs_abort:
                call(lambda: producer.abort_transaction(CALL_TIMEOUT_S))
                self._needs_abort = False
            producer.begin_transaction()
            self._needs_abort = True
            for out in outputs:
                _produce(producer, out)
            if offsets:
                call(lambda: producer.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S))
            call(lambda: producer.commit_transaction(CALL_TIMEOUT_S))
            self._needs_abort = False
        except _Abandoned:
            return Outcome.FAILED
        except KafkaException as exc:
            self._failed(exc)
            return Outcome.FAILED
        if self._failing:
            log.info("transactional commits succeed again")
            self._failing = False
        return Outcome.COMMITTED

    def _failed(self, exc: KafkaException) -> None:
        """Abort (outputs never visible) or, if the producer is unusable, replace it."""
        error = _error(exc)
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "transaction failed (%s); aborted, the batch is retried", exc)
        if error is not None and error.fatal():
            self._producer = None  # a new one (same transactional.id) is made next time
            self._needs_abort = False
            return
        producer = self._producer
        if producer is None or not self._needs_abort:
            return
        try:
            producer.abort_transaction(CALL_TIMEOUT_S)
            self._needs_abort = False
        except KafkaException as abort_exc:
            abort_error = _error(abort_exc)
            if abort_error is not None and abort_error.fatal():
                self._producer = None
                self._needs_abort = False
            # otherwise retried before the next transaction begins

    def close(self) -> None:
        try:
            self._thread.submit(self._close).result(timeout=WATCHDOG_S)
        except concurrent.futures.TimeoutError:
            log.warning("the transactional producer did not close; abandoned")
        self._thread.shutdown(wait=False)

    def _close(self) -> None:
        producer = self._producer
        self._producer = None
        if producer is not None and self._needs_abort:
            # If this fails, the broker aborts it at transaction.timeout.ms.
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(CALL_TIMEOUT_S)
        if producer is not None:
            producer.flush(CALL_TIMEOUT_S)


class IdempotentDelivery:
    """At-least-once hops: deliver every output, then commit the offsets."""

    mode = "at_least_once"

    def __init__(self, make_producer: Callable[[], ProducerLike], consumer: CommitterLike) -> None:
        self._make_producer = make_producer
        self._consumer = consumer
        self._producer: ProducerLike | None = None
        self._failing = False

    def start(self) -> None:
        self._producer = self._make_producer()

    def commit(
        self,
        outputs: Sequence[Outbound],
        offsets: list[TopicPartition],
        stopping: Callable[[], bool],
    ) -> Outcome:
        producer = self._producer
        assert producer is not None, "start() first"
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Any) -> None:
            if error is not None:
                errors.append(error)

        for out in outputs:
            _produce(producer, out, on_delivery=delivered)
        # Queued messages are retried by librdkafka until message.timeout.ms, so wait for
        # their reports instead of producing them again.
        deadline = time.monotonic() + COMMIT_DEADLINE_S
        while producer.flush(1.0) > 0:
            if stopping() and time.monotonic() > deadline:
                return Outcome.FAILED
        if errors:
            self._warn(f"{len(errors)} outputs not delivered ({errors[0]}); the batch is retried")
            return Outcome.FAILED
        if not offsets:
            return Outcome.COMMITTED
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._warn(f"offset commit failed ({exc}); retried with the next commit")
            return Outcome.SENT
        if self._failing:
            log.info("commits succeed again")
            self._failing = False
        return Outcome.COMMITTED

    def _warn(self, message: str) -> None:
        log.log(logging.DEBUG if self._failing else logging.WARNING, message)
        self._failing = True

    def close(self) -> None:
        producer = self._producer
        self._producer = None
        if producer is not None:
            producer.flush(CALL_TIMEOUT_S)
