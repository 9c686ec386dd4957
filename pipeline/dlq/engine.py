"""Resumable, never-twice production of messages derived from source records.

``replay`` and ``reparse`` are the same loop with different rules: read source records
with a consumer group of the tool's own, decide per record, produce, wait for the broker's
acknowledgement, and only then commit the source offsets. Three pieces make it safe to
interrupt at any instant, SIGKILL included:

1. **A bounded plan.** Before producing anything the run snapshots the end offsets and
   decides every record in ``[committed, end)``. Replayed messages that fail again land
   *after* that snapshot, so a run can never chase its own output, and ``--dry-run`` shows
   exactly what a real run would do. ``--limit`` cuts each partition at an offset, so the
   committed position never jumps over a selected record that was not sent.
2. **Commit after acknowledgement.** Each batch is flushed (idempotent producer,
   ``acks=all``) before its offsets are committed. A crash before the commit means the
   batch is read again on the next run, never that a record is skipped.
3. **Recovery markers.** Flush-then-commit alone would re-send a batch that was acknowledged
   but not yet committed when the process died. Every produced message therefore carries a
   marker header ``<group>|<topic>|<partition>|<offset>`` naming its source record, and every
   commit stores its wall-clock time in the offset metadata. The next run reads the
   destinations from (last commit - margin) to their end, collects the markers of its own
   group, and treats those source records as already sent. That closes the gap without
   Kafka transactions, which would not protect the pipeline's read-uncommitted consumers.

The commit metadata also stores a fingerprint of the selection (filters, destination,
replay limits). The committed position is a cursor over *all* records, not over the
selected ones, so resuming with a different filter would silently skip records the new
filter selects but the old one passed over; a changed fingerprint is refused instead.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.config import Settings
from pipeline.digits import ascii_int
from pipeline.errors import LlmpipeError
from pipeline.transport.clients import KafkaClients
from pipeline.transport.reader import (
    METADATA_TIMEOUT_S,
    Ranges,
    RawHeaders,
    SourceRecord,
    offsets_for_time,
    partitions,
    read_ranges,
    reader_consumer,
    require_broker,
    to_record,
    watermarks,
    where,
)

# Producer clock and destination timestamps come from the same host in the crashed run;
# the margin covers clock steps and LogAppendTime topics whose broker clock differs a bit.
RECOVERY_MARGIN_MS = 120_000
FLUSH_TIMEOUT_S = 60.0
ASSIGN_TIMEOUT_S = 30.0
META_VERSION = 1

Action = Literal["send", "refuse", "recovered"]


class EngineError(LlmpipeError):
    """Something the operator must act on; the message says what and how."""

    exit_code = 1


class SelectionChanged(EngineError):
    """The group's committed position was made by a different selection (see module doc)."""

    exit_code = 2


@dataclass(frozen=True)
class Outgoing:
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes | None
    headers: RawHeaders


@dataclass
class PlanItem:
    """One selected source record and what this run will do with it."""

    ref: tuple[str, int, int]
    timestamp_ms: int | None
    action: Action
    note: str
    destination: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    payload: Any = None  # selector-specific, e.g. the re-parsed messages

    @property
    def tp(self) -> tuple[str, int]:
        return self.ref[0], self.ref[1]


class Selector(Protocol):
    """The rules of one tool (replay, reparse); the engine supplies the Kafka mechanics."""

    kind: str
    marker_header: str

    def consider(self, record: SourceRecord) -> PlanItem | None:
        """A plan item for a selected record; None when the filters do not select it."""
        ...

    def finalize(self, items: list[PlanItem]) -> None:
        """Called once the scan is complete (reparse loads stored completions here)."""
        ...

    def outgoing(self, record: SourceRecord, item: PlanItem) -> list[Outgoing]:
        """The messages to produce for a record the plan says to send."""
        ...

    def fingerprint_parts(self) -> dict[str, Any]:
        """Everything that changes *which* records are sent; part of the resume check."""
        ...


