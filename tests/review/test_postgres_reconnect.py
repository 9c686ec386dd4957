"""The store on a real PostgreSQL that goes away: fast refusals while it is down, the
connection opened again once it is back, nothing committed lost."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from pipeline.review.model import QueueFilter
from pipeline.review.store import Backoff, StoreError, StoreUnavailable, open_store
from tests.postgres import PostgresServer, postgres_server
from tests.review.test_review_store import LEASE_MS, add_items
from tests.review.test_review_support import FakeClock, wait_for

_names = itertools.count()


@pytest.fixture(scope="module")
def restartable() -> Iterator[PostgresServer]:
    """A server of this module's own: its tests stop it, which others must not see."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg(restartable: PostgresServer) -> Iterator[PostgresServer]:
    yield restartable
    if not restartable.running:
        restartable.start()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_store_reconnects_after_the_database_restarts(mode: str, pg: PostgresServer) -> None:
    clock = FakeClock()
    url = pg.create_database(f"review_{next(_names)}")
    store = open_store(url, backoff=Backoff(initial_s=0.1, max_s=1.0))
    try:
        add_items(store, "r1", "r2")
        assert store.claim("r1", "alice", clock(), LEASE_MS).ok
        pg.stop(mode)
        with pytest.raises(StoreUnavailable):
            store.item("r1")
        assert not store.available
        for _ in range(3):  # every call during the outage is a refusal, never a hang
            with pytest.raises(StoreUnavailable):
                store.claim("r2", "bob", clock(), LEASE_MS)
        pg.start()

        def back() -> bool:
            try:
                return store.item("r1") is not None
            except StoreUnavailable:
                return False

        wait_for(back, timeout_s=30, what="the store connected again")
        assert store.available and store.reconnects == 1
        item = store.item("r1")
        assert item is not None and item.claimed_by == "alice"  # committed before: kept
        assert store.claim("r2", "bob", clock(), LEASE_MS).ok  # refused before: not half-done
        assert [a.action for a in store.audit_trail("r2")] == ["claim:claimed"]
        assert len(store.open_items(QueueFilter(), clock())) == 2
    finally:
        store.close()


def test_opening_waits_for_the_database_then_says_what_is_wrong(pg: PostgresServer) -> None:
    url = pg.create_database(f"review_{next(_names)}")
    pg.stop()
    with pytest.raises(StoreError, match="cannot open the review database"):
        open_store(url, wait_s=0.5)
