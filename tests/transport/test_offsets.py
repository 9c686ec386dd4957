"""The committable position never passes an offset that is still in flight, and the
finished offsets above it survive a crash through the commit metadata."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.transport.offsets import (
    FETCH_OVERSHOOT,
    MAX_WINDOW,
    METADATA_MAX_CHARS,
    MetadataError,
    OffsetTracker,
    decode_done,
    encode_done,
)


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
    assert tracker.committable("t", 0) is None  # nothing finished there yet
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
    # Nothing finished yet: the start offset alone is nothing to commit.
    assert tracker.committable("t", 0) == (first_unfinished if done else None)
    assert all(o in done for o in range(first_unfinished))


# -- commit metadata: finished offsets above the position --------------------------------------

WINDOW = MAX_WINDOW + FETCH_OVERSHOOT


@given(st.integers(0, 2**50), st.sets(st.integers(0, 3000), max_size=400))
def test_metadata_round_trips_any_set_of_finished_offsets(position: int, rel: set[int]) -> None:
    done = {position + r for r in rel}
    metadata = encode_done(position, done)
    assert decode_done(position, metadata) == done
    assert (metadata == "") == (not done)
    assert metadata.isascii()


@given(st.integers(0, 2**40), st.integers(0, 2**32), st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_metadata_of_a_full_window_always_fits_the_broker_limit(
    position: int, seed: int, density: float
) -> None:
    """Whatever the completion pattern, a window the runner allows fits in the metadata."""
    rng = random.Random(seed)
    done = {position + r for r in range(WINDOW) if rng.random() < density}
    metadata = encode_done(position, done)
    assert len(metadata) <= METADATA_MAX_CHARS
    assert decode_done(position, metadata) == done


@pytest.mark.parametrize(
    "pattern",
    [
        lambda r: True,
        lambda r: r % 2 == 1,
        lambda r: r % 3 != 0,
        lambda r: (r * 2654435761) % 7 < 3,
        lambda r: r == WINDOW - 1,
    ],
)
def test_worst_case_patterns_fit(pattern: Any) -> None:
    done = {1_000_000 + r for r in range(WINDOW) if pattern(r)}
    metadata = encode_done(1_000_000, done)
    assert len(metadata) <= METADATA_MAX_CHARS
    assert decode_done(1_000_000, metadata) == done


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: "lp1r" + b.hex()))
def test_foreign_or_corrupt_metadata_is_refused_not_misread(text: str) -> None:
    try:
        done = decode_done(10, text)
    except MetadataError:
        return
    if text == "":
        assert done == set()  # no metadata: nothing beyond the committed offset is done
        return
    # Accepted only in our own format, and then exactly what it encodes: in the window,
    # and the same set after a round trip.
    assert text.startswith("lp1")
    assert min(done, default=10) >= 10 and max(done, default=10) < 10 + 4 * WINDOW
    assert decode_done(10, encode_done(10, done)) == done


def test_a_run_list_claiming_a_huge_span_is_refused() -> None:
    import base64
    import zlib

    runs = bytes([0x80, 0x80, 0x80, 0x80, 0x10, 0x01])  # gap of 2**32, one done offset
    text = "lp1r" + base64.urlsafe_b64encode(zlib.compress(runs)).decode().rstrip("=")
    with pytest.raises(MetadataError):
        decode_done(0, text)


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=80),  # offset gaps (markers, compaction)
    st.randoms(use_true_random=False),
    st.floats(0.0, 1.0),
)
@settings(max_examples=200, deadline=None)
def test_a_crash_at_any_moment_loses_nothing_and_redoes_only_the_unfinished(
    gaps: list[int], rng: random.Random, finish_share: float
) -> None:
    """Random completion order, gaps in the offsets, a commit, a crash, a new owner."""
    offsets = list(itertools.accumulate(gaps, initial=100))
    tracker = OffsetTracker()
    tracker.assign("t", 0, 100, "")
    for offset in offsets:
        tracker.start("t", 0, offset)
    finished = [o for o in offsets if rng.random() < finish_share]
    rng.shuffle(finished)
    for offset in finished:
        tracker.done("t", 0, offset)
    point = tracker.commit_point("t", 0)
    position, metadata = (point.position, point.metadata) if point else (100, "")
    # ...the worker dies here; a new owner starts from the commit.
    successor = OffsetTracker()
    successor.assign("t", 0, position, metadata)
    unfinished = set(offsets) - set(finished)
    assert all(o >= position for o in unfinished), "never committed past unfinished work"
    skipped = {o for o in offsets if o >= position and successor.is_done("t", 0, o)}
    assert skipped == {o for o in finished if o >= position}, "finished work is skipped"
    redone = {o for o in offsets if o >= position and not successor.is_done("t", 0, o)}
    assert redone == unfinished, "only the unfinished is processed again"


def test_the_metadata_is_committed_even_when_the_position_cannot_move() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.start("t", 0, offset)
    tracker.done("t", 0, 3)
    first = tracker.commit_point("t", 0)
    assert first is not None and (first.position, first.done) == (0, (3,))
    tracker.mark_committed("t", 0, first.position, first.version)
    assert tracker.commit_point("t", 0) is None
    tracker.done("t", 0, 4)
    second = tracker.commit_point("t", 0)
    assert second is not None and (second.position, second.done) == (0, (3, 4))
    assert tracker.window("t", 0) == 5


def test_a_never_committed_partition_has_nothing_to_commit_until_a_message_finishes() -> None:
    """Its start offset alone records nothing (a new owner reads from the earliest offset
    anyway): an idle runner must not commit it every interval, nor the first fetch after
    idling commit it with its messages still in flight (exactly once: an empty
    transaction). Once committed, the same position is again nothing new."""
    tracker = OffsetTracker()
    tracker.assign("t", 0, None, "")
    assert not tracker.changed("t", 0) and tracker.commit_point("t", 0) is None
    tracker.start("t", 0, 0)
    tracker.start("t", 0, 1)
    assert not tracker.changed("t", 0) and tracker.commit_point("t", 0) is None
    tracker.done("t", 0, 1)  # above the first: recorded in the metadata
    point = tracker.commit_point("t", 0)
    assert tracker.changed("t", 0) and point is not None
    assert (point.position, point.done) == (0, (1,))
    tracker.mark_committed("t", 0, point.position, point.version)
    assert not tracker.changed("t", 0) and tracker.commit_point("t", 0) is None
    tracker.done("t", 0, 0)
    assert tracker.committable("t", 0) == 2


def test_a_partition_assigned_with_offsets_done_elsewhere_commits_them() -> None:
    """Never committed, but some offsets known done (their outputs were delivered before
    the partition came back): the first message handed out makes them committable."""
    tracker = OffsetTracker()
    tracker.assign("t", 0, None, "", also_done=[3])
    tracker.start("t", 0, 0)
    point = tracker.commit_point("t", 0)
    assert point is not None and (point.position, point.done) == (0, (3,))
