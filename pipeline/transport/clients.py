"""Every Kafka client llmpipe uses is built here, from :class:`~pipeline.config.Settings`.

One place decides how llmpipe talks to Kafka (confluent-kafka, i.e. librdkafka): security
settings, ``read_committed`` for every consumer, idempotent producers, cooperative
rebalancing for the stage groups, and how librdkafka's own voice reaches the operator.

Usage, for any tool::

    clients = KafkaClients(settings)
    consumer = clients.consumer("my-tool-group")   # read_committed, manual commits
    producer = clients.producer()                  # idempotent, acks=all
    admin = clients.admin()

Keyword overrides use librdkafka's names (``clients.consumer(None, **{"fetch.wait.max.ms":
10})``). A tool that only ``assign()``s partitions passes ``group=None``.

Quiet failure logs: librdkafka reports a lost broker through ``error_cb`` (per client, per
attempt) and through its log (per connection attempt); during a broker restart a worker
with a dozen clients would print thousands of lines. Here every client of one
:class:`KafkaClients` shares one :class:`BrokerHealth`, which logs the outage once ("broker
unreachable since ..., retrying") and its end once ("recovered after N s"), and
librdkafka's log goes through the project's JSON logger (``llmpipe.kafka``) with a rate
limit per kind of line. Connection failures, which the health line already says, are
logged at debug level.

Refused connections are different: a wrong password, an untrusted broker certificate or a
client certificate the broker rejects will not heal by retrying, and librdkafka reports
them only as connection failures (its ``FAIL`` log line; the call that needed the broker
times out with "transport failure"). :class:`SecurityFailures` picks them out of that log,
says which settings to check (once per kind per interval, however often librdkafka
retries), and lets a tool that timed out name the cause (:func:`security_failure_since`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient

from pipeline.config import Settings
from pipeline.errors import LlmpipeError

log = logging.getLogger("llmpipe.kafka")

# Dead letters carry the original value, so producers must accept what llm.requests accepts.
MAX_MESSAGE_BYTES = 10_485_760
# How soon a stage consumer fetches again for a partition whose prefetch queue was full
# (librdkafka's default: 1,000 ms); see KafkaClients.prefetch_config.
FETCH_QUEUE_BACKOFF_MS = 200
# librdkafka log lines of one kind (facility): at most one per this many seconds.
LOG_INTERVAL_S = 30.0
# Facilities whose lines repeat what BrokerHealth already reports once, or report a
# condition librdkafka retries by itself ("Failed to acquire idempotence PID: coordinator
# load in progress" right after a broker starts).
_CONNECTIVITY_FACILITIES = frozenset({"FAIL", "BROKERFAIL", "CONNECT", "DISCONNECT", "GETPID"})
# Connection errors for this long, without a success in between, are an outage.
OUTAGE_AFTER_S = 2.0
_OUTAGE_CODES = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
)
# A stage consumer may block in a revocation for up to the revocation bound; far below this.
MAX_POLL_INTERVAL_MS = 300_000
SESSION_TIMEOUT_MS = 10_000

# librdkafka's words for a connection the broker (or this client) refused on security
# grounds, most specific first, with what the operator should check.
_REFUSALS: tuple[tuple[str, str], ...] = (
    (
        "SASL authentication error",
        "the broker rejected the credentials (LLMPIPE_SASL_MECHANISM, LLMPIPE_SASL_USERNAME, "
        "LLMPIPE_SASL_PASSWORD)",
    ),
    (
        "certificate verify failed",
        "the broker's TLS certificate is not signed by a trusted CA (LLMPIPE_SSL_CAFILE; "
        "unset: the system CA bundle)",
    ),
    (
        "alert bad certificate",
        "the broker rejected the client certificate (LLMPIPE_SSL_CERTFILE, LLMPIPE_SSL_KEYFILE)",
    ),
    (
        "alert certificate required",
        "the broker requires a client certificate (LLMPIPE_SSL_CERTFILE, LLMPIPE_SSL_KEYFILE)",
    ),
    ("SASL handshake failed", "SASL negotiation failed (LLMPIPE_SASL_MECHANISM)"),
    ("Unsupported SASL mechanism", "the broker does not offer LLMPIPE_SASL_MECHANISM"),
    ("OIDC", "fetching the OAUTHBEARER token failed (LLMPIPE_SASL_OAUTHBEARER_*)"),
    ("SSL handshake failed", "the TLS handshake failed (LLMPIPE_SECURITY_PROTOCOL, LLMPIPE_SSL_*)"),
    (
        "Disconnected while requesting ApiVersion",
        "the broker closed the connection at once: is LLMPIPE_SECURITY_PROTOCOL the listener's?",
    ),
)
# Where librdkafka reports them: failed connections, SASL, and the OIDC token fetch.
_REFUSAL_FACILITIES = frozenset({"FAIL", "SASL", "OIDC"})
_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")
_AFTER = re.compile(r"\s*\(after \d+ms in state [A-Z_]+\)\s*$")


class KafkaRefused(LlmpipeError):
    """The broker refused this client's credentials or TLS: a setting to fix (exit 2)."""


