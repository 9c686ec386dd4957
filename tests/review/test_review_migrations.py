"""Schema migrations: a database made by the previous schema upgrades in place, on SQLite
and on PostgreSQL, with its data; a newer schema is refused; concurrent starts migrate once."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.review.cli import review_app
from pipeline.review.migrations import LATEST, MIGRATIONS
from pipeline.review.model import QueueFilter, datetime_to_ms
from pipeline.review.store import StoreError, open_store
from tests.review.test_review_support import FakeClock, escalation

# The schema exactly as the code before versioned migrations created it (schema 2, told by
# review_meta.schema_version): frozen here so the upgrade is tested from the real thing.
SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS review_meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS review_items (
        request_id TEXT PRIMARY KEY,
        prompt_name TEXT NOT NULL,
        prompt_version INTEGER NOT NULL,
        reason TEXT NOT NULL,
        confidence DOUBLE PRECISION,
        escalated_at_ms BIGINT NOT NULL,
        escalation TEXT NOT NULL,
        kafka_key TEXT,
        traceparent TEXT,
        source_topic TEXT NOT NULL,
        source_partition INTEGER NOT NULL,
        source_offset BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        claimed_by TEXT,
        lease_until_ms BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS review_items_age ON review_items (escalated_at_ms)",
    # request_id is the primary key: the database itself refuses a second decision.
    """CREATE TABLE IF NOT EXISTS review_decisions (
        request_id TEXT PRIMARY KEY,
        decision_id TEXT NOT NULL UNIQUE,
        action TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        decision TEXT NOT NULL,
        state TEXT NOT NULL,
        on_topic INTEGER NOT NULL,
        recorded_at_ms BIGINT NOT NULL,
        published_at_ms BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS review_decisions_state ON review_decisions (state)",
    """CREATE TABLE IF NOT EXISTS review_audit (
        id {serial_pk},
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS review_audit_item ON review_audit (request_id, at_ms)",
    # Logged-in sessions; ``session_key`` is a hash of the cookie's id, never the id.
    """CREATE TABLE IF NOT EXISTS review_sessions (
        session_key TEXT PRIMARY KEY,
        reviewer TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        flash TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS review_sessions_user ON review_sessions (reviewer)",
    """CREATE TABLE IF NOT EXISTS review_offsets (
        topic TEXT NOT NULL,
        kafka_partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition)
    )""",
)


@contextmanager
def raw(db_url: str) -> Iterator[tuple[Any, str, str]]:
    """A plain DB-API connection to the test database: (connection, placeholder, serial pk)."""
    if db_url.startswith("sqlite"):
        connection: Any = sqlite3.connect(db_url[len("sqlite:///") :], isolation_level=None)
        try:
            yield connection, "?", "INTEGER PRIMARY KEY AUTOINCREMENT"
        finally:
            connection.close()
    else:
        psycopg = pytest.importorskip("psycopg")
        with psycopg.connect(db_url, autocommit=True) as connection:
            yield connection, "%s", "BIGSERIAL PRIMARY KEY"


def rows(db_url: str, query: str) -> list[tuple[Any, ...]]:
    with raw(db_url) as (connection, _, _):
        return [tuple(row) for row in connection.execute(query).fetchall()]


def make_v2_database(db_url: str) -> None:
    """What a version-2 service left behind: items, a published and a pending decision,
    audit lines, a session and topic positions."""
    esc = escalation("old-1")
    pending = escalation("old-2")
    with raw(db_url) as (connection, ph, serial_pk):

        def run(statement: str, params: Sequence[Any] = ()) -> None:
            connection.execute(statement.replace("?", ph), tuple(params))

        for statement in SCHEMA_V2:
            run(statement.format(serial_pk=serial_pk))
        run("INSERT INTO review_meta (name, value) VALUES ('schema_version', '2')")
        for offset, item in enumerate((esc, pending, escalation("old-3"))):
            run(
                "INSERT INTO review_items (request_id, prompt_name, prompt_version, reason,"
                " confidence, escalated_at_ms, escalation, kafka_key, traceparent, source_topic,"
                " source_partition, source_offset, first_seen_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.validated.request.request_id,
                    item.validated.prompt.name,
                    item.validated.prompt.version,
                    item.reason,
                    item.confidence,
                    datetime_to_ms(item.escalated_at),
                    item.model_dump_json(),
                    None,
                    None,
                    "llm.review",
                    0,
                    offset,
                    1,
                ),
            )
        for request_id, state in (("old-1", "published"), ("old-2", "pending")):
            decision = json.dumps(
                {
                    "decision_id": f"d-{request_id}",
                    "request_id": request_id,
                    "action": "reject",
                    "reviewer": "alice",
                    "output": None,
                    "reason": "spam",
                    "prompt": esc.validated.prompt.model_dump(),
                    "decided_at": "2030-01-01T11:30:00Z",
                }
            )
            run(
                "INSERT INTO review_decisions (request_id, decision_id, action, reviewer,"
                " decision, state, on_topic, recorded_at_ms, published_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, f"d-{request_id}", "reject", "alice", decision, state, 0, 5, None),
            )
        run(
            "INSERT INTO review_audit (at_ms, actor, request_id, action, detail)"
            " VALUES (?, ?, ?, ?, ?)",
            (5, "alice", "old-1", "decide:reject", "reason: spam"),
        )
        run(
            "INSERT INTO review_sessions (session_key, reviewer, fingerprint, created_ms,"
            " last_seen_ms) VALUES (?, ?, ?, ?, ?)",
            ("k1", "alice", "fp", 1, 2),
        )
        run(
            "INSERT INTO review_offsets (topic, kafka_partition, next_offset) VALUES (?, ?, ?)",
            ("llm.review", 0, 3),
        )