@dataclass
class Plan:
    group: str
    sources: list[str]
    ranges: Ranges
    stops: dict[tuple[str, int], int]
    items: list[PlanItem]
    fingerprint: str
    scanned: int = 0
    warnings: list[str] = field(default_factory=list)
    last_commit_ms: int | None = None
    # Partitions whose start is not the committed position (new group, --from-beginning,
    # --since seeking forward): the run commits these starts before it produces anything.
    resets: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_ref = {item.ref: item for item in self.items}

    def within_limit(self, item: PlanItem) -> bool:
        return item.ref[2] < self.stops.get(item.tp, 0)

    def count(self, action: Action, within_limit: bool = True) -> int:
        return sum(
            1
            for item in self.items
            if item.action == action and (not within_limit or self.within_limit(item))
        )

    @property
    def to_send(self) -> int:
        return self.count("send")


@dataclass
class RunReport:
    sent: int = 0
    messages: int = 0
    recovered: int = 0
    refused: int = 0
    skipped: int = 0
    commits: int = 0
    by_destination: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "messages": self.messages,
            "recovered": self.recovered,
            "refused": self.refused,
            "skipped": self.skipped,
            "commits": self.commits,
            "by_destination": dict(self.by_destination),
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def marker_value(group: str, record: SourceRecord) -> bytes:
    return f"{group}|{record.topic}|{record.partition}|{record.offset}".encode()


def parse_marker(raw: bytes | None) -> tuple[str, str, int, int] | None:
    if raw is None:
        return None
    parts = raw.decode("utf-8", "replace").rsplit("|", 3)
    if len(parts) != 4:
        return None
    partition, offset = ascii_int(parts[2]), ascii_int(parts[3])
    if partition is None or offset is None:
        return None
    return parts[0], parts[1], partition, offset


