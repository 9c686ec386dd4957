"""Versioned schema migrations of the review database, one mechanism for SQLite and PostgreSQL.

Each :class:`Migration` is a numbered list of statements that moves the schema from the
version before it to its own. Applied migrations are rows of ``review_schema_version``
(version, description, when), so a database says exactly what it has been through; on
open, :func:`migrate` applies the missing ones in order, all in one transaction, holding a
lock so that two instances starting at once against one PostgreSQL database do not both
migrate (SQLite's ``BEGIN IMMEDIATE`` is that lock already). A database whose newest
applied version is above what this code knows is refused rather than written to.

Databases created before this table existed (schema 1 or 2, told by
``review_meta.schema_version``) upgrade like any other: migrations 1 and 2 only create what
is missing, so on such a database they change nothing and are recorded. ``review_meta``
keeps ``schema_version`` up to date because binaries from before this module read it and
refuse a database newer than themselves: an old instance cannot write to an upgraded
database by mistake.

Rules for a new migration: append, never edit a released one; statements in the portable
SQL of :mod:`pipeline.review.store` (``{serial_pk}`` is the dialect's auto-increment key);
add a column with a default or nullable, so rows written before it stay valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LlmpipeError


class MigrationError(LlmpipeError):
    """The database's schema is newer than this code, or a migration failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_META_TABLE = """CREATE TABLE IF NOT EXISTS review_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
)"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "review items, decisions (the outbox), audit, topic positions",
        (
            _META_TABLE,
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
            """CREATE TABLE IF NOT EXISTS review_offsets (
                topic TEXT NOT NULL,
                kafka_partition INTEGER NOT NULL,
                next_offset BIGINT NOT NULL,
                PRIMARY KEY (topic, kafka_partition)
            )""",
        ),
    ),
    Migration(
        2,
        "server-side sessions",
        (
            # ``session_key`` is a hash of the cookie's id, never the id.
            """CREATE TABLE IF NOT EXISTS review_sessions (
                session_key TEXT PRIMARY KEY,
                reviewer TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                last_seen_ms BIGINT NOT NULL,
                flash TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS review_sessions_user ON review_sessions (reviewer)",
        ),
    ),
    Migration(
        3,
        "several instances: who delivers each decision, and which instances are alive",
        (
            # The instance whose Kafka transactional id delivers the decision, and the one it
            # was taken over from (fenced before the new owner delivers).
            "ALTER TABLE review_decisions ADD COLUMN owner TEXT",
            "ALTER TABLE review_decisions ADD COLUMN taken_from TEXT",
            # Before this version one instance delivered everything, by default as "0".
            "UPDATE review_decisions SET owner = '0' WHERE state = 'pending'",
            "CREATE INDEX IF NOT EXISTS review_decisions_owner ON review_decisions (owner)",
            """CREATE TABLE IF NOT EXISTS review_instances (
                instance TEXT PRIMARY KEY,
                started_ms BIGINT NOT NULL,
                last_seen_ms BIGINT NOT NULL,
                stopped_ms BIGINT
            )""",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS review_schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at_ms BIGINT NOT NULL
)"""

Execute = Callable[[str, Sequence[Any]], Any]
"""Runs one statement (written with ``?`` placeholders) inside the caller's transaction."""


def migrate(
    execute: Execute,
    serial_pk: str,
    now_ms: int,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> list[int]:
    """Apply every migration the database lacks; the versions applied now, in order.

    Runs inside one transaction that the caller opened (and holds the migration lock in).
    """
    execute(_VERSION_TABLE, ())
    applied = {int(row[0]) for row in execute("SELECT version FROM review_schema_version", ())}
    latest = migrations[-1].version
    legacy = _legacy_version(execute, applied)
    newest = max(applied | {legacy})
    if newest > latest:
        raise MigrationError(
            f"the review database has schema version {newest}, newer than this code's "
            f"{latest}: upgrade llmpipe, or point it at another database"
        )
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        for statement in migration.statements:
            execute(statement.format(serial_pk=serial_pk), ())
        execute(
            "INSERT INTO review_schema_version (version, description, applied_at_ms)"
            " VALUES (?, ?, ?)",
            (migration.version, migration.description, now_ms),
        )
        done.append(migration.version)
    execute(
        "INSERT INTO review_meta (name, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (str(latest),),
    )
    return done


def _legacy_version(execute: Execute, applied: set[int]) -> int:
    """``review_meta.schema_version`` of a database from before the version table (or 0).

    ``review_meta`` is created first if missing (migration 1 would create it anyway), so
    the query cannot fail: in PostgreSQL a failed statement would abort the transaction.
    """
    if applied:
        return 0
    execute(_META_TABLE, ())
    rows = list(execute("SELECT value FROM review_meta WHERE name = 'schema_version'", ()))
    return int(rows[0][0]) if rows else 0
