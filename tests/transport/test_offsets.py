"""The committable position never passes an offset that is still in flight."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.transport.offsets import OffsetTracker


def test_out_of_order_completion_commits_only_below_the_lowest_in_flight() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.start("t", 0, offset)
    tracker.done("t", 0, 14)
    tracker.done("t", 0, 12)
    assert tracker.committable("t", 0) == 10
    tracker.done("t", 0, 10)
    assert tracker.committable("t", 0) == 11
    tracker.mark_committed("t", 0, 11)
    assert tracker.committable("t", 0) is None
    tracker.done("t", 0, 11)
    tracker.done("t", 0, 13)
    assert tracker.committable("t", 0) == 15


def test_partitions_are_independent_and_forgotten_on_revoke() -> None:
    tracker = OffsetTracker()
    tracker.start("t", 0, 5)
    tracker.start("t", 1, 7)
    tracker.done("t", 1, 7)
    assert tracker.committable("t", 0) == 5
    assert tracker.committable("t", 1) == 8
    tracker.forget("t", 0)
    assert tracker.committable("t", 0) is None
    assert tracker.total_in_flight() == 0


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_committable_is_the_first_unfinished_offset(order: list[int], finished: int) -> None:
    tracker = OffsetTracker()
    for offset in range(30):
        tracker.start("t", 0, offset)
    done = set(order[:finished])
    for offset in order[:finished]:
        tracker.done("t", 0, offset)
    first_unfinished = next((o for o in range(30) if o not in done), 30)
    assert tracker.committable("t", 0) == first_unfinished
    assert all(o in done for o in range(first_unfinished))
