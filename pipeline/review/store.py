"""The review database: a rebuildable index of the review topics, plus claims and the audit.

Everything the queue shows can be rebuilt from Kafka (``llm.review`` for items,
``llm.review.decisions`` for decided state), so the database is a cache with two
exceptions that Kafka does not need: claims (leases lasting minutes) and the audit trail.
Consumer positions are stored here too, in the same transaction as the rows they produced,
so an index and its offsets can never disagree; deleting the file therefore simply
restarts consumption from the beginning of the topics.

One repository interface (:class:`ReviewStore`), one implementation on DB-API 2.0 with SQL
that both SQLite (stdlib, the default) and PostgreSQL accept: ``INSERT ... ON CONFLICT``,
conditional ``UPDATE`` for claims, no ``RETURNING``, integers for times. The only dialect
differences, the placeholder style, the auto-increment column and how a write transaction
starts, live in :class:`Dialect`.
"""

from __future__ import annotations

import importlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pipeline.contract.envelopes import Escalation, ReviewDecision
from pipeline.errors import LlmpipeError
from pipeline.review.auth import SessionStore
from pipeline.review.model import (
    AuditEntry,
    CalibrationRow,
    ClaimOutcome,
    ClaimStatus,
    DecisionState,
    IncomingItem,
    QueueFacets,
    QueueFilter,
    QueueSort,
    ReviewItem,
    SessionRow,
    StoredDecision,
    TopicPosition,
    datetime_to_ms,
    ms_to_datetime,
)

SCHEMA_VERSION = 2
"""2 added ``review_sessions``; a version-1 database is upgraded in place."""


class StoreError(LlmpipeError):
    """A database URL or schema this code cannot use."""


