"""Which offsets are done, what is safe to commit, and how the rest travels with the commit.

Kafka commits a position, not a set of messages: committing offset N says "everything
below N is done". With many messages in flight a later message often finishes before an
earlier one; committing past the earlier one would lose it on a crash (the hazard of
faust-streaming's ``concurrency > 1``, upstream issue #606). So the committable position
is the lowest offset still unfinished, or one past the highest offset handed out when
nothing is unfinished: the rule Confluent's Parallel Consumer uses.

Finishing above that position is not lost either. Like the Parallel Consumer, the commit
carries the finished offsets above the position in its metadata string
(:func:`encode_done`), so a restarted or newly assigned consumer reads them back with the
committed offset and skips them (:meth:`OffsetTracker.assign`): after a crash only what
was unfinished at the kill is processed again, not everything above the slowest message.

The metadata has a size limit on the broker (``offset.metadata.max.bytes``, 4096 by
default). The encoding picks the shorter of a run-length form (zlib) and a plain bitmap,
so a window of :data:`MAX_WINDOW` offsets always fits whatever the completion pattern;
the runner stops fetching a partition whose window reaches that size (back-pressure)
instead of dropping what is done or committing past what is not.
"""

from __future__ import annotations

import base64
import heapq
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

# Offsets between the committable position and the furthest finished offset that one
# partition may span before the runner stops fetching it. A bitmap of this many bits
# plus one fetch batch of overshoot (FETCH_OVERSHOOT) is 2,564 bytes, 3,422 characters
# in base64: under METADATA_MAX_CHARS for every completion pattern.
MAX_WINDOW = 20_000
FETCH_OVERSHOOT = 500
# The broker refuses metadata longer than offset.metadata.max.bytes (4096 by default);
# keep a margin for brokers configured a little lower.
METADATA_MAX_CHARS = 4_000
METADATA_PREFIX = "lp1"
_RUNS = "r"
_BITMAP = "b"
# Decoding refuses anything spanning more than this: metadata is read from the broker,
# where any client of the group could have written it.
_MAX_DECODED_SPAN = 4 * (MAX_WINDOW + FETCH_OVERSHOOT)


class MetadataError(ValueError):
    """Commit metadata that this encoding did not write (another tool, or corruption)."""


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _runs(position: int, done: list[int]) -> bytes:
    """Alternating run lengths, starting with offsets not done: ``[gap, done, gap, ...]``."""
    out = bytearray()
    cursor = position
    i = 0
    while i < len(done):
        start = done[i]
        j = i
        while j + 1 < len(done) and done[j + 1] == done[j] + 1:
            j += 1
        _varint(start - cursor, out)
        _varint(j - i + 1, out)
        cursor = done[j] + 1
        i = j + 1
    return bytes(out)


