"""What a worker's ``/healthz`` and ``/readyz`` say (served by
:mod:`pipeline.observability.endpoints`, on threads of their own).

Liveness is "the event loop runs": a task on the loop stamps the time every
:data:`BEAT_INTERVAL_S`, and the probe fails once the stamp is older than
``LLMPIPE_HEALTH_STALE_S``. A loop blocked by a runaway handler or a deadlock fails it (the
orchestrator restarts the process); slow work that yields, a broker outage or a model
outage do not, because restarting would not cure them.

Readiness is "the worker can do its job now", four conditions:

* the control topic was read to its end at start (flags, kill switches and pins in force);
* every stage consumer is in its group: it has been given its share and has not lost it
  since (a session that timed out during an outage rejoins first); an empty share (more
  members than partitions) is idle by design, and ready;
* the broker answers a metadata request for the control topic, asked on the probe's
  thread at most once per :data:`PROBE_CACHE_S`: the consumers keep their assignment
  through an outage, so the assignment alone would say "ready" with no broker at all;
* no stage's commit has been running longer than
  :data:`~pipeline.transport.delivery.STUCK_COMMIT_S`: a commit that never returns (a
  librdkafka call hanging past the watchdog that replaces stuck transactional producers)
  holds that stage's partitions back while everything else looks fine.

Neither check touches the stages: the heartbeat is one timer per second on the loop, the
rest is read from flags when a probe comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Protocol

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

from pipeline.observability.endpoints import Verdict
from pipeline.transport.clients import KafkaClients
from pipeline.transport.delivery import STUCK_COMMIT_S

BEAT_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
PROBE_CACHE_S = 1.0
# The supervisor waits for a child's answer longer than the child waits for the broker.
CHILD_TIMEOUT_S = PROBE_TIMEOUT_S + 1.5


class Heartbeat:
    """The loop's pulse: :meth:`run` stamps the time on the loop, :meth:`verdict` reads
    the stamp from any thread (a float read and write: no lock needed)."""

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.monotonic):
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    async def run(self, stop: asyncio.Event, interval_s: float = BEAT_INTERVAL_S) -> None:
        while not stop.is_set():
            self.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def verdict(self) -> Verdict:
        age = self._clock() - self._last
        detail = {"loop_last_ran_s_ago": round(age, 3), "stale_after_s": self._stale_after_s}
        if age > self._stale_after_s:
            return Verdict(False, {**detail, "reason": "the event loop is not running"})
        return Verdict(True, detail)


class Member(Protocol):
    """What readiness reads off a stage runner."""

    stage: str
    joined: bool
    commit_since: float | None


class WorkerReadiness:
    """``/readyz`` of one worker; the worker hands it its parts as they come up."""

    def __init__(self, clients: KafkaClients, control_topic: str) -> None:
        self._clients = clients
        self._control_topic = control_topic
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None
        self._probed_at = -PROBE_CACHE_S
        self._broker_error: str | None = "not asked yet"
        self.control_read: Callable[[], bool] = lambda: False
        self.members: Sequence[Member] = ()
        self.stopping: Callable[[], bool] = lambda: False

    def __call__(self) -> Verdict:
        broker_error = self._broker()
        waiting = [m.stage for m in self.members if not m.joined]
        now = time.monotonic()
        stuck = [
            m.stage
            for m in self.members
            if (since := m.commit_since) is not None and now - since > STUCK_COMMIT_S
        ]
        detail: dict[str, object] = {
            "control_topic_read": self.control_read(),
            "stages_joined": sorted(m.stage for m in self.members if m.joined),
            "broker": broker_error or "reachable",
        }
        # The first cause wins: an outage also drops the group sessions, so the broker is
        # named before the groups it keeps the stages out of.
        if self.stopping():
            reason = "stopping"
        elif broker_error is not None:
            reason = f"broker unreachable: {broker_error}"
        elif not self.control_read():
            reason = "the control topic is not read yet"
        elif not self.members or waiting:
            reason = f"stages not in their groups yet: {', '.join(waiting) or 'all'}"
        elif stuck:
            reason = f"a commit running for over {STUCK_COMMIT_S:.0f} s: {', '.join(stuck)}"
        else:
            return Verdict(True, detail)
        return Verdict(False, {**detail, "reason": reason})

    def _broker(self) -> str | None:
        """``None`` when the broker answered within :data:`PROBE_TIMEOUT_S`, else why not."""
        with self._lock:
            if time.monotonic() - self._probed_at < PROBE_CACHE_S:
                return self._broker_error
            if self._admin is None:
                self._admin = self._clients.admin()
            try:
                metadata = self._admin.list_topics(self._control_topic, timeout=PROBE_TIMEOUT_S)
                topic = metadata.topics.get(self._control_topic)
                error = topic.error if topic is not None else "not in the metadata"
                self._broker_error = None if error is None else f"{self._control_topic}: {error}"
            except KafkaException as exc:
                self._broker_error = str(exc.args[0]) if exc.args else repr(exc)
            if self._broker_error is None:
                self._clients.health.ok()
            self._probed_at = time.monotonic()
            return self._broker_error


def child_port(base: int, index: int) -> int:
    """Under a supervisor (``--processes N``), child ``index`` serves its endpoints on the
    loopback port ``base + 1 + index``; the supervisor answers on ``base`` for them all."""
    return base + 1 + index


class ChildEndpoints:
    """The supervisor's ``/healthz``, ``/readyz`` and ``/metrics``: its children's, gathered.

    Ready when every child is ready. Alive unless a child *answers* unhealthy (a wedged
    loop): a child that does not answer is starting or being restarted by the supervisor,
    which restarting the whole pod would not help. ``/metrics`` merges the children's
    series, each with the label ``llmpipe_process`` (their index), so no two collide.
    """

    def __init__(self, ports: Sequence[int], host: str = "127.0.0.1") -> None:
        self._urls = [f"http://{host}:{port}" for port in ports]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _ask(self, url: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(url, timeout=CHILD_TIMEOUT_S) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError) as exc:
            return 0, {"unreachable": str(exc)}

    def _gather(self, path: str) -> tuple[list[int], dict[str, Any]]:
        with ThreadPoolExecutor(len(self._urls)) as pool:  # at once: one slow child, one wait
            answers = list(pool.map(self._ask, [url + path for url in self._urls]))
        return [code for code, _ in answers], {"processes": [body for _, body in answers]}

    def liveness(self) -> Verdict:
        codes, detail = self._gather("/healthz")
        return Verdict(HTTPStatus.SERVICE_UNAVAILABLE not in codes, detail)

    def readiness(self) -> Verdict:
        codes, detail = self._gather("/readyz")
        return Verdict(all(code == HTTPStatus.OK for code in codes), detail)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, url in enumerate(self._urls):
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=CHILD_TIMEOUT_S) as r:
                    text = r.read().decode() if r.status == HTTPStatus.OK else ""
            except (OSError, ValueError):
                continue  # starting or restarting: its series return with it
            for family in text_string_to_metric_families(text):
                samples = [
                    s._replace(labels={**s.labels, "llmpipe_process": str(index)})
                    for s in family.samples
                ]
                merged = families.setdefault(family.name, family)
                merged.samples = samples if merged is family else [*merged.samples, *samples]
        yield from families.values()