class ReviewStore(SessionStore, Protocol):
    """What the service needs from persistence; small so another backend stays cheap."""

    def apply(
        self,
        items: Sequence[IncomingItem],
        decisions: Sequence[ReviewDecision],
        positions: Sequence[TopicPosition],
        now_ms: int,
    ) -> None: ...

    def positions(self) -> dict[tuple[str, int], int]: ...

    def item(self, request_id: str) -> ReviewItem | None: ...

    def open_items(self, query: QueueFilter, now_ms: int) -> list[ReviewItem]: ...

    def facets(self) -> QueueFacets: ...

    def claim(self, request_id: str, reviewer: str, now_ms: int, lease_ms: int) -> ClaimOutcome: ...

    def next_claimable(self, query: QueueFilter, now_ms: int) -> list[str]: ...

    def release(
        self, request_id: str, reviewer: str, now_ms: int, *, holder: str | None = None
    ) -> bool: ...

    def record_decision(self, decision: ReviewDecision, now_ms: int) -> bool: ...

    def decision(self, request_id: str) -> StoredDecision | None: ...

    def pending_decisions(self) -> list[StoredDecision]: ...

    def mark_published(self, decision_id: str, now_ms: int) -> None: ...

    def audit(self, actor: str, request_id: str, action: str, detail: str, now_ms: int) -> None: ...

    def audit_trail(self, request_id: str) -> list[AuditEntry]: ...

    def audit_log(self, actor: str | None, limit: int) -> list[AuditEntry]: ...

    def calibration_rows(self, prompt: str) -> list[CalibrationRow]: ...

    def session_counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Dialect:
    name: str
    placeholder: str
    serial_pk: str
    begin_write: str

    def sql(self, statement: str) -> str:
        """Statements are written with ``?``; no literal question mark occurs in them."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT", "BEGIN IMMEDIATE")
POSTGRES = Dialect("postgresql", "%s", "BIGSERIAL PRIMARY KEY", "BEGIN")

_DDL = (
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

_ITEM_COLUMNS = (
    "i.escalation, i.kafka_key, i.traceparent, i.first_seen_ms, i.claimed_by, i.lease_until_ms, "
    "d.decision, d.state, d.on_topic, d.recorded_at_ms, d.published_at_ms"
)
_ITEM_FROM = "review_items i LEFT JOIN review_decisions d ON d.request_id = i.request_id"
_DECISION_COLUMNS = "decision, state, on_topic, recorded_at_ms, published_at_ms"


def open_store(url: str) -> SqlReviewStore:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (memory) or
    ``postgresql://user:pass@host/db`` (needs the ``psycopg`` package, version 3)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        raw = unquote(url[len("sqlite://") :])
        if raw in ("", "/", "/:memory:"):
            target = ":memory:"
        else:
            target = raw[1:] if raw.startswith("/") else raw
            Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            target, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        if target != ":memory:":
            connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return SqlReviewStore(connection, SQLITE)
    if parsed.scheme in ("postgres", "postgresql"):
        try:
            psycopg = importlib.import_module("psycopg")
        except ImportError as exc:
            raise StoreError("a PostgreSQL review_db needs the 'psycopg' package") from exc
        connection = psycopg.connect(url.replace("postgres://", "postgresql://", 1))
        connection.autocommit = True
        return SqlReviewStore(connection, POSTGRES)
    raise StoreError(f"unsupported review_db URL {url!r}: use sqlite:///path or postgresql://")


class SqlReviewStore:
    """:class:`ReviewStore` on one DB-API connection.

    One connection behind a lock is enough: reviewers act at human speed and the topic
    follower writes in batches. Every write happens inside an explicit transaction so the
    follower's rows and offsets, and a claim's check and update, commit together.
    """

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self._db = connection
        self._dialect = dialect
        self._lock = threading.RLock()
        self._migrate()

    # -- plumbing -----------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute(self._dialect.begin_write)
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            else:
                cursor.execute("COMMIT")
            finally:
                cursor.close()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._lock:
            cursor = self._db.cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    def _exec(self, cursor: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cursor.execute(self._dialect.sql(statement), tuple(params))
        return cursor

    def _migrate(self) -> None:
        with self._tx() as cur:
            for statement in _DDL:
                cur.execute(statement.format(serial_pk=self._dialect.serial_pk))
            row = self._exec(
                cur, "SELECT value FROM review_meta WHERE name = ?", ("schema_version",)
            ).fetchone()
            if row is None:
                self._exec(
                    cur,
                    "INSERT INTO review_meta (name, value) VALUES (?, ?)",
                    ("schema_version", str(SCHEMA_VERSION)),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"review database schema {row[0]} is newer than this code ({SCHEMA_VERSION})"
                )
            elif int(row[0]) < SCHEMA_VERSION:  # the DDL above created what was missing
                self._exec(
                    cur,
                    "UPDATE review_meta SET value = ? WHERE name = ?",
                    (str(SCHEMA_VERSION), "schema_version"),
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- the topic follower's side ------------------------------------------------------

    def apply(
        self,
        items: Sequence[IncomingItem],
        decisions: Sequence[ReviewDecision],
        positions: Sequence[TopicPosition],
        now_ms: int,
    ) -> None:
        """Index a batch read from the topics and move the stored positions, atomically.

        Items are first-wins (a replayed escalation of the same request keeps the first
        copy and its claim). A decision read from the topic marks an existing local row
        as published, or inserts it when the database was rebuilt; the audit gets a line
        only in the second case, because in the first the local action is already there.
        """
        with self._tx() as cur:
            for item in items:
                esc = item.escalation
                self._exec(
                    cur,
                    "INSERT INTO review_items (request_id, prompt_name, prompt_version, reason,"
                    " confidence, escalated_at_ms, escalation, kafka_key, traceparent,"
                    " source_topic, source_partition, source_offset, first_seen_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (request_id) DO NOTHING",
                    (
                        item.request_id,
                        esc.validated.prompt.name,
                        esc.validated.prompt.version,
                        esc.reason,
                        esc.confidence,
                        datetime_to_ms(esc.escalated_at),
                        esc.model_dump_json(),
                        item.key.hex() if item.key is not None else None,
                        item.traceparent,
                        item.topic,
                        item.partition,
                        item.offset,
                        now_ms,
                    ),
                )
            for decision in decisions:
                known = self._exec(
                    cur,
                    "SELECT on_topic FROM review_decisions WHERE request_id = ?",
                    (decision.request_id,),
                ).fetchone()
                if known is None:
                    self._insert_decision(cur, decision, "published", True, now_ms, now_ms)
                    self._insert_audit(
                        cur,
                        decision.reviewer,
                        decision.request_id,
                        f"decision:{decision.action}",
                        "rebuilt from the decisions topic",
                        datetime_to_ms(decision.decided_at),
                    )
                else:
                    self._exec(
                        cur,
                        "UPDATE review_decisions SET on_topic = 1, state = 'published',"
                        " published_at_ms = COALESCE(published_at_ms, ?) WHERE request_id = ?",
                        (now_ms, decision.request_id),
                    )
            for position in positions:
                self._exec(
                    cur,
                    "INSERT INTO review_offsets (topic, kafka_partition, next_offset)"
                    " VALUES (?, ?, ?) ON CONFLICT (topic, kafka_partition)"
                    " DO UPDATE SET next_offset = excluded.next_offset",
                    (position.topic, position.partition, position.next_offset),
                )

    def positions(self) -> dict[tuple[str, int], int]:
        with self._read() as cur:
            rows = self._exec(
                cur, "SELECT topic, kafka_partition, next_offset FROM review_offsets"
            ).fetchall()
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    # -- queue and items ----------------------------------------------------------------

    def item(self, request_id: str) -> ReviewItem | None:
        with self._read() as cur:
            row = self._exec(
                cur,
                f"SELECT {_ITEM_COLUMNS} FROM {_ITEM_FROM} WHERE i.request_id = ?",
                (request_id,),
            ).fetchone()
        return _item(row) if row is not None else None

    def open_items(self, query: QueueFilter, now_ms: int) -> list[ReviewItem]:
        """Undecided items in the filter's order (oldest escalation first by default)."""
        where, params = _filter_sql(query, now_ms)
        with self._read() as cur:
            rows = self._exec(
                cur,
                f"SELECT {_ITEM_COLUMNS} FROM {_ITEM_FROM} WHERE {where}"
                f" ORDER BY {_ORDER[query.sort]} LIMIT ?",
                (*params, query.limit),
            ).fetchall()
        return [_item(row) for row in rows]

    def facets(self) -> QueueFacets:
        with self._read() as cur:
            prompts = self._exec(
                cur, "SELECT DISTINCT prompt_name FROM review_items ORDER BY prompt_name"
            ).fetchall()
            versions = self._exec(
                cur, "SELECT DISTINCT prompt_version FROM review_items ORDER BY prompt_version"
            ).fetchall()
            reasons = self._exec(
                cur, "SELECT DISTINCT reason FROM review_items ORDER BY reason"
            ).fetchall()
        return QueueFacets(
            prompts=[str(r[0]) for r in prompts],
            versions=[int(r[0]) for r in versions],
            reasons=[str(r[0]) for r in reasons],
        )

    # -- claims -------------------------------------------------------------------------

    def claim(self, request_id: str, reviewer: str, now_ms: int, lease_ms: int) -> ClaimOutcome:
        """Take or renew the lease, atomically.

        The conditional ``UPDATE`` is the arbiter: it only matches an undecided item whose
        lease is free, expired or already this reviewer's, so of two reviewers racing for
        one item exactly one gets ``rowcount == 1``, in SQLite and PostgreSQL alike.
        """
        until = now_ms + lease_ms
        with self._tx() as cur:
            before = self._exec(
                cur,
                f"SELECT i.claimed_by, i.lease_until_ms, d.request_id FROM {_ITEM_FROM}"
                " WHERE i.request_id = ?",
                (request_id,),
            ).fetchone()
            if before is None:
                return ClaimOutcome("missing", None, None)
            holder, lease_until, decided = before
            if decided is not None:
                return ClaimOutcome("decided", None, None)
            updated = self._exec(
                cur,
                "UPDATE review_items SET claimed_by = ?, lease_until_ms = ?"
                " WHERE request_id = ? AND (claimed_by IS NULL OR lease_until_ms <= ?"
                " OR claimed_by = ?) AND NOT EXISTS (SELECT 1 FROM review_decisions d"
                " WHERE d.request_id = review_items.request_id)",
                (reviewer, until, request_id, now_ms, reviewer),
            ).rowcount
            if updated != 1:
                return ClaimOutcome("held", holder, lease_until)
            status: ClaimStatus
            if holder == reviewer and lease_until is not None and lease_until > now_ms:
                status = "renewed"
            elif holder is not None and holder != reviewer:
                status = "taken_over"
            else:
                status = "claimed"
            detail = f"lease until {ms_to_datetime(until).strftime('%Y-%m-%d %H:%M:%S UTC')}"
            if status == "taken_over":
                detail += f"; {holder}'s lease had expired"
            self._insert_audit(cur, reviewer, request_id, f"claim:{status}", detail, now_ms)
            previous = holder if status == "taken_over" else None
            return ClaimOutcome(status, reviewer, until, previous)

    def next_claimable(self, query: QueueFilter, now_ms: int) -> list[str]:
        """Candidates for "review next": oldest first, skipping items under a live lease."""
        where, params = _filter_sql(query, now_ms)
        with self._read() as cur:
            rows = self._exec(
                cur,
                f"SELECT i.request_id FROM {_ITEM_FROM} WHERE {where}"
                " AND (i.claimed_by IS NULL OR i.lease_until_ms <= ?)"
                f" ORDER BY {_ORDER[query.sort]} LIMIT ?",
                (*params, now_ms, query.limit),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def release(
        self, request_id: str, reviewer: str, now_ms: int, *, holder: str | None = None
    ) -> bool:
        """Free a live claim of ``holder`` (default: the reviewer's own); True if one was.

        An admin releasing someone else's claim passes that holder; the audit says so.
        """
        holder = holder or reviewer
        with self._tx() as cur:
            released = self._exec(
                cur,
                "UPDATE review_items SET claimed_by = NULL, lease_until_ms = NULL"
                " WHERE request_id = ? AND claimed_by = ? AND lease_until_ms > ?"
                " AND NOT EXISTS (SELECT 1 FROM review_decisions d"
                " WHERE d.request_id = review_items.request_id)",
                (request_id, holder, now_ms),
            ).rowcount
            if released == 1:
                detail = "" if holder == reviewer else f"released {holder}'s claim (admin)"
                self._insert_audit(cur, reviewer, request_id, "release", detail, now_ms)
            return bool(released == 1)

    # -- decisions (the outbox) ---------------------------------------------------------

    def record_decision(self, decision: ReviewDecision, now_ms: int) -> bool:
        """Insert a ``pending`` decision; False when the request already has one.

        The primary key on ``request_id`` makes this the idempotency gate: a double click,
        a retried POST or a second reviewer all end here and only the first row wins.
        """
        with self._tx() as cur:
            inserted = self._insert_decision(cur, decision, "pending", False, now_ms, None)
            if inserted:
                self._insert_audit(
                    cur,
                    decision.reviewer,
                    decision.request_id,
                    f"decide:{decision.action}",
                    _decision_summary(decision),
                    now_ms,
                )
            return inserted

    def decision(self, request_id: str) -> StoredDecision | None:
        with self._read() as cur:
            row = self._exec(
                cur,
                f"SELECT {_DECISION_COLUMNS} FROM review_decisions WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        return _decision(row) if row is not None else None

    def pending_decisions(self) -> list[StoredDecision]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                f"SELECT {_DECISION_COLUMNS} FROM review_decisions WHERE state = 'pending'"
                " ORDER BY recorded_at_ms",
            ).fetchall()
        return [_decision(row) for row in rows]

    def mark_published(self, decision_id: str, now_ms: int) -> None:
        with self._tx() as cur:
            self._exec(
                cur,
                "UPDATE review_decisions SET state = 'published',"
                " published_at_ms = COALESCE(published_at_ms, ?) WHERE decision_id = ?",
                (now_ms, decision_id),
            )

    # -- audit --------------------------------------------------------------------------

    def audit(self, actor: str, request_id: str, action: str, detail: str, now_ms: int) -> None:
        with self._tx() as cur:
            self._insert_audit(cur, actor, request_id, action, detail, now_ms)

    def audit_trail(self, request_id: str) -> list[AuditEntry]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT at_ms, actor, request_id, action, detail FROM review_audit"
                " WHERE request_id = ? ORDER BY at_ms, id",
                (request_id,),
            ).fetchall()
        return [AuditEntry(int(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in rows]

    def audit_log(self, actor: str | None, limit: int) -> list[AuditEntry]:
        """The newest audit entries across all items, optionally of one actor (admins)."""
        where, params = ("WHERE actor = ?", [actor]) if actor else ("", [])
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT at_ms, actor, request_id, action, detail FROM review_audit"
                f" {where} ORDER BY at_ms DESC, id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [AuditEntry(int(a), str(b), str(c), str(d), str(e)) for a, b, c, d, e in rows]

    # -- sessions (see pipeline.review.auth.SessionManager) -----------------------------

    def create_session(self, key: str, user: str, fingerprint: str, now_ms: int) -> None:
        with self._tx() as cur:
            self._exec(
                cur,
                "INSERT INTO review_sessions (session_key, reviewer, fingerprint, created_ms,"
                " last_seen_ms) VALUES (?, ?, ?, ?, ?)",
                (key, user, fingerprint, now_ms, now_ms),
            )

    def session_row(self, key: str) -> SessionRow | None:
        with self._read() as cur:
            row = self._exec(
                cur,
                "SELECT reviewer, fingerprint, created_ms, last_seen_ms FROM review_sessions"
                " WHERE session_key = ?",
                (key,),
            ).fetchone()
        return SessionRow(str(row[0]), str(row[1]), int(row[2]), int(row[3])) if row else None

    def touch_session(self, key: str, now_ms: int) -> None:
        with self._tx() as cur:
            self._exec(
                cur,
                "UPDATE review_sessions SET last_seen_ms = ? WHERE session_key = ?",
                (now_ms, key),
            )

    def end_session(self, key: str) -> None:
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM review_sessions WHERE session_key = ?", (key,))

    def end_sessions(self, user: str) -> int:
        with self._tx() as cur:
            ended = self._exec(
                cur, "DELETE FROM review_sessions WHERE reviewer = ?", (user,)
            ).rowcount
        return int(ended)

    def purge_sessions(self, idle_before_ms: int, created_before_ms: int) -> int:
        with self._tx() as cur:
            purged = self._exec(
                cur,
                "DELETE FROM review_sessions WHERE last_seen_ms < ? OR created_ms < ?",
                (idle_before_ms, created_before_ms),
            ).rowcount
        return int(purged)

    def session_counts(self) -> dict[str, int]:
        with self._read() as cur:
            rows = self._exec(
                cur, "SELECT reviewer, COUNT(*) FROM review_sessions GROUP BY reviewer"
            ).fetchall()
        return {str(user): int(count) for user, count in rows}

    def set_flash(self, key: str, text: str | None) -> None:
        with self._tx() as cur:
            self._exec(
                cur, "UPDATE review_sessions SET flash = ? WHERE session_key = ?", (text, key)
            )

    def take_flash(self, key: str) -> str | None:
        with self._tx() as cur:
            row = self._exec(
                cur, "SELECT flash FROM review_sessions WHERE session_key = ?", (key,)
            ).fetchone()
            if row is None or row[0] is None:
                return None
            self._exec(cur, "UPDATE review_sessions SET flash = NULL WHERE session_key = ?", (key,))
            return str(row[0])

    # -- calibration --------------------------------------------------------------------

    def calibration_rows(self, prompt: str) -> list[CalibrationRow]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT i.prompt_version, i.confidence, d.action, i.reason FROM review_items i"
                " JOIN review_decisions d ON d.request_id = i.request_id"
                " WHERE i.prompt_name = ? AND i.confidence IS NOT NULL"
                " ORDER BY i.escalated_at_ms",
                (prompt,),
            ).fetchall()
        return [CalibrationRow(int(v), float(c), str(a), str(r)) for v, c, a, r in rows]

    # -- helpers ------------------------------------------------------------------------

    def _insert_decision(
        self,
        cur: Any,
        decision: ReviewDecision,
        state: DecisionState,
        on_topic: bool,
        now_ms: int,
        published_ms: int | None,
    ) -> bool:
        inserted = self._exec(
            cur,
            "INSERT INTO review_decisions (request_id, decision_id, action, reviewer, decision,"
            " state, on_topic, recorded_at_ms, published_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (
                decision.request_id,
                decision.decision_id,
                decision.action,
                decision.reviewer,
                decision.model_dump_json(),
                state,
                1 if on_topic else 0,
                now_ms,
                published_ms,
            ),
        ).rowcount
        return bool(inserted == 1)

    def _insert_audit(
        self, cur: Any, actor: str, request_id: str, action: str, detail: str, at_ms: int
    ) -> None:
        self._exec(
            cur,
            "INSERT INTO review_audit (at_ms, actor, request_id, action, detail)"
            " VALUES (?, ?, ?, ?, ?)",
            (at_ms, actor, request_id, action, detail[:2000]),
        )