class SecurityFailures:
    """Refused connections: one error line per kind per interval, and the latest for tools.

    Process-wide because a tool's clients are often built by helpers that keep no handle
    on their factory, and the question a tool asks after a timeout is "was this process
    refused since I started waiting?".
    """

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._latest: tuple[float, str] | None = None

    @staticmethod
    def classify(line: str) -> str | None:
        """The operator's line for a librdkafka failure line, or None if it is not a refusal."""
        for needle, cause in _REFUSALS:
            if needle in line:
                detail = _AFTER.sub("", _THREAD.sub("", line))
                return f"Kafka refused the connection: {cause}: {detail}"
        return None

    def report(self, line: str) -> bool:
        """Record ``line`` if it is a refusal (and log it unless logged recently)."""
        text = self.classify(line)
        if text is None:
            return False
        kind = text.split(":", 2)[1]
        now = self._clock()
        with self._lock:
            self._latest = (now, text)
            last = self._last_logged.get(kind)
            if last is not None and now - last < self._interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return True
            self._last_logged[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        extra: dict[str, Any] = {"kafka_error": "refused"}
        if suppressed:
            extra["suppressed"] = suppressed
        log.error("%s; retrying", text, extra=extra)
        return True

    def since(self, started: float) -> str | None:
        """The latest refusal at or after ``started`` (a ``time.monotonic()`` value)."""
        latest = self._latest
        return latest[1] if latest is not None and latest[0] >= started else None


SECURITY_FAILURES = SecurityFailures()


def security_failure_since(started: float) -> str | None:
    """Why the broker refused this process since ``started``, if it did (for one-line
    errors after a timeout; see :class:`SecurityFailures`)."""
    return SECURITY_FAILURES.since(started)


class BrokerHealth:
    """One line when the brokers become unreachable, one when they are back.

    Fed by every client's ``error_cb`` (outage) and by callers that see an operation
    succeed (:meth:`ok`), because librdkafka reports failures, not recoveries. Thread-safe:
    librdkafka calls back from whichever thread polls. An outage is reported once
    connection errors have gone on for :data:`OUTAGE_AFTER_S` without a success in
    between: a client closing (or reconnecting right after a recovery) reports a few
    connection errors that are not an outage.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, interval_s: float = LOG_INTERVAL_S
    ) -> None:
        self._clock = clock
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._failing_since_wall: datetime | None = None
        self._reported = False
        self._errors = 0
        self._last_other: dict[str, float] = {}
        self._last_probe = 0.0
        self._outages = 0

    @property
    def outages(self) -> int:
        """How many outages have been reported: a client that lived through one may keep
        stale state (see :class:`~pipeline.transport.delivery.TransactionalDelivery`)."""
        return self._outages

    @property
    def down(self) -> bool:
        """Connection errors without a success since (reported or not yet)."""
        return self._failing_since is not None

    def error(self, error: KafkaError) -> None:
        """librdkafka's ``error_cb``: transport errors open an outage, others are logged
        (each kind at most once per interval: a broker restart repeats them per client)."""
        now = self._clock()
        if error.code() not in _OUTAGE_CODES:
            with self._lock:
                last = self._last_other.get(error.name())
                if last is not None and now - last < self._interval_s and not error.fatal():
                    return
                self._last_other[error.name()] = now
            log.warning(
                "kafka client error: %s",
                error.str(),
                extra={"kafka_error": error.name(), "fatal": error.fatal()},
            )
            return
        with self._lock:
            self._errors += 1
            if self._failing_since is None:
                self._failing_since = now
                self._failing_since_wall = datetime.now(UTC)
            if self._reported or now - self._failing_since < OUTAGE_AFTER_S:
                return
            self._reported = True
            self._outages += 1
            since = self._failing_since_wall
        assert since is not None
        log.warning(
            "broker unreachable since %s; retrying",
            since.strftime("%H:%M:%S UTC"),
            extra={"detail": error.str()},
        )

    def probe_due(self, every_s: float = 1.0) -> bool:
        """During an outage, whether a caller should try a cheap request (at most every
        ``every_s``): an idle client has no other way to notice the brokers are back."""
        if self._failing_since is None:
            return False
        now = self._clock()
        if now - self._last_probe < every_s:
            return False
        self._last_probe = now
        return True

    def ok(self) -> None:
        """An operation that needs the broker succeeded: end the outage if there was one."""
        if self._failing_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._failing_since is None:
                return
            lasted = self._clock() - self._failing_since
            errors, reported = self._errors, self._reported
            self._failing_since = self._failing_since_wall = None
            self._errors = 0
            self._reported = False
        if reported:
            log.warning("broker recovered after %.0f s (%d connection errors)", lasted, errors)


class LibrdkafkaLog:
    """librdkafka's ``logger``: its lines through the JSON logger, one per kind per interval.

    librdkafka calls ``log(level, "%s [%s] %s", facility, client, message)``. The lines
    suppressed since the last one of the same facility are counted on the next.
    """

    def __init__(
        self,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        refusals: SecurityFailures = SECURITY_FAILURES,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._refusals = refusals
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, fmt: str, *args: Any, **_: Any) -> None:
        facility = str(args[0]) if args else "?"
        if (
            facility in _REFUSAL_FACILITIES
            and len(args) > 2
            and self._refusals.report(str(args[2]))
        ):
            return
        if facility in _CONNECTIVITY_FACILITIES:
            level = logging.DEBUG
        if not log.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            last = self._last.get(facility)
            if last is not None and now - last < self._interval_s:
                self._suppressed[facility] = self._suppressed.get(facility, 0) + 1
                return
            self._last[facility] = now
            suppressed = self._suppressed.pop(facility, 0)
        extra: dict[str, Any] = {"facility": facility}
        if suppressed:
            extra["suppressed"] = suppressed
        log.log(level, "librdkafka: " + fmt, *args, extra=extra)


class KafkaClients:
    """The factory: consumers, producers and admin clients, all from one ``Settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = BrokerHealth()
        self._log = LibrdkafkaLog()
        self._stage_producer: Producer | None = None
        self._stage_producer_lock = threading.Lock()

    def base_config(self) -> dict[str, Any]:
        """Connection, security and logging: what every client shares."""
        return {
            **self.settings.kafka_client_config(),
            "logger": self._log,
            "error_cb": self.health.error,
            "log.connection.close": False,
            # TCP_NODELAY: librdkafka leaves Nagle's algorithm on by default, so a small
            # request (an at-least-once stage's produce of one output, a fetch, an offset
            # commit) written while an earlier one is unacknowledged waits for that ACK,
            # up to the peer's delayed-ACK timeout (40 ms on Linux). bench.latency at 300
            # req/s, interleaved: p95/p99 added 79/166 -> 42/82 ms.
            "socket.nagle.disable": True,
            # Notice and worse: info lines (e.g. "purging unserved events" when a client
            # closes) would reach stderr directly once the handle is being destroyed.
            "log_level": 5,
        }

    def consumer(self, group: str | None, **overrides: Any) -> Consumer:
        """A consumer that sees only committed data and never commits by itself.

        ``group=None`` is for tools that ``assign()`` partitions and commit nothing
        (librdkafka still wants a group id: a throw-away one is used).
        """
        return Consumer(self.consumer_config(group, **overrides))

    def consumer_config(self, group: str | None, **overrides: Any) -> dict[str, Any]:
        """The configuration :meth:`consumer` uses (for tools that build their own)."""
        return {
            **self.base_config(),
            "group.id": group or f"llmpipe-reader-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            **overrides,
        }

    def reader(self, group: str | None = None, **overrides: Any) -> Consumer:
        """A consumer for tools that read ranges to their end (:mod:`~pipeline.transport.
        reader`): end-of-partition events on, fetches as large as the largest message."""
        return self.consumer(
            group,
            **{
                "enable.partition.eof": True,
                "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
                **overrides,
            },
        )

    def stage_consumer(self, group: str, **overrides: Any) -> Consumer:
        """A stage's group member: cooperative rebalancing, optional static membership."""
        config: dict[str, Any] = {
            "partition.assignment.strategy": "cooperative-sticky",
            "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
            # A SIGKILLed member's partitions move after this (librdkafka's default is 45 s);
            # a static member restarted within it keeps them without a rebalance.
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 1_000,
            **self.prefetch_config(),
            **overrides,
        }
        if self.settings.group_instance_id:
            config.setdefault("group.instance.id", self.settings.group_instance_id)
        return self.consumer(group, **config)

    def prefetch_config(self) -> dict[str, Any]:
        """How far a stage consumer reads ahead of its free slots: enough to keep them busy,
        never a second backlog in memory.

        librdkafka's defaults prefetch up to 100,000 messages per partition and 64 MiB per
        consumer (plus 50 MiB fetches), and a worker has a consumer per stage: with a
        backlog that was ~20 MiB per consumer of small requests and would be hundreds of
        MiB of large ones. Here the queue holds at most ``4 x max_in_flight`` messages per
        partition and ``LLMPIPE_KAFKA_PREFETCH_KBYTES`` per consumer, and one fetch asks
        for no more than that (a single message above it still comes, so it may overshoot
        by one message of up to :data:`MAX_MESSAGE_BYTES`).

        A partition whose queue reached those bounds is fetched again only after
        ``fetch.queue.backoff.ms``. At librdkafka's 1 s default that made a steady load
        metastable: once a short hiccup had queued a backlog, each partition got one
        queue-full of messages per second, below the offered rate, so the backlog never
        drained (bench.latency at 450 req/s, quiet machine: p50 added 710-780 ms with the
        worker at half a core; at 200 ms: 6.7 ms, p99 27 ms). Shorter costs CPU draining a
        backlog (at 20 ms: +0.1-0.3 ms per request, the queue refilled in smaller pieces);
        200 ms refills each partition five times as fast as the worker can drain. It also
        held back a partition resumed after a pause while full.
        """
        s = self.settings
        kbytes = s.kafka_prefetch_kbytes
        return {
            "queued.min.messages": s.kafka_prefetch_messages or 4 * s.max_in_flight,
            "queued.max.messages.kbytes": kbytes,
            "fetch.max.bytes": kbytes * 1024,
            "max.partition.fetch.bytes": min(1_048_576, kbytes * 1024),
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        }

    def producer(self, **overrides: Any) -> Producer:
        """Idempotent, ``acks=all``: a retried send never duplicates or reorders.

        Unacknowledged outputs are held up to ``LLMPIPE_KAFKA_PRODUCER_BUFFER_KBYTES``
        (librdkafka's default is 1 GiB per producer): beyond it ``produce`` raises
        ``BufferError`` and the callers wait for deliveries, so a broker outage makes a
        stage wait instead of growing the worker.
        """
        config: dict[str, Any] = {
            **self.base_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "queue.buffering.max.kbytes": self.settings.kafka_producer_buffer_kbytes,
            **overrides,
        }
        return Producer(config)

    def stage_producer(self) -> Producer:
        """The one idempotent producer all at-least-once stages of this process send their
        outputs through, each the moment it is decided: one producer batches what every
        stage sends into the same requests to a broker, where a producer per stage would
        send each stage's outputs in requests of their own (more CPU in librdkafka and
        the broker per message). Created on first use; shared, so never closed by a
        stage (flushing it is what a stage may do).

        Its ``linger.ms`` is ``LLMPIPE_KAFKA_STAGE_LINGER_MS``: each hop's outputs go out
        as decided, so it is latency added per hop (three hops). 5 ms by default, as other
        producers: measured here (bench.latency --quick at half load, two runs each), 1 ms
        gave p50 / p95 / p99 added 10-12 / 23-36 / 32-91 ms at a maximum of 1,720-1,770
        req/s, 5 ms 18-19 / 30-31 / 39-45 ms at 1,935-1,990 req/s: a higher median, a
        steadier tail, more throughput, and a quarter of librdkafka's CPU per request
        (0.06 -> 0.015 ms over three hops), batches instead of near one request per
        output. Lower it where the median matters more than CPU."""
        with self._stage_producer_lock:
            if self._stage_producer is None:
                self._stage_producer = self.producer(
                    **{"linger.ms": self.settings.kafka_stage_linger_ms}
                )
            return self._stage_producer

    def take_stage_producer(self) -> Producer | None:
        """The shared stage producer, handed to its owner (the worker) to close once every
        stage that sent through it has stopped; None if none was made. A later
        :meth:`stage_producer` call makes a new one."""
        with self._stage_producer_lock:
            producer, self._stage_producer = self._stage_producer, None
            return producer

    def transactional_producer(self, transactional_id: str, **overrides: Any) -> Producer:
        """A producer for exactly-once hops; call ``init_transactions()`` before use.

        ``transaction.timeout.ms`` is short because the runner keeps a transaction open
        only for the few milliseconds of one commit: a worker killed inside a commit holds
        back ``read_committed`` readers of its output partitions until the broker aborts
        the transaction at this timeout (unless the same id starts again and fences it).
        """
        return self.producer(
            **{
                "transactional.id": transactional_id,
                "transaction.timeout.ms": 10_000,
                **overrides,
            }
        )

    def admin(self, **overrides: Any) -> AdminClient:
        return AdminClient({**self.base_config(), **overrides})
