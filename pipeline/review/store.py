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
differences, the placeholder style, the auto-increment column, how a write transaction
starts, the migration lock and which errors mean "the database is not there", live in
:class:`Dialect`. The schema comes from the versioned migrations in
:mod:`pipeline.review.migrations`, applied on open.

Several instances share one PostgreSQL database. When it restarts (or the network drops),
a call fails with :class:`StoreUnavailable` (the web layer answers 503) and the connection
is opened again on a later call, no sooner than an exponential backoff allows, so an
outage costs each caller one fast refusal instead of a hang, and nothing is half-written:
every write is one transaction, and every caller retries idempotently (see the service).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pipeline.contract.envelopes import Escalation, ReviewDecision
from pipeline.errors import LlmpipeError
from pipeline.review.auth import SessionStore
from pipeline.review.migrations import MigrationError, migrate
from pipeline.review.model import (
    AuditEntry,
    CalibrationRow,
    ClaimOutcome,
    ClaimStatus,
    DecisionState,
    IncomingItem,
    InstanceRow,
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

log = logging.getLogger("llmpipe.review.store")


class StoreError(LlmpipeError):
    """A database URL or schema this code cannot use."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StoreUnavailable(StoreError):
    """The database cannot be reached right now; a later call reconnects (with backoff).

    Nothing was written by the call that raised it, or its transaction's outcome is
    unknown; every caller can retry safely (inserts are idempotent by primary key).
    """


class ReviewStore(SessionStore, Protocol):
    """What the service needs from persistence; small so another backend stays cheap."""

    @property
    def available(self) -> bool:
        """False while the database is unreachable (calls raise :class:`StoreUnavailable`)."""

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

    def next_claimable(self, query: QueueFilter, now_ms: int, reviewer: str) -> list[str]: ...

    def release(
        self, request_id: str, reviewer: str, now_ms: int, *, holder: str | None = None
    ) -> bool: ...

    def record_decision(self, decision: ReviewDecision, now_ms: int, owner: str) -> bool: ...

    def decision(self, request_id: str) -> StoredDecision | None: ...

    def pending_decisions(self, owner: str | None = None) -> list[StoredDecision]: ...

    def orphaned_owners(self, instance: str, alive_since_ms: int | None) -> list[str]: ...

    def take_over(self, from_owner: str, to_owner: str, now_ms: int) -> int: ...

    def register_instance(self, instance: str, now_ms: int) -> InstanceRow | None: ...

    def heartbeat(self, instance: str, now_ms: int) -> None: ...

    def instance_stopped(self, instance: str, now_ms: int) -> None: ...

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
    migration_lock: str | None
    """Taken inside the migration transaction, so concurrent starts migrate one at a time."""
    unavailable: Callable[[BaseException], bool]
    """Whether an error means "not reachable right now" (or a transient conflict): the
    caller gets :class:`StoreUnavailable` and may retry. Any other error is a bug."""
    reconnects: bool
    """Whether a lost connection is opened again (never for SQLite: ``:memory:`` would be
    a new, empty database, and a file connection does not get lost)."""

    def sql(self, statement: str) -> str:
        """Statements are written with ``?``; no literal question mark occurs in them."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)


SQLITE = Dialect(
    "sqlite",
    "?",
    "INTEGER PRIMARY KEY AUTOINCREMENT",
    "BEGIN IMMEDIATE",
    None,
    # "database is locked" past the busy timeout; sqlite3 also reports SQL mistakes as
    # OperationalError, and those must stay errors.
    lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc),
    False,
)


def _postgres(psycopg: Any) -> Dialect:
    return Dialect(
        "postgresql",
        "%s",
        "BIGSERIAL PRIMARY KEY",
        "BEGIN",
        "SELECT pg_advisory_xact_lock(7240513)",  # any fixed number: "llmpipe review schema"
        # Connection loss, server shutdown (57P01), deadlock, serialization failure.
        lambda exc: isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError),
        True,
    )


@dataclass(frozen=True)
class SchemaVersion:
    version: int
    description: str
    applied_at_ms: int