def _filter_sql(query: QueueFilter, now_ms: int) -> tuple[str, list[Any]]:
    clauses = ["d.request_id IS NULL"]
    params: list[Any] = []
    if query.prompt:
        clauses.append("i.prompt_name = ?")
        params.append(query.prompt)
    if query.version is not None:
        clauses.append("i.prompt_version = ?")
        params.append(query.version)
    if query.reason:
        clauses.append("i.reason = ?")
        params.append(query.reason)
    if query.min_age_ms is not None:
        clauses.append("i.escalated_at_ms <= ?")
        params.append(now_ms - query.min_age_ms)
    if query.max_age_ms is not None:
        clauses.append("i.escalated_at_ms >= ?")
        params.append(now_ms - query.max_age_ms)
    if query.min_confidence is not None:
        clauses.append("i.confidence >= ?")
        params.append(query.min_confidence)
    if query.max_confidence is not None:
        clauses.append("i.confidence <= ?")
        params.append(query.max_confidence)
    return " AND ".join(clauses), params


# Whitelisted ORDER BY clauses: the sort never reaches SQL as text from a request.
# Items without a confidence sort as least sure (they failed before it was computed).
_ORDER: dict[QueueSort, str] = {
    "age": "i.escalated_at_ms, i.request_id",
    "-age": "i.escalated_at_ms DESC, i.request_id",
    "confidence": "COALESCE(i.confidence, -1), i.escalated_at_ms, i.request_id",
    "-confidence": "COALESCE(i.confidence, -1) DESC, i.escalated_at_ms, i.request_id",
    "reason": "i.reason, i.escalated_at_ms, i.request_id",
}


def _decision(row: Sequence[Any]) -> StoredDecision:
    envelope, state, on_topic, recorded, published = row
    return StoredDecision(
        decision=ReviewDecision.model_validate_json(envelope),
        state=state,
        on_topic=bool(on_topic),
        recorded_at_ms=int(recorded),
        published_at_ms=int(published) if published is not None else None,
    )


def _item(row: Sequence[Any]) -> ReviewItem:
    escalation, key, traceparent, first_seen, claimed_by, lease_until = row[:6]
    decision = _decision(row[6:]) if row[6] is not None else None
    return ReviewItem(
        escalation=Escalation.model_validate_json(escalation),
        key=bytes.fromhex(key) if key is not None else None,
        traceparent=traceparent,
        first_seen_ms=int(first_seen),
        claimed_by=claimed_by,
        lease_until_ms=int(lease_until) if lease_until is not None else None,
        decision=decision,
    )


def _decision_summary(decision: ReviewDecision) -> str:
    if decision.action == "reject":
        return f"reason: {decision.reason or ''}"
    if decision.action == "clarify":
        question = (decision.output or {}).get("question", "")
        return f"question: {question}"
    if decision.action == "edit":
        return "output corrected"
    return "model output approved"
