"""What each stage group has committed, per request: the "uncommitted" side of a fault.

A crash can only make the pipeline redo work whose input offset was not committed when it
died: the calls in flight, and work finished but not yet covered by a commit (a commit
covers everything below its position plus the finished offsets listed in its metadata,
see :mod:`pipeline.transport.offsets`). Fault tests read the committed positions of every
stage group right after each fault and turn them into request ids, so they can bound the
redone calls and duplicates by what was actually uncommitted, request by request, instead
of by a worst case.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.ledger import committed_reader, request_id_of
from pipeline.transport.clients import KafkaClients
from pipeline.transport.offsets import decode_done

# Right after a broker restart (or on a loaded machine) the group coordinator answers
# NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS at once, for seconds: asked again and
# again until it answers, a pause between tries, within COMMITTED_DEADLINE_S.
COMMITTED_DEADLINE_S = 60.0
COMMITTED_RETRY_S = 0.5

# Where each stage's work for a request shows up; a request is "at risk" in a stage when
# its input there is uncommitted and an output of that stage exists (a redo repeats it).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    name: (*stage.outputs.values(), topology.DLQ) for name, stage in topology.STAGES.items()
}


@dataclass(frozen=True)
class Placed:
    """One message of a request: where it is and when it was written."""

    partition: int
    offset: int
    timestamp_ms: int


@dataclass
class TopicIndex:
    """Request id -> its messages in one topic (committed data only)."""

    topic: str
    by_request: dict[str, list[Placed]] = field(default_factory=dict)

    def requests(self) -> set[str]:
        return set(self.by_request)


@dataclass
class GroupCommits:
    """One stage group's committed positions and the finished offsets above them."""

    group: str
    topic: str
    positions: dict[int, int]
    done_above: dict[int, set[int]]

    def covers(self, partition: int, offset: int) -> bool:
        position = self.positions.get(partition, -1)
        return offset < position or offset in self.done_above.get(partition, set())


def read_indexes(
    settings: Settings, logical: Iterable[str], timeout_s: float = 30
) -> dict[str, TopicIndex]:
    """Index topics' committed messages by request id, from the beginning to their end.

    The end is the last stable offset, where ``read_committed`` stops (librdkafka reports
    it as partition EOF): a dead worker's open transaction may hold it below the high
    watermark until the broker aborts it, and nothing above it was delivered anyway. One
    reader for all topics: a snapshot is taken while a fault test waits.
    """
    names = {settings.topic(t): t for t in logical}
    indexes = {t: TopicIndex(t) for t in names.values()}
    consumer: Consumer = committed_reader(settings, eof=True)
    try:
        metadata = consumer.list_topics(timeout=10).topics
        pending = {(topic, p) for topic in names for p in metadata[topic].partitions}
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"partitions {sorted(pending)[:5]} not read to the end")
            for message in consumer.consume(num_messages=5000, timeout=0.2):
                where = (str(message.topic()), int(message.partition() or 0))
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(where)
                    continue
                rid = request_id_of(message)
                if rid is not None:
                    indexes[names[where[0]]].by_request.setdefault(rid, []).append(
                        Placed(where[1], int(message.offset() or 0), int(message.timestamp()[1]))
                    )
    finally:
        consumer.close()
    return indexes


def read_index(settings: Settings, logical: str, timeout_s: float = 30) -> TopicIndex:
    """One topic's committed messages by request id (see :func:`read_indexes`)."""
    return read_indexes(settings, [logical], timeout_s)[logical]


def group_commits(settings: Settings, stage: str) -> GroupCommits:
    """The committed positions (and metadata) of one stage's consumer group."""
    group = settings.group(stage)
    topic = settings.topic(topology.STAGES[stage].input_topic)
    consumer = KafkaClients(settings).consumer(group)  # never subscribes: reads, not joins
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        wanted = [TopicPartition(topic, p) for p in partitions]
        deadline = time.monotonic() + COMMITTED_DEADLINE_S
        while True:
            try:
                committed = consumer.committed(wanted, timeout=15)
                break
            except KafkaException:  # a coordinator still loading after a broker start
                if time.monotonic() > deadline:
                    raise
                time.sleep(COMMITTED_RETRY_S)
    finally:
        consumer.close()
    positions: dict[int, int] = {}
    done: dict[int, set[int]] = {}
    for tp in committed:
        if tp.offset >= 0:
            positions[tp.partition] = tp.offset
            done[tp.partition] = decode_done(tp.offset, tp.metadata)
    return GroupCommits(group, topology.STAGES[stage].input_topic, positions, done)


@dataclass
class CommitSnapshot:
    """Every stage's commits at one moment, and which requests each leaves uncommitted."""

    taken_at_ms: int
    groups: dict[str, GroupCommits]
    inputs: dict[str, TopicIndex]
    outputs: dict[str, TopicIndex]

    def uncommitted(self, stage: str) -> set[str]:
        """Requests with an input message in ``stage`` that no commit covers."""
        commits = self.groups[stage]
        index = self.inputs[commits.topic]
        return {
            rid
            for rid, placed in index.by_request.items()
            if any(not commits.covers(m.partition, m.offset) for m in placed)
        }

    def finished_uncommitted(self, stage: str) -> dict[str, int]:
        """Requests the stage has produced an output for while its input is uncommitted:
        a redo after this moment repeats that output (a duplicate, at least once).

        Values are the age in ms of the newest such output at the snapshot, so a test can
        tell "finished since the last commit" from "finished long ago, never recorded".
        """
        outs = [self.outputs[t] for t in STAGE_OUTPUTS[stage]]
        out: dict[str, int] = {}
        for rid in self.uncommitted(stage):
            stamps = [m.timestamp_ms for o in outs for m in o.by_request.get(rid, [])]
            if stamps:
                out[rid] = self.taken_at_ms - max(stamps)
        return out


def snapshot(settings: Settings, stages: Iterable[str] = tuple(topology.STAGES)) -> CommitSnapshot:
    """Read every stage group's commits, then the topics needed to name their requests.

    Commits first: a message read later than its commit can only make a request look
    committed if it was, so the snapshot never under-counts what was uncommitted.
    """
    taken = int(time.time() * 1000)
    groups = {s: group_commits(settings, s) for s in stages}
    topics = {g.topic for g in groups.values()} | {t for s in stages for t in STAGE_OUTPUTS[s]}
    indexes = read_indexes(settings, topics)
    inputs = {g.topic: indexes[g.topic] for g in groups.values()}
    outputs = {t: indexes[t] for s in stages for t in STAGE_OUTPUTS[s]}
    return CommitSnapshot(taken, groups, inputs, outputs)