def test_a_version_2_database_is_upgraded_in_place_with_its_data(db_url: str) -> None:
    make_v2_database(db_url)
    store = open_store(db_url)
    try:
        versions = rows(db_url, "SELECT version FROM review_schema_version ORDER BY version")
        assert [v for (v,) in versions] == [m.version for m in MIGRATIONS] == [1, 2, 3]
        assert rows(db_url, "SELECT value FROM review_meta") == [(str(LATEST),)]
        clock = FakeClock()
        assert [i.request_id for i in store.open_items(QueueFilter(), clock())] == ["old-3"]
        published = store.decision("old-1")
        assert published is not None and published.state == "published"
        assert published.decision.reason == "spam" and published.owner is None
        # the one instance of before delivered as "0": its pending work keeps that owner
        (left,) = store.pending_decisions()
        assert left.decision.request_id == "old-2" and left.owner == "0"
        assert store.pending_decisions("0") == [left]
        assert [a.action for a in store.audit_trail("old-1")] == ["decide:reject"]
        session = store.session_row("k1")
        assert session is not None and session.user == "alice"
        assert store.positions() == {("llm.review", 0): 3}
        # and what only the new schema has works on the upgraded database
        assert store.register_instance("new-1", clock()) is None
        assert store.orphaned_owners("new-1", clock()) == ["0"]
        assert store.take_over("0", "new-1", clock()) == 1
        moved = store.decision("old-2")
        assert moved is not None and (moved.owner, moved.taken_from) == ("new-1", "0")
    finally:
        store.close()


def test_opening_again_applies_nothing(db_url: str) -> None:
    open_store(db_url).close()
    before = rows(db_url, "SELECT version, applied_at_ms FROM review_schema_version")
    open_store(db_url).close()
    assert rows(db_url, "SELECT version, applied_at_ms FROM review_schema_version") == before


def test_a_database_newer_than_the_code_is_refused_untouched(db_url: str) -> None:
    open_store(db_url).close()
    with raw(db_url) as (connection, ph, _):
        connection.execute(
            "INSERT INTO review_schema_version (version, description, applied_at_ms)"
            f" VALUES ({ph}, {ph}, {ph})",
            (LATEST + 1, "from the future", 0),
        )
    with pytest.raises(StoreError, match=f"schema version {LATEST + 1}, newer"):
        open_store(db_url)
    assert rows(db_url, "SELECT value FROM review_meta") == [(str(LATEST),)]


def test_instances_starting_together_migrate_once(db_url: str) -> None:
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            open_store(db_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    versions = rows(db_url, "SELECT version FROM review_schema_version ORDER BY version")
    assert [v for (v,) in versions] == [1, 2, 3]


def test_review_migrate_upgrades_and_lists_the_versions(db_url: str) -> None:
    make_v2_database(db_url)
    runner = CliRunner()
    first = runner.invoke(review_app, ["migrate", "--db", db_url])
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert [line.endswith("(applied now)") for line in lines] == [True, True, True]
    again = runner.invoke(review_app, ["migrate", "--db", db_url])
    assert again.exit_code == 0 and "applied now" not in again.output
    with raw(db_url) as (connection, ph, _):
        connection.execute(
            "INSERT INTO review_schema_version (version, description, applied_at_ms)"
            f" VALUES ({ph}, {ph}, {ph})",
            (LATEST + 1, "from the future", 0),
        )
    refused = runner.invoke(review_app, ["migrate", "--db", db_url])
    assert refused.exit_code == 2 and "newer than this code" in refused.output