def fingerprint(selector: Selector) -> str:
    canonical = json.dumps(
        {"kind": selector.kind, **selector.fingerprint_parts()}, sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _meta(fp: str, selector: Selector, clean: bool = False) -> str:
    """Offset metadata: when, for which selection, and whether the run ended cleanly.

    ``clean`` is written only by the last commit of a run that flushed everything; any other
    commit (the start of a run, each batch) leaves it false, so a run that dies at any point
    leaves a commit that tells the next run to look for its unacknowledged sends.
    """
    data: dict[str, Any] = {"v": META_VERSION, "t": int(time.time() * 1000), "f": fp}
    data["k"] = selector.kind
    if clean:
        data["c"] = 1
    return json.dumps(data, separators=(",", ":"))


def _read_meta(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def plan(
    settings: Settings,
    selector: Selector,
    *,
    sources: Sequence[str],
    group: str,
    limit: int | None = None,
    since_ms: int | None = None,
    from_beginning: bool = False,
    dry_run: bool = False,
) -> Plan:
    """Decide everything this run will do, before it does anything.

    Read-only, even for a real run: the starting positions are committed by the run's own
    group member (see :class:`_Run`), because a broker refuses commits from outside a group
    that still lists a member, which is the case for a while after a SIGKILL.
    """
    fp = fingerprint(selector)
    warnings: list[str] = []
    consumer = reader_consumer(settings, group)
    try:
        require_broker(consumer, settings)
        ranges: Ranges = {}
        resets: set[tuple[str, int]] = set()
        last_commit_ms: int | None = None
        changed: list[str] = []
        for topic in sources:
            parts = partitions(consumer, topic)
            committed = consumer.committed(
                [TopicPartition(topic, p) for p in parts], timeout=METADATA_TIMEOUT_S
            )
            seek = offsets_for_time(consumer, topic, parts, since_ms) if since_ms else {}
            for tp in committed:
                low, high = watermarks(consumer, topic, tp.partition)
                has_commit = tp.offset != OFFSET_INVALID and tp.offset >= 0
                meta = _read_meta(getattr(tp, "metadata", None)) if has_commit else {}
                if has_commit and meta.get("f") not in (None, fp):
                    changed.append(f"{topic}[{tp.partition}]")
                if has_commit and not from_beginning:
                    start = max(int(tp.offset), low)
                    if isinstance(meta.get("t"), int) and not meta.get("c"):
                        last_commit_ms = min(last_commit_ms or meta["t"], meta["t"])
                else:
                    start = low
                if since_ms:
                    found = seek.get(tp.partition, -1)
                    start = max(start, high if found < 0 else found)
                ranges[(topic, tp.partition)] = (start, high)
                if not has_commit or start != tp.offset:
                    resets.add((topic, tp.partition))
        if changed and not from_beginning:
            message = (
                f"consumer group {group} last ran with a different selection (filters, "
                f"destination or replay limits) on {', '.join(changed[:4])}. Its position is a "
                "cursor over every record, so resuming would skip records the new selection "
                "wants. Use a new --group, or --from-beginning to rescan this group."
            )
            if not dry_run:
                raise SelectionChanged(message)
            warnings.append(message)
        items: list[PlanItem] = []
        scanned = 0
        for record in read_ranges(consumer, ranges):
            scanned += 1
            item = selector.consider(record)
            if item is not None:
                items.append(item)
        selector.finalize(items)
        if last_commit_ms is not None:
            _mark_recovered(settings, selector, group, items, last_commit_ms)
        stops = _limit_stops(ranges, items, limit)
        return Plan(
            group=group,
            sources=list(sources),
            ranges=ranges,
            stops=stops,
            items=items,
            fingerprint=fp,
            scanned=scanned,
            warnings=warnings,
            last_commit_ms=last_commit_ms,
            resets=resets,
        )
    finally:
        consumer.close()


def _limit_stops(
    ranges: Ranges, items: list[PlanItem], limit: int | None
) -> dict[tuple[str, int], int]:
    """Per partition, the offset where this run stops: the end, or the first send past the limit.

    Sends are taken oldest first across partitions but always as a prefix of each partition,
    so that committing "everything before the stop" never commits an unsent selected record.
    """
    stops = {tp: end for tp, (_, end) in ranges.items()}
    if limit is None:
        return stops
    queues: dict[tuple[str, int], list[PlanItem]] = {}
    for item in sorted(items, key=lambda i: i.ref):
        if item.action == "send":
            queues.setdefault(item.tp, []).append(item)
    heap = [((q[0].timestamp_ms or 0), tp, 0) for tp, q in queues.items()]
    heapq.heapify(heap)
    taken = 0
    while heap and taken < limit:
        _, tp, index = heapq.heappop(heap)
        taken += 1
        if index + 1 < len(queues[tp]):
            nxt = queues[tp][index + 1]
            heapq.heappush(heap, ((nxt.timestamp_ms or 0), tp, index + 1))
    cut: dict[tuple[str, int], int] = {}
    for _, tp, index in heap:
        cut[tp] = index
    for tp, queue in queues.items():
        if tp in cut:
            stops[tp] = queue[cut[tp]].ref[2]
    return stops


def _mark_recovered(
    settings: Settings,
    selector: Selector,
    group: str,
    items: list[PlanItem],
    last_commit_ms: int,
) -> None:
    """Find messages a previous, interrupted run produced but never committed."""
    destinations = {i.destination for i in items if i.action == "send" and i.destination}
    if not destinations:
        return
    sent = find_markers(
        settings, destinations, selector.marker_header, group, last_commit_ms - RECOVERY_MARGIN_MS
    )
    for item in items:
        if item.action == "send" and item.ref in sent:
            item.action = "recovered"
            item.note = "already sent by an interrupted run"


def find_markers(
    settings: Settings, topics: Iterable[str], header: str, group: str, since_ms: int
) -> set[tuple[str, int, int]]:
    """Source refs named by ``header`` markers of ``group`` in ``topics`` since ``since_ms``."""
    found = count_markers(settings, topics, header, since_ms)
    return {marker[1:] for marker in found if marker[0] == group}


def count_markers(
    settings: Settings, topics: Iterable[str], header: str, since_ms: int
) -> Counter[tuple[str, str, int, int]]:
    """How many messages in ``topics`` since ``since_ms`` carry each ``header`` marker
    (``(group, topic, partition, offset)`` of the source record): the replay records."""
    consumer = reader_consumer(settings)
    found: Counter[tuple[str, str, int, int]] = Counter()
    try:
        ranges: Ranges = {}
        for topic in topics:
            parts = partitions(consumer, topic)
            starts = offsets_for_time(consumer, topic, parts, since_ms)
            for p in parts:
                _, high = watermarks(consumer, topic, p)
                start = starts.get(p, -1)
                if 0 <= start < high:
                    ranges[(topic, p)] = (start, high)
        for record in read_ranges(consumer, ranges):
            marker = parse_marker(record.headers_map.get(header))
            if marker is not None:
                found[marker] += 1
    finally:
        consumer.close()
    return found


class _Pacer:
    """At most ``rate`` sends per second, evenly spaced (no bursts after a pause)."""

    def __init__(self, rate: float | None, stop: threading.Event) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()
        self._stop = stop

    def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            self._stop.wait(self._next - now)
        self._next = max(self._next, now) + self._interval


class _Run:
    """State of one execution; librdkafka's rebalance and delivery callbacks land here."""

    def __init__(
        self,
        settings: Settings,
        selector: Selector,
        the_plan: Plan,
        rate: float | None,
        stop: threading.Event,
        on_progress: Callable[[RunReport], None] | None,
    ) -> None:
        self.selector = selector
        self.plan = the_plan
        self.stop = stop
        self.on_progress = on_progress
        self.report = RunReport()
        self.pacer = _Pacer(rate, stop)
        # About one second of work per batch when paced, so commits stay frequent and the
        # consumer is polled well within max.poll.interval.ms.
        self.batch_size = max(1, min(500, int(rate))) if rate else 500
        self.positions: dict[tuple[str, int], int] = {}
        self.assigned: set[tuple[str, int]] = set()
        self.done: set[tuple[str, int]] = set()
        self.resets_left = set(the_plan.resets)
        self.dirty = False
        self.broken = False
        self.delivery_errors: list[str] = []
        self.partition_counts: dict[str, int] = {}
        clients = KafkaClients(settings)
        self.consumer = clients.reader(
            the_plan.group,
            **{
                # Eager rebalances (revoke everything, then assign) keep the callbacks simple.
                "partition.assignment.strategy": "range",
                # After a SIGKILL the dead member blocks the next run's join until its session
                # expires: keep that short (the broker's minimum is usually 6 s).
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
            },
        )
        # Same key -> same partition as the Java and aiokafka clients upstream.
        self.producer = clients.producer(partitioner="murmur2_random")

    # -- rebalance callbacks --------------------------------------------------------------

    def on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Start at the committed position, which may be ahead of the plan if another run of
        this group made progress meanwhile; or at the plan's start where the plan resets it."""
        committed = consumer.committed(
            [TopicPartition(tp.topic, tp.partition) for tp in assigned],
            timeout=METADATA_TIMEOUT_S,
        )
        start: list[TopicPartition] = []
        for tp in committed:
            key = (tp.topic, tp.partition)
            planned = self.plan.ranges.get(key, (0, 0))[0]
            offset = planned if key in self.resets_left or tp.offset < 0 else int(tp.offset)
            self.resets_left.discard(key)
            # Commit the start (time, selection, "not clean") before producing anything, so
            # a crash from here on is always followed by a recovery scan.
            self.dirty = True
            self.positions[key] = offset
            self.assigned.add(key)
            if offset >= self.plan.stops.get(key, 0):
                self.done.add(key)
            start.append(TopicPartition(tp.topic, tp.partition, offset))
        consumer.assign(start)

    def on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Give partitions back only after their produced messages are durable and committed."""
        if not self.broken:
            self.flush_and_commit()
        for tp in revoked:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.done.discard(key)
        consumer.unassign()

    # -- producing ------------------------------------------------------------------------

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.delivery_errors.append(f"{message.topic()}: {error.str()}")

    def _partition(self, out: Outgoing) -> int | None:
        """Keep the original partition when it still exists (per-key order), else hash the key."""
        if out.partition is None:
            return None
        if out.topic not in self.partition_counts:
            # Asked of the producer: the consumer's metadata requests queue behind its fetches.
            metadata = self.producer.list_topics(out.topic, timeout=METADATA_TIMEOUT_S)
            described = metadata.topics.get(out.topic)
            self.partition_counts[out.topic] = len(described.partitions) if described else 0
        return out.partition if out.partition < self.partition_counts[out.topic] else None

    def send(self, record: SourceRecord, item: PlanItem) -> None:
        messages = self.selector.outgoing(record, item)
        self.pacer.wait()
        for out in messages:
            extra: dict[str, Any] = {}
            partition = self._partition(out)
            if partition is not None:
                extra["partition"] = partition
            while True:
                try:
                    self.producer.produce(
                        out.topic,
                        value=out.value,
                        key=out.key,
                        headers=list(out.headers),
                        on_delivery=self._delivered,
                        **extra,
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain, then retry
                    self.producer.poll(0.5)
            self.producer.poll(0)
            self.report.messages += 1
            self.report.by_destination[out.topic] += 1
        self.report.sent += 1

    def flush_and_commit(self, clean: bool = False) -> None:
        """The only place offsets are committed: strictly after every delivery succeeded."""
        if not self.dirty and not clean:
            return
        remaining = self.producer.flush(FLUSH_TIMEOUT_S)
        if remaining:
            self.broken = True
            raise EngineError(
                f"{remaining} messages not acknowledged within {FLUSH_TIMEOUT_S:.0f}s; "
                "nothing committed for this batch, run again to resume"
            )
        if self.delivery_errors:
            self.broken = True
            raise EngineError(
                "delivery failed ("
                + "; ".join(self.delivery_errors[:3])
                + "); nothing committed for this batch, run again to resume"
            )
        meta = _meta(self.plan.fingerprint, self.selector, clean)
        offsets = [
            TopicPartition(t, p, self.positions[(t, p)], metadata=meta)
            for t, p in sorted(self.assigned)
            if (t, p) in self.positions
        ]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                self.broken = True
                raise EngineError(f"commit failed ({exc}); run again to resume") from None
            self.report.commits += 1
        self.dirty = False

    # -- the loop -------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        topic, partition, offset = where(message)
        key = (topic, partition)
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                if key in self.assigned:
                    self.done.add(key)
                return
            raise EngineError(f"reading {key[0]}[{key[1]}]: {error.str()}")
        if key not in self.assigned or key in self.done:
            return
        if offset < self.positions.get(key, 0):
            return  # already handled (a redelivery after a rebalance)
        if offset >= self.plan.stops.get(key, 0):
            self.done.add(key)
            return
        item = self.plan.by_ref.get((key[0], key[1], offset))
        if item is None:
            self.report.skipped += 1
        elif item.action == "send":
            self.send(to_record(message), item)
        elif item.action == "recovered":
            self.report.recovered += 1
        else:
            self.report.refused += 1
        self.positions[key] = offset + 1
        self.dirty = True
        if offset + 1 >= self.plan.stops.get(key, 0):
            self.done.add(key)
        if self.on_progress is not None:
            self.on_progress(self.report)

    def finished(self) -> bool:
        return bool(self.assigned) and self.assigned <= self.done

    def run(self) -> RunReport:
        started = time.monotonic()
        self.consumer.subscribe(
            self.plan.sources, on_assign=self.on_assign, on_revoke=self.on_revoke
        )
        try:
            while not self.stop.is_set() and not self.finished():
                if not self.assigned and time.monotonic() - started > ASSIGN_TIMEOUT_S:
                    raise EngineError(
                        f"no partitions assigned to group {self.plan.group} within "
                        f"{ASSIGN_TIMEOUT_S:.0f}s; is another run holding them all?"
                    )
                messages = self.consumer.consume(self.batch_size, timeout=0.1)
                # A fresh assignment's starting positions are committed (with the time, for
                # recovery) before the first message of this run is produced.
                self.flush_and_commit()
                for message in messages:
                    self.handle(message)
                    if self.stop.is_set():
                        break
                self.flush_and_commit()
            self.report.interrupted = self.stop.is_set() and not self.finished()
            self.flush_and_commit(clean=True)
        except BaseException:
            self.broken = True
            raise
        finally:
            self.producer.flush(FLUSH_TIMEOUT_S)
            self.consumer.close()
            self.report.elapsed_s = time.monotonic() - started
        return self.report


def execute(
    settings: Settings,
    selector: Selector,
    the_plan: Plan,
    *,
    rate: float | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Carry out a plan made by :func:`plan` (which must not have been a dry run).

    Runs of the same group may overlap: the group protocol gives each its own partitions,
    and a partition changes hands only after its produced messages are committed.
    """
    if rate is not None and rate <= 0:
        raise EngineError("--rate must be positive")
    if not the_plan.to_send and not the_plan.count("recovered"):
        return RunReport()
    run = _Run(settings, selector, the_plan, rate, stop or threading.Event(), on_progress)
    return run.run()
