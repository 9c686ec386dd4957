"""The worker's garbage-collector policy (why: :func:`pipeline.runtime.worker.tune_gc`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from pipeline.runtime.worker import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    built_at_start = [{"prompt": i} for i in range(1_000)]
    gc.unfreeze()

    tune_gc()

    assert gc.get_freeze_count() >= len(built_at_start)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700, "young collections at least as often as CPython's default"


@pytest.mark.usefixtures("restored_gc")
def test_cycles_are_still_collected_after_tuning() -> None:
    tune_gc()

    class Node:
        partner: object = None

    a, b = Node(), Node()
    a.partner, b.partner = b, a
    alive = weakref.ref(a)
    del a, b
    assert alive() is not None, "reference counting alone cannot free a cycle"
    # Enough new container objects to cross the young threshold: the automatic collector
    # (no explicit gc.collect) must free the cycle.
    keep = [[i] for i in range(GC_THRESHOLDS[0] + 1_000)]
    assert keep
    assert alive() is None, "the cycle survived a young collection"
