"""Fixtures of the review tests: one PostgreSQL server per test session (when needed), a
fresh database of it per test, so the store's SQL is proven on both dialects."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.review.store import SqlReviewStore, open_store
from tests.postgres import PostgresServer, postgres_server
from tests.review.test_review_support import FakeClock

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on both dialects: the SQL is meant to be portable, so prove it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'review.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"review_{next(_databases)}")


@pytest.fixture
def store(db_url: str) -> Iterator[SqlReviewStore]:
    opened = open_store(db_url)
    yield opened
    opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