def _bitmap(position: int, done: list[int]) -> bytes:
    bits = bytearray((done[-1] - position) // 8 + 1)
    for offset in done:
        relative = offset - position
        bits[relative >> 3] |= 1 << (relative & 7)
    return bytes(bits)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_done(position: int, done: Iterable[int]) -> str:
    """Metadata for a commit at ``position``: the finished offsets at or above it.

    Empty when nothing above the position is finished (the common case when messages
    finish in order), so an ordinary commit costs nothing extra.
    """
    offsets = sorted({o for o in done if o >= position})
    if not offsets:
        return ""
    runs = METADATA_PREFIX + _RUNS + _b64(zlib.compress(_runs(position, offsets), 9))
    bitmap = METADATA_PREFIX + _BITMAP + _b64(_bitmap(position, offsets))
    return min(runs, bitmap, key=len)


def _read_varints(data: bytes) -> list[int]:
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            if shift > 63:
                raise MetadataError("varint too long")
            continue
        values.append(value)
        value = shift = 0
    if shift:
        raise MetadataError("truncated varint")
    return values


def decode_done(position: int, metadata: str | None) -> set[int]:
    """The finished offsets recorded with a commit at ``position`` (see :func:`encode_done`)."""
    if not metadata:
        return set()
    if not metadata.startswith(METADATA_PREFIX) or len(metadata) < len(METADATA_PREFIX) + 2:
        raise MetadataError("not llmpipe commit metadata")
    kind = metadata[len(METADATA_PREFIX)]
    text = metadata[len(METADATA_PREFIX) + 1 :]
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise MetadataError(f"bad base64: {exc}") from exc
    if kind == _BITMAP:
        if len(data) * 8 > _MAX_DECODED_SPAN:
            raise MetadataError("bitmap too large")
        return {
            position + (i << 3) + bit
            for i, byte in enumerate(data)
            if byte
            for bit in range(8)
            if byte >> bit & 1
        }
    if kind != _RUNS:
        raise MetadataError(f"unknown metadata kind {kind!r}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, 10 * _MAX_DECODED_SPAN)
    except zlib.error as exc:
        raise MetadataError(f"bad zlib data: {exc}") from exc
    if inflater.unconsumed_tail:
        raise MetadataError("run list too large")
    values = _read_varints(raw)
    if len(values) % 2:
        raise MetadataError("odd number of runs")
    done: set[int] = set()
    cursor = position
    for gap, length in zip(values[::2], values[1::2], strict=True):
        cursor += gap
        if length == 0 or cursor + length - position > _MAX_DECODED_SPAN:
            raise MetadataError("run out of range")
        done.update(range(cursor, cursor + length))
        cursor += length
    return done


@dataclass(frozen=True)
class CommitPoint:
    """What to commit for one partition: the position and the finished offsets above it."""

    position: int
    done: tuple[int, ...]
    version: int

    @property
    def metadata(self) -> str:
        return encode_done(self.position, self.done)


@dataclass
class _PartitionState:
    in_flight: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # finished, at or above the last position
    highest_done: int = -1
    next_position: int | None = None  # one past the highest offset handed out
    first: int | None = None  # the lowest offset handed out since the assignment
    committed: int | None = None
    version: int = 0  # bumped by every change that a commit must record
    committed_version: int = -1


def _nothing_new(state: _PartitionState, position: int | None) -> bool:
    """Whether a commit of ``position`` would record nothing the last one did not.

    Also when nothing was ever committed and nothing has finished: the position is then
    where this assignment started reading, and committing it alone only costs a commit
    (exactly once, a transaction with no outputs) that the first finished message makes
    anyway. Without this an idle runner on a never-committed partition had something
    to commit for ever (it polled and committed every interval), and the first fetch
    after idling committed the start offset while the messages it fetched were in
    flight."""
    if position is None:  # nothing handed out yet
        return True
    if state.committed is None:
        return not state.done and position == state.first
    return position == state.committed and state.version == state.committed_version


class OffsetTracker:
    """Per-partition bookkeeping; start/done are O(log n) in the number in flight."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], _PartitionState] = {}

    def assign(
        self,
        topic: str,
        partition: int,
        committed: int | None,
        metadata: str,
        also_done: Iterable[int] = (),
    ) -> int:
        """Start owning a partition at its committed offset; returns how many offsets the
        commit recorded as already done (they are skipped when they arrive). ``also_done``:
        offsets known done some other way (their outputs delivered, their commit lost).

        Raises :class:`MetadataError` for metadata this module did not write; the caller
        decides to process those offsets again (safe: nothing is lost, some work redone).
        """
        state = _PartitionState()
        self._parts[(topic, partition)] = state
        if committed is None or committed < 0:
            state.done = set(also_done)
            state.highest_done = max(state.done, default=-1)
            return len(state.done)
        state.committed = state.next_position = committed
        state.done = decode_done(committed, metadata) | {o for o in also_done if o >= committed}
        state.highest_done = max(state.done, default=-1)
        state.committed_version = state.version
        return len(state.done)

    def is_done(self, topic: str, partition: int, offset: int) -> bool:
        """Already finished: recorded with the commit this partition was assigned at."""
        state = self._parts.get((topic, partition))
        return state is not None and offset in state.done

    def start(self, topic: str, partition: int, offset: int) -> None:
        state = self._parts.setdefault((topic, partition), _PartitionState())
        if state.first is None or offset < state.first:
            state.first = offset
        state.in_flight.add(offset)
        heapq.heappush(state.heap, offset)
        if state.next_position is None or offset + 1 > state.next_position:
            state.next_position = offset + 1

    def done(self, topic: str, partition: int, offset: int) -> None:
        state = self._parts.get((topic, partition))
        if state is None or offset not in state.in_flight:
            return
        state.in_flight.discard(offset)
        state.done.add(offset)
        state.highest_done = max(state.highest_done, offset)
        state.version += 1

    def _position(self, state: _PartitionState) -> int | None:
        while state.heap and state.heap[0] not in state.in_flight:
            heapq.heappop(state.heap)
        return state.heap[0] if state.heap else state.next_position

    def commit_point(self, topic: str, partition: int) -> CommitPoint | None:
        """What to commit now, or None when the last commit already recorded all of it."""
        state = self._parts.get((topic, partition))
        if state is None:
            return None
        position = self._position(state)
        if state.done and position is not None and min(state.done) < position:
            state.done = {o for o in state.done if o >= position}
        if _nothing_new(state, position):
            return None
        assert position is not None
        return CommitPoint(position, tuple(sorted(state.done)), state.version)

    def changed(self, topic: str, partition: int) -> bool:
        """Whether :meth:`commit_point` has something new (cheap: no snapshot)."""
        state = self._parts.get((topic, partition))
        if state is None:
            return False
        return not _nothing_new(state, self._position(state))

    def committable(self, topic: str, partition: int) -> int | None:
        """The position to commit, or None when nothing new is safe to commit."""
        point = self.commit_point(topic, partition)
        return point.position if point is not None else None

    def mark_committed(
        self, topic: str, partition: int, position: int, version: int | None = None
    ) -> None:
        state = self._parts.get((topic, partition))
        if state is not None:
            state.committed = position
            state.committed_version = state.version if version is None else version

    def window(self, topic: str, partition: int) -> int:
        """Offsets between the committable position and the furthest one handed out or
        finished: what the next commit's metadata may have to cover."""
        state = self._parts.get((topic, partition))
        if state is None:
            return 0
        position = self._position(state)
        if position is None:
            return 0
        furthest = max(state.next_position or position, state.highest_done + 1)
        return max(0, furthest - position)

    def add_done(self, topic: str, partition: int, offset: int) -> None:
        """``offset`` is known done some other way (its outputs were acknowledged after
        the partition went and came back): skipped when it arrives, recorded by the next
        commit. Nothing changes when it is being processed again, or already passed."""
        state = self._parts.get((topic, partition))
        if state is None or offset in state.in_flight or offset in state.done:
            return
        position = self._position(state)
        if position is None or offset >= position:
            state.done.add(offset)
            state.highest_done = max(state.highest_done, offset)
            state.version += 1

    def finished(self, topic: str, partition: int) -> set[int]:
        """Every offset finished above the last successful commit: those below the
        committable position (all finished: it is the lowest unfinished one) and those
        finished above it."""
        state = self._parts.get((topic, partition))
        if state is None:
            return set()
        position = self._position(state)
        low = state.committed if state.committed is not None else state.first
        below = range(low, position) if low is not None and position is not None else range(0)
        return {*below, *state.done}

    def in_flight(self, topic: str, partition: int) -> int:
        state = self._parts.get((topic, partition))
        return len(state.in_flight) if state else 0

    def total_in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self._parts.values())

    def partitions(self) -> list[tuple[str, int]]:
        return list(self._parts)

    def forget(self, topic: str, partition: int) -> None:
        """After a partition is revoked its offsets belong to another consumer."""
        self._parts.pop((topic, partition), None)