@dataclass
class Backoff:
    """Delays between reconnection attempts: doubling from ``initial_s`` up to ``max_s``."""

    initial_s: float = 0.2
    max_s: float = 5.0


_ITEM_COLUMNS = (
    "i.escalation, i.kafka_key, i.traceparent, i.first_seen_ms, i.claimed_by, i.lease_until_ms, "
    "d.decision, d.state, d.on_topic, d.recorded_at_ms, d.published_at_ms, d.owner, d.taken_from"
)
_ITEM_FROM = "review_items i LEFT JOIN review_decisions d ON d.request_id = i.request_id"
_DECISION_COLUMNS = "decision, state, on_topic, recorded_at_ms, published_at_ms, owner, taken_from"
_AUDIT_COLUMNS = "at_ms, actor, request_id, action, detail"


def open_store(url: str, *, wait_s: float = 30.0, backoff: Backoff | None = None) -> SqlReviewStore:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (memory) or
    ``postgresql://user:pass@host:port/db`` (needs the ``postgres`` extra: psycopg 3).

    Opening migrates the schema to the newest version. A PostgreSQL server that is not up
    yet (containers starting together) is waited for up to ``wait_s``.
    """
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        raw = unquote(url[len("sqlite://") :])
        if raw in ("", "/", "/:memory:"):
            target = ":memory:"
        else:
            target = raw[1:] if raw.startswith("/") else raw
            Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)

        def connect_sqlite() -> sqlite3.Connection:
            connection = sqlite3.connect(
                target, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            if target != ":memory:":
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            return connection

        return SqlReviewStore(connect_sqlite, SQLITE, wait_s=wait_s, backoff=backoff)
    if parsed.scheme in ("postgres", "postgresql"):
        try:
            psycopg = importlib.import_module("psycopg")
        except ImportError as exc:
            raise StoreError(
                "a PostgreSQL review_db needs psycopg: pip install 'llmpipe[postgres]'"
            ) from exc
        dsn = url.replace("postgres://", "postgresql://", 1)

        def connect_postgres() -> Any:
            # A short connect timeout: during an outage a request is refused fast, not hung.
            return psycopg.connect(dsn, autocommit=True, connect_timeout=3)

        return SqlReviewStore(connect_postgres, _postgres(psycopg), wait_s=wait_s, backoff=backoff)
    raise StoreError(f"unsupported review_db URL {url!r}: use sqlite:///path or postgresql://")


class SqlReviewStore:
    """:class:`ReviewStore` on one DB-API connection, opened again when it is lost.

    One connection behind a lock is enough: reviewers act at human speed and the topic
    follower writes in batches. Every write happens inside an explicit transaction so the
    follower's rows and offsets, and a claim's check and update, commit together.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        dialect: Dialect,
        *,
        wait_s: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._connect = connect
        self._dialect = dialect
        self._backoff = backoff or Backoff()
        self._delay_s = self._backoff.initial_s
        self._retry_at = 0.0
        self._db: Any = None
        self._lock = threading.RLock()
        self.reconnects = 0
        """Connections opened again after one was lost (for tests and logs)."""
        self._open(wait_s)

    # -- plumbing -----------------------------------------------------------------------

    def _open(self, wait_s: float) -> None:
        """Connect and migrate, waiting up to ``wait_s`` for a database that is not up yet."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._migrate()
                return
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"cannot open the review database: {exc}") from exc
                time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))

    @property
    def available(self) -> bool:
        """False while the connection is lost and not yet opened again."""
        return self._db is not None

    def _connection(self) -> Any:
        if self._db is not None:
            return self._db
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise StoreUnavailable(f"the review database is unreachable; retrying in {wait:.1f}s")
        try:
            self._db = self._connect()
        except Exception as exc:
            if not self._dialect.unavailable(exc):
                raise
            self._schedule_retry()
            raise StoreUnavailable(
                f"the review database is unreachable: {_first_line(exc)}"
            ) from exc
        if self._retry_at:
            self.reconnects += 1
            log.warning("review database connection re-established")
        self._delay_s = self._backoff.initial_s
        return self._db

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._delay_s
        self._delay_s = min(self._delay_s * 2, self._backoff.max_s)

    def _lost(self, exc: BaseException) -> StoreUnavailable:
        """Translate a driver error; drop the connection when the driver says it is gone."""
        db = self._db
        broken = bool(getattr(db, "broken", False) or getattr(db, "closed", False))
        if self._dialect.reconnects and broken:
            log.warning("review database connection lost: %s", _first_line(exc))
            self._db = None
            with contextlib.suppress(Exception):
                db.close()
            self._schedule_retry()
        return StoreUnavailable(f"the review database is unavailable: {_first_line(exc)}")

    @contextmanager
    def _cursor(self, begin: str | None) -> Iterator[Any]:
        """A cursor, in a transaction when ``begin`` is given, with errors translated."""
        with self._lock:
            db = self._connection()
            try:
                cursor = db.cursor()
                if begin is not None:
                    cursor.execute(begin)
            except Exception as exc:
                if self._dialect.unavailable(exc):
                    raise self._lost(exc) from exc
                raise
            try:
                yield cursor
                if begin is not None:
                    cursor.execute("COMMIT")
            except BaseException as exc:
                if begin is not None:
                    with contextlib.suppress(Exception):
                        cursor.execute("ROLLBACK")
                if self._dialect.unavailable(exc):
                    raise self._lost(exc) from exc
                raise
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()

    def _tx(self) -> contextlib.AbstractContextManager[Any]:
        return self._cursor(self._dialect.begin_write)

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        return self._cursor(None)

    def _exec(self, cursor: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cursor.execute(self._dialect.sql(statement), tuple(params))
        return cursor

    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one query outside a transaction: most reads are a single ``SELECT``,
        and turning rows into records need not hold the connection's lock."""
        with self._read() as cur:
            rows: list[Any] = self._exec(cur, statement, params).fetchall()
        return rows

    def _row(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """The first row of one query outside a transaction, or None (see :meth:`_rows`)."""
        with self._read() as cur:
            return self._exec(cur, statement, params).fetchone()

    def _migrate(self) -> None:
        with self._tx() as cur:
            if self._dialect.migration_lock is not None:
                cur.execute(self._dialect.migration_lock)
            try:
                applied = migrate(
                    lambda statement, params: self._exec(cur, statement, params),
                    self._dialect.serial_pk,
                    int(time.time() * 1000),
                )
            except MigrationError as exc:
                raise StoreError(str(exc)) from exc
        self.migrated_now = applied
        """Schema versions this open applied (empty when the database was up to date)."""
        if applied:
            log.info("review database migrated: applied schema versions %s", applied)

    def schema_versions(self) -> list[SchemaVersion]:
        """Every migration applied to this database, oldest first."""
        rows = self._rows(
            "SELECT version, description, applied_at_ms FROM review_schema_version"
            " ORDER BY version",
        )
        return [SchemaVersion(int(v), str(d), int(a)) for v, d, a in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None

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
                # Not known: the database was rebuilt. The insert can still lose to another
                # instance's follower rebuilding the same row; then it is only marked.
                if known is None and self._insert_decision(
                    cur, decision, "published", True, now_ms, now_ms, None
                ):
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
        rows = self._rows("SELECT topic, kafka_partition, next_offset FROM review_offsets")
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    # -- queue and items ----------------------------------------------------------------

    def item(self, request_id: str) -> ReviewItem | None:
        row = self._row(
            f"SELECT {_ITEM_COLUMNS} FROM {_ITEM_FROM} WHERE i.request_id = ?",
            (request_id,),
        )
        return _item(row) if row is not None else None

    def open_items(self, query: QueueFilter, now_ms: int) -> list[ReviewItem]:
        """Undecided items in the filter's order (oldest escalation first by default)."""
        where, params = _filter_sql(query, now_ms)
        rows = self._rows(
            f"SELECT {_ITEM_COLUMNS} FROM {_ITEM_FROM} WHERE {where}"
            f" ORDER BY {_ORDER[query.sort]} LIMIT ?",
            (*params, query.limit),
        )
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

    def next_claimable(self, query: QueueFilter, now_ms: int, reviewer: str) -> list[str]:
        """Candidates for "review next": the reviewer's own live claims first (one whose
        answer never reached the browser, e.g. during a database outage, is not stranded
        until its lease ends), then the filter's order, skipping others' live leases."""
        where, params = _filter_sql(query, now_ms)
        rows = self._rows(
            f"SELECT i.request_id FROM {_ITEM_FROM} WHERE {where}"
            " AND (i.claimed_by IS NULL OR i.lease_until_ms <= ? OR i.claimed_by = ?)"
            " ORDER BY CASE WHEN i.claimed_by = ? AND i.lease_until_ms > ? THEN 0 ELSE 1 END,"
            f" {_ORDER[query.sort]} LIMIT ?",
            (*params, now_ms, reviewer, reviewer, now_ms, query.limit),
        )
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

    def record_decision(self, decision: ReviewDecision, now_ms: int, owner: str) -> bool:
        """Insert a ``pending`` decision owned by instance ``owner``; False when the request
        already has one.

        The primary key on ``request_id`` makes this the idempotency gate: a double click,
        a retried POST or a second reviewer (on any instance) all end here and only the
        first row wins. The owner is the only instance that delivers it (see the service).
        """
        with self._tx() as cur:
            inserted = self._insert_decision(cur, decision, "pending", False, now_ms, None, owner)
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
        row = self._row(
            f"SELECT {_DECISION_COLUMNS} FROM review_decisions WHERE request_id = ?",
            (request_id,),
        )
        return _decision(row) if row is not None else None

    def pending_decisions(self, owner: str | None = None) -> list[StoredDecision]:
        """Decisions not yet known to be on Kafka: all, or those ``owner`` delivers."""
        where, params = ("AND owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self._rows(
            f"SELECT {_DECISION_COLUMNS} FROM review_decisions WHERE state = 'pending'"
            f" {where} ORDER BY recorded_at_ms",
            params,
        )
        return [_decision(row) for row in rows]

    def orphaned_owners(self, instance: str, alive_since_ms: int | None) -> list[str]:
        """Owners of pending decisions that are not ``instance`` and are gone: stopped,
        never registered, or (unless ``alive_since_ms`` is None) silent since before it."""
        silent = " OR i.last_seen_ms < ?" if alive_since_ms is not None else ""
        params = (instance, alive_since_ms) if alive_since_ms is not None else (instance,)
        rows = self._rows(
            "SELECT DISTINCT d.owner FROM review_decisions d"
            " LEFT JOIN review_instances i ON i.instance = d.owner"
            " WHERE d.state = 'pending' AND d.owner IS NOT NULL AND d.owner <> ?"
            f" AND (i.instance IS NULL OR i.stopped_ms IS NOT NULL{silent})"
            " ORDER BY d.owner",
            params,
        )
        return [str(row[0]) for row in rows]

    def take_over(self, from_owner: str, to_owner: str, now_ms: int) -> int:
        """Move ``from_owner``'s pending decisions to ``to_owner``; how many moved.

        ``taken_from`` remembers the previous owner: the new one fences that instance's
        Kafka transactional id before it delivers (see the service), so a previous owner
        that was only paused cannot commit the same decision too.
        """
        with self._tx() as cur:
            moved = self._exec(
                cur,
                "SELECT request_id FROM review_decisions WHERE state = 'pending' AND owner = ?",
                (from_owner,),
            ).fetchall()
            taken = 0
            for (request_id,) in moved:
                # Row by row and conditional: of two instances taking over at once, each
                # row goes to one, and only its new owner audits it.
                if self._exec(
                    cur,
                    "UPDATE review_decisions SET owner = ?, taken_from = ?"
                    " WHERE request_id = ? AND state = 'pending' AND owner = ?",
                    (to_owner, from_owner, request_id, from_owner),
                ).rowcount:
                    taken += 1
                    self._insert_audit(
                        cur,
                        "system",
                        str(request_id),
                        "delivery_taken_over",
                        f"instance {to_owner} delivers it; {from_owner} is gone",
                        now_ms,
                    )
        return taken

    # -- instances ----------------------------------------------------------------------

    def register_instance(self, instance: str, now_ms: int) -> InstanceRow | None:
        """Record that ``instance`` runs; returns the row it had before (None if new)."""
        with self._tx() as cur:
            row = self._exec(
                cur,
                "SELECT instance, started_ms, last_seen_ms, stopped_ms FROM review_instances"
                " WHERE instance = ?",
                (instance,),
            ).fetchone()
            self._exec(
                cur,
                "INSERT INTO review_instances (instance, started_ms, last_seen_ms)"
                " VALUES (?, ?, ?) ON CONFLICT (instance) DO UPDATE SET"
                " started_ms = excluded.started_ms, last_seen_ms = excluded.last_seen_ms,"
                " stopped_ms = NULL",
                (instance, now_ms, now_ms),
            )
        if row is None:
            return None
        stopped = int(row[3]) if row[3] is not None else None
        return InstanceRow(str(row[0]), int(row[1]), int(row[2]), stopped)

    def heartbeat(self, instance: str, now_ms: int) -> None:
        with self._tx() as cur:
            self._exec(
                cur,
                "UPDATE review_instances SET last_seen_ms = ? WHERE instance = ?",
                (now_ms, instance),
            )

    def instance_stopped(self, instance: str, now_ms: int) -> None:
        """A clean stop: the instance's pending decisions can be taken over at once."""
        with self._tx() as cur:
            self._exec(
                cur,
                "UPDATE review_instances SET stopped_ms = ?, last_seen_ms = ? WHERE instance = ?",
                (now_ms, now_ms, instance),
            )

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
        rows = self._rows(
            f"SELECT {_AUDIT_COLUMNS} FROM review_audit WHERE request_id = ? ORDER BY at_ms, id",
            (request_id,),
        )
        return [_audit_entry(row) for row in rows]

    def audit_log(self, actor: str | None, limit: int) -> list[AuditEntry]:
        """The newest audit entries across all items, optionally of one actor (admins)."""
        where, params = ("WHERE actor = ?", [actor]) if actor else ("", [])
        rows = self._rows(
            f"SELECT {_AUDIT_COLUMNS} FROM review_audit"
            f" {where} ORDER BY at_ms DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [_audit_entry(row) for row in rows]

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
        row = self._row(
            "SELECT reviewer, fingerprint, created_ms, last_seen_ms FROM review_sessions"
            " WHERE session_key = ?",
            (key,),
        )
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
        rows = self._rows("SELECT reviewer, COUNT(*) FROM review_sessions GROUP BY reviewer")
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
        rows = self._rows(
            "SELECT i.prompt_version, i.confidence, d.action, i.reason FROM review_items i"
            " JOIN review_decisions d ON d.request_id = i.request_id"
            " WHERE i.prompt_name = ? AND i.confidence IS NOT NULL"
            " ORDER BY i.escalated_at_ms",
            (prompt,),
        )
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
        owner: str | None,
    ) -> bool:
        inserted = self._exec(
            cur,
            "INSERT INTO review_decisions (request_id, decision_id, action, reviewer, decision,"
            " state, on_topic, recorded_at_ms, published_at_ms, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                owner,
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
    envelope, state, on_topic, recorded, published, owner, taken_from = row
    return StoredDecision(
        decision=ReviewDecision.model_validate_json(envelope),
        state=state,
        on_topic=bool(on_topic),
        recorded_at_ms=int(recorded),
        published_at_ms=int(published) if published is not None else None,
        owner=str(owner) if owner is not None else None,
        taken_from=str(taken_from) if taken_from is not None else None,
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


def _audit_entry(row: Sequence[Any]) -> AuditEntry:
    at_ms, actor, request_id, action, detail = row
    return AuditEntry(int(at_ms), str(actor), str(request_id), str(action), str(detail))


def _decision_summary(decision: ReviewDecision) -> str:
    if decision.action == "reject":
        return f"reason: {decision.reason or ''}"
    if decision.action == "clarify":
        question = (decision.output or {}).get("question", "")
        return f"question: {question}"
    if decision.action == "edit":
        return "output corrected"
    return "model output approved"
