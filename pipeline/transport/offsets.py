"""Which offset is safe to commit when many messages of one partition are in flight.

Kafka commits a position, not a set of messages: committing offset N says "everything
below N is done". With concurrent processing, a later message can finish before an
earlier one; committing its offset would lose the earlier one on a crash (the hazard of
faust-streaming's ``concurrency > 1``, upstream issue #606). So the committable position
is the lowest offset still in flight, or one past the highest completed offset when
nothing is in flight, the rule Confluent's Parallel Consumer uses.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class _PartitionState:
    in_flight: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)
    next_position: int | None = None  # one past the highest offset handed out
    committed: int | None = None


class OffsetTracker:
    """Per-partition bookkeeping; all methods are O(log n) in the number in flight."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], _PartitionState] = {}

    def start(self, topic: str, partition: int, offset: int) -> None:
        state = self._parts.setdefault((topic, partition), _PartitionState())
        state.in_flight.add(offset)
        heapq.heappush(state.heap, offset)
        if state.next_position is None or offset + 1 > state.next_position:
            state.next_position = offset + 1

    def done(self, topic: str, partition: int, offset: int) -> None:
        state = self._parts.get((topic, partition))
        if state is not None:
            state.in_flight.discard(offset)

    def committable(self, topic: str, partition: int) -> int | None:
        """The position to commit, or None when nothing new is safe to commit."""
        state = self._parts.get((topic, partition))
        if state is None or state.next_position is None:
            return None
        while state.heap and state.heap[0] not in state.in_flight:
            heapq.heappop(state.heap)
        position = state.heap[0] if state.heap else state.next_position
        if state.committed is not None and position <= state.committed:
            return None
        return position

    def mark_committed(self, topic: str, partition: int, position: int) -> None:
        state = self._parts.get((topic, partition))
        if state is not None:
            state.committed = position

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
