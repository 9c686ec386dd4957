"""A typed client for the services around the pipeline: submit requests, read results.

Upstream services used to hand-build the request JSON and downstream ones to decode
``llm.results`` themselves. :class:`Client` does both with the contract's own types
(:class:`~pipeline.contract.envelopes.Request` and
:class:`~pipeline.contract.envelopes.Result`) and the project's one Kafka edge
(:class:`~pipeline.transport.clients.KafkaClients`), so it inherits its security settings,
its ``read_committed`` consumers, its idempotent producer and its quiet logs.

* :meth:`Client.submit` validates the request, writes it to ``llm.requests`` and returns
  its id only once the broker's delivery report says it was written (else
  :class:`~pipeline.transport.batch.DeliveryError`, one line naming the cause). The current
  OpenTelemetry span, if any, continues into the pipeline (``traceparent``).
* :meth:`Client.results` is an async iterator of :class:`Result`: every result committed
  from now on (or from the beginning), optionally as a consumer group that remembers how
  far it got. In ``at_least_once`` delivery a hop redone after a crash can publish a result
  twice; the iterator passes each request's first one only (a human result that
  supersedes a model result is a different result and passes too).
* :meth:`Client.wait` blocks until one request's result is there, and says so at once
  when the request was dead-lettered instead (:class:`RequestDeadLettered`) or, at its
  timeout, that it waits in human review (:class:`ResultTimeout`).

Connection settings are the usual ``LLMPIPE_*`` variables (or a
:class:`~pipeline.config.Settings`). See ``docs/client.md``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Message as KafkaMessage

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import DecodeError
from pipeline.contract.envelopes import JsonObject, Request, Result
from pipeline.errors import LlmpipeError
from pipeline.observability.propagation import inject
from pipeline.transport import headers as h
from pipeline.transport.batch import REPORT_GRACE_S, DeliveryError, Written, cause
from pipeline.transport.clients import KafkaClients
from pipeline.transport.reader import partitions, require_broker, to_record, watermarks
from pipeline.transport.registry import codec_for

# Request ids remembered for de-duplication: far more than are in flight at once.
DEDUP_WINDOW = 100_000
POLL_S = 0.2


class ResultTimeout(LlmpipeError, TimeoutError):
    """No result within the timeout; the message says whether the request is in review."""

    exit_code = 1


class RequestDeadLettered(LlmpipeError):
    """The request was dead-lettered: it will never have a result unless replayed."""

    exit_code = 1

    def __init__(self, request_id: str, reason: str, detail: str) -> None:
        self.request_id = request_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"request {request_id} was dead-lettered ({reason}): {detail}")


class Client:
    """Submit requests to the pipeline and read their results (see the module docstring).

    Use it as a context manager, or call :meth:`close`, so the producer's last messages
    are flushed and the consumers leave their groups.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._clients = KafkaClients(self.settings)
        self._codec = codec_for(self.settings)
        self._producer: Any = None
        self._submitted_ms: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.settings.cli_timeout_s)
            self._producer = None

    # -- submit --------------------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        variables: Mapping[str, Any],
        *,
        key: str | None = None,
        deadline: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Write one request to ``llm.requests``; its id once the broker acknowledged it.

        ``key`` (default: the request id) decides the partition, so requests sharing a key
        keep their order; ``deadline`` (timezone-aware) is when the answer stops being
        useful: the pipeline takes the fallback path instead of calling a model after it.
        Raises :class:`~pipeline.transport.batch.DeliveryError` when the write was not
        acknowledged within ``timeout_s`` (default ``LLMPIPE_CLI_TIMEOUT_S``), and a
        ``pydantic.ValidationError`` for a request the contract refuses.
        """
        request = Request(
            request_id=request_id or str(uuid.uuid4()),
            prompt=prompt,
            prompt_version=version,
            variables=_json_object(variables),
            metadata=dict(metadata or {}),
            deadline=deadline,
        )
        value, content_type = self._codec.encode(request)
        headers: list[tuple[str, str | bytes | None]] = [
            (h.CONTENT_TYPE, content_type.encode()),
            (h.REQUEST_ID, request.request_id.encode()),
            *((name, text.encode()) for name, text in inject().items()),
        ]
        self._send(
            request.request_id, (key or request.request_id).encode(), value, headers, timeout_s
        )
        return request.request_id

    def _send(
        self,
        request_id: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, str | bytes | None]],
        timeout_s: float | None,
    ) -> Written:
        timeout = self.settings.cli_timeout_s if timeout_s is None else timeout_s
        if self._producer is None:
            timeout_ms = int(timeout * 1000)
            self._producer = self._clients.producer(
                **{
                    "message.timeout.ms": timeout_ms,
                    # A topic missing from the metadata fails after this, not the default 30 s.
                    "topic.metadata.propagation.max.ms": min(timeout_ms // 2, 5_000),
                    # Same key -> same partition as the Java clients upstream services use.
                    "partitioner": "murmur2_random",
                }
            )
        topic = self.settings.topic(topology.REQUESTS)
        reports: list[tuple[KafkaError | None, KafkaMessage]] = []
        self._producer.produce(
            topic,
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda error, message: reports.append((error, message)),
        )
        self._submitted_ms[request_id] = int(time.time() * 1000)
        give_up = time.monotonic() + timeout + REPORT_GRACE_S
        while not reports and time.monotonic() < give_up:
            self._producer.poll(POLL_S)
        if not reports:
            raise DeliveryError(
                f"the write of request {request_id} to {topic} was not acknowledged within "
                f"{timeout:g} s (LLMPIPE_BOOTSTRAP_SERVERS {self.settings.bootstrap_servers})"
            )
        error, message = reports[0]
        if error is not None:
            raise DeliveryError(
                cause(self.settings, topic, error, self._clients.health.down, timeout)
            )
        self._clients.health.ok()
        return Written(topic, message.partition() or 0, message.offset() or 0)

    # -- results -------------------------------------------------------------------------

    async def results(
        self,
        *,
        group: str | None = None,
        from_beginning: bool = False,
        request_ids: Iterable[str] | None = None,
    ) -> AsyncIterator[Result]:
        """Every result committed to ``llm.results``, as it arrives, until the caller stops.

        Without ``group``: from now on (or ``from_beginning``), nothing remembered. With
        ``group``: a consumer group that starts where it left off (the beginning the first
        time) and commits a result's position once the caller asks for the next one, so a
        restarted service neither skips nor repeats what it handled. ``request_ids`` keeps
        only those. In ``at_least_once`` delivery each request's result is passed once.
        """
        wanted = set(request_ids) if request_ids is not None else None
        seen = _Seen(DEDUP_WINDOW) if self.settings.delivery == "at_least_once" else None
        topic = self.settings.topic(topology.RESULTS)
        consumer = self._clients.consumer(group)
        try:
            await asyncio.to_thread(require_broker, consumer, self.settings)
            if group is None:
                start = OFFSET_BEGINNING if from_beginning else OFFSET_END
                parts = await asyncio.to_thread(partitions, consumer, topic)
                consumer.assign([TopicPartition(topic, p, start) for p in parts])
            else:
                consumer.subscribe([topic])
            while True:
                messages = await asyncio.to_thread(consumer.consume, 100, POLL_S)
                for message in messages:
                    if message.error() is not None:
                        continue
                    result = self._result(message)
                    if result is not None and _passes(result, wanted, seen):
                        yield result
                    if group is not None:
                        consumer.store_offsets(message=message)
                if group is not None and messages:
                    await asyncio.to_thread(_commit, consumer)
        finally:
            if group is not None:
                await asyncio.to_thread(_commit, consumer)
            await asyncio.to_thread(consumer.close)

    def _result(self, message: KafkaMessage) -> Result | None:
        record = to_record(message)
        if record.header(h.ROUTE) == topology.ROUTE_AUDIT:
            return None  # a copy of a delivered result, sent to review for a verdict
        try:
            return self._codec.decode(record.value or b"", Result, record.header(h.CONTENT_TYPE))
        except DecodeError:
            return None  # not a result (llm.results is the pipeline's; nothing else writes)

    # -- wait ----------------------------------------------------------------------------

    def wait(self, request_id: str, timeout: float) -> Result:
        """Block until ``request_id`` has a result; read from just before it was submitted
        through this client (else from the beginning of the topics).

        Raises :class:`RequestDeadLettered` as soon as its dead letter is seen and
        :class:`ResultTimeout` after ``timeout`` seconds (saying whether it is in review).
        """
        names = {
            self.settings.topic(t): t for t in (topology.RESULTS, topology.DLQ, topology.REVIEW)
        }
        since = self._submitted_ms.get(request_id)
        consumer = self._clients.consumer(None)
        in_review = False
        try:
            require_broker(consumer, self.settings)
            assignment = []
            for topic in names:
                parts = partitions(consumer, topic)
                if since is None:
                    assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts]
                    continue
                # The end offsets first: a message written after they were read is at or
                # past them, so starting there (when nothing is as new as ``since``) misses
                # nothing, unlike OFFSET_END, which is resolved later, at assignment.
                ends = {p: watermarks(consumer, topic, p)[1] for p in parts}
                found = consumer.offsets_for_times(
                    [TopicPartition(topic, p, since - 60_000) for p in parts],
                    timeout=self.settings.cli_timeout_s,
                )
                assignment += [
                    TopicPartition(
                        topic, tp.partition, tp.offset if tp.offset >= 0 else ends[tp.partition]
                    )
                    for tp in found
                ]
            consumer.assign(assignment)
            give_up = time.monotonic() + timeout
            while time.monotonic() < give_up:
                for message in consumer.consume(100, POLL_S):
                    if message.error() is not None:
                        continue
                    record = to_record(message)
                    if record.request_id != request_id:
                        continue
                    logical = names[record.topic]
                    if logical == topology.DLQ:
                        raise RequestDeadLettered(
                            request_id,
                            record.header(h.DLQ_REASON) or "unknown",
                            record.header(h.DLQ_ERROR_MESSAGE) or "",
                        )
                    if logical == topology.REVIEW:
                        in_review = in_review or record.header(h.ROUTE) != topology.ROUTE_AUDIT
                        continue
                    result = self._result(message)
                    if result is not None:
                        return result
        finally:
            consumer.close()
        where = " (it is waiting in human review)" if in_review else ""
        raise ResultTimeout(f"no result for request {request_id} within {timeout:g} s{where}")


class _Seen:
    """The keys seen most recently, at most ``size`` of them (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[tuple[str, bool], None] = OrderedDict()

    def first(self, key: tuple[str, bool]) -> bool:
        """True the first time ``key`` is seen (within the window)."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return True


def _passes(result: Result, wanted: set[str] | None, seen: _Seen | None) -> bool:
    """Asked for, and not a redone hop's second publication of the same result."""
    if wanted is not None and result.request_id not in wanted:
        return False
    return seen is None or seen.first((result.request_id, result.source == "human"))


def _commit(consumer: Any) -> None:
    """Commit the stored positions; nothing new to commit is not a failure."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not (isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET):
            raise


def _json_object(variables: Mapping[str, Any]) -> JsonObject:
    """The variables as plain JSON (a round trip refuses what JSON cannot carry)."""
    try:
        parsed = json.loads(json.dumps(dict(variables)))
    except (TypeError, ValueError) as exc:
        raise LlmpipeError(f"variables must be JSON: {exc}") from None
    assert isinstance(parsed, dict)
    return parsed
