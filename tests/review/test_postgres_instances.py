"""Two review service processes on one real PostgreSQL, two reviewers deciding at once, and
the database restarted under them: every decision reaches ``llm.review.decisions`` exactly
once (read committed), requests during the outage get a 503 page (never a 500), and both
instances serve again afterwards.

The instances run as ``llmpipe review serve`` processes started with default settings (no
``--instance``): their generated ids must not fence each other's Kafka transactions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from bench.common import free_port
from pipeline.config import Settings
from pipeline.contract.envelopes import Result, ReviewDecision
from pipeline.harness.environment import stop_process, worker_environment
from pipeline.review.auth import UsersFile
from pipeline.review.kafka_io import read_to_end
from tests.postgres import PostgresServer, postgres_server
from tests.review.test_review_support import escalation, review_message, wait_for
from tests.support import produce

pytestmark = pytest.mark.kafka

ITEMS = 40
PASSWORD = "a long enough password"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Instance:
    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            assert self.process.poll() is None, f"review instance exited:\n{self.log_text()}"
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def review_instance(env: dict[str, str], log: Path) -> Iterator[Instance]:
    port = free_port()
    command = [sys.executable, "-m", "pipeline.review.cli", "serve", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    instance = Instance(f"http://127.0.0.1:{port}", process, log)
    try:
        yield instance
    finally:
        stop_process(process)


@dataclass
class Reviewer:
    """A person at one instance: review next, approve, repeat; retries what a 503 refused."""

    name: str
    instance: Instance
    stop: threading.Event
    statuses: Counter[int] = field(default_factory=Counter)
    decided: list[tuple[str, float]] = field(default_factory=list)
    """(request id, monotonic time) of each decision the instance confirmed."""
    unavailable_pages: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.instance.base, timeout=30) as client:
                token = self.log_in(client)
                current: str | None = None
                while not self.stop.is_set():
                    if current is None:
                        current = self.review_next(client, token)
                        if current is None:
                            self.stop.wait(0.2)  # nothing free now: the other holds the rest
                    elif self.approve(client, token, current):
                        self.decided.append((current, time.monotonic()))
                        current = None
        except Exception as exc:
            self.errors.append(repr(exc))

    def log_in(self, client: httpx.Client) -> str:
        page = client.get("/login")
        match = TOKEN.search(page.text)
        assert match, page.text
        form = {"username": self.name, "password": PASSWORD, "csrf_token": match.group(1)}
        assert client.post("/login", data=form).status_code == 303
        page = client.get("/")
        match = TOKEN.search(page.text)
        assert match, page.text
        return match.group(1)

    def post(self, client: httpx.Client, path: str, form: dict[str, str]) -> httpx.Response:
        response = client.post(path, data=form)
        self.statuses[response.status_code] += 1
        if response.status_code == 503:
            assert "database is unavailable" in response.text, response.text[:500]
            self.unavailable_pages += 1
            self.stop.wait(0.2)  # what a person does on the 503 page: try again shortly
        return response

    def review_next(self, client: httpx.Client, token: str) -> str | None:
        response = self.post(client, "/claim-next", {"csrf_token": token})
        if response.status_code != 303:
            return None
        location = urlsplit(response.headers["location"])
        if location.path != "/item":
            return None
        return parse_qs(location.query)["id"][0]

    def approve(self, client: httpx.Client, token: str, request_id: str) -> bool:
        form = {"request_id": request_id, "action": "approve", "csrf_token": token}
        return self.post(client, "/decide", form).status_code == 303


def ledger(
    settings: Settings, topic: str, cls: type[ReviewDecision] | type[Result]
) -> Counter[str]:
    return Counter(e.request_id for e, _ in read_to_end(settings, topic, cls, timeout_s=20))


def test_two_instances_on_one_postgres_survive_a_database_restart(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    ids = [f"pg-{i:02d}" for i in range(ITEMS)]
    base = datetime(2030, 1, 1, 11, 0, tzinfo=UTC)
    produce(
        kafka_settings,
        "llm.review",
        [
            review_message(
                kafka_settings, escalation(rid, escalated_at=base + timedelta(seconds=i))
            )
            for i, rid in enumerate(ids)
        ],
    )
    users = tmp_path / "users.txt"
    for name in ("alice", "bob"):
        UsersFile(users).add(name, PASSWORD, log_n=10)

    with ExitStack() as stack:
        pg: PostgresServer = stack.enter_context(postgres_server())
        env = {
            **os.environ,
            **worker_environment(kafka_settings),
            "LLMPIPE_REVIEW_DB": pg.create_database("review"),
            "LLMPIPE_REVIEW_USERS": str(users),
            "LLMPIPE_REVIEW_SESSION_SECRET": "s" * 32,
        }
        env.pop("LLMPIPE_REVIEW_INSTANCE", None)  # defaults: ids generated per process
        instances = [
            stack.enter_context(review_instance(env, tmp_path / f"instance-{n}.log"))
            for n in (1, 2)
        ]
        for instance in instances:
            wait_for(instance.healthy, timeout_s=90, what=f"{instance.base} ready")

        stop = threading.Event()
        # a second browser of each reviewer, to look at the queue page during the outage
        probes = []
        for name, instance in zip(("alice", "bob"), instances, strict=True):
            probe = stack.enter_context(httpx.Client(base_url=instance.base, timeout=30))
            Reviewer(name, instance, stop).log_in(probe)
            probes.append(probe)
        reviewers = [
            Reviewer("alice", instances[0], stop),
            Reviewer("bob", instances[1], stop),
        ]
        threads = [threading.Thread(target=r.run, name=r.name) for r in reviewers]
        for thread in threads:
            thread.start()
        try:

            def decided() -> int:
                assert not any(r.errors for r in reviewers), [r.errors for r in reviewers]
                return sum(len(r.decided) for r in reviewers)

            wait_for(lambda: decided() >= ITEMS // 3, timeout_s=120, what="a third decided")
            pg.stop("immediate")  # a crash: recovery from the write-ahead log on start
            down_at = time.monotonic()
            wait_for(  # each retries on the 503 page, and is refused again while it is down
                lambda: all(r.unavailable_pages >= 3 for r in reviewers),
                timeout_s=60,
                what="both reviewers shown the 503 page (3 times) during the outage",
            )
            for probe in probes:  # a page and the health check, while it is down
                page = probe.get("/")
                assert page.status_code == 503 and "database is unavailable" in page.text
                assert page.headers["retry-after"] == "5"
                assert probe.get("/healthz").status_code == 503
            decided_during_outage = decided()
            pg.start()
            up_at = time.monotonic()
            wait_for(lambda: decided() >= ITEMS, timeout_s=180, what="every item decided")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)

        for instance in instances:
            wait_for(instance.healthy, timeout_s=60, what=f"{instance.base} healthy again")

        def all_on_topic() -> Counter[str] | None:
            counts = ledger(kafka_settings, "llm.review.decisions", ReviewDecision)
            return counts if set(counts) >= set(ids) else None

        decisions = wait_for(all_on_topic, timeout_s=60, what="every decision on the topic")
        results = ledger(kafka_settings, "llm.results", Result)
        logs = {i.base: i.log_text() for i in instances}

    missing = sorted(set(ids) - set(decisions))
    duplicates = sorted(rid for rid, n in decisions.items() if n > 1)
    unknown = sorted(set(decisions) - set(ids))
    result_duplicates = sorted(rid for rid, n in results.items() if n > 1)
    print(
        f"\nledger: {ITEMS} items, {len(decisions)} decisions on the topic, missing {missing}, "
        f"duplicates {duplicates}, results {sum(results.values())} (duplicates "
        f"{result_duplicates}); outage {up_at - down_at:.1f}s; statuses "
        f"{[dict(r.statuses) for r in reviewers]}"
    )
    assert (missing, duplicates, unknown) == ([], [], [])
    assert set(results) == set(ids) and result_duplicates == []
    for reviewer in reviewers:
        assert reviewer.errors == []
        assert reviewer.statuses[500] == 0 and set(reviewer.statuses) <= {303, 503}, (
            reviewer.name,
            reviewer.statuses,
        )
        after = [rid for rid, at in reviewer.decided if at > up_at]
        assert after, f"{reviewer.name}'s instance decided nothing after the database restart"
    assert all(len(r.decided) > 0 for r in reviewers) and decided_during_outage < ITEMS
    transactional_ids = set()
    for base_url, text in logs.items():
        assert "Traceback" not in text, f"{base_url}:\n{text[-4000:]}"
        assert "connection re-established" in text, f"{base_url} never reconnected:\n{text[-3000:]}"
        # a transaction that failed (e.g. fenced by an instance sharing the id) logs this
        assert "not delivered" not in text, f"{base_url}:\n{text[-3000:]}"
        transactional_ids.update(re.findall(r"\(transactional id (\S+)\)", text))
    assert len(transactional_ids) == 2, transactional_ids
