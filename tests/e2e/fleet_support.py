"""What the fleet scenarios share: worker processes (stderr to a file, not a pipe a busy
worker could fill), the model group's assignment, the fake server's calls over time, and
the fleet topic read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import FleetEvent
from pipeline.harness.environment import worker_environment
from pipeline.harness.fakellm.server import FakeLLMServer
from pipeline.harness.scenarios import PROMPT, TICKETS, VERSION
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from pipeline.transport.reader import scan


@dataclass
class Processes:
    """Worker processes of one scenario; every log goes to its own file."""

    settings: Settings
    env: dict[str, str]
    directory: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)

    def start(self, name: str, stages: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        args = ["--stages", ",".join(stages)] if stages else []
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", *args],
            env={**os.environ, **worker_environment(self.settings), **self.env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        self.running[name] = process
        return process

    def kill(self, name: str) -> None:
        """SIGKILL: no clean shutdown, no lease deleted, nothing committed."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.ended.append(name)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.running.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"workers died: {dead}\n{self.logs()}")

    def logs(self, chars: int = 2500) -> str:
        parts = []
        for path in sorted(self.directory.glob("*.log")):
            text = path.read_text("utf-8", "replace")
            parts.append(f"--- {path.stem} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()


@contextmanager
def processes(settings: Settings, env: dict[str, str]) -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="llmpipe-fleet-") as directory:
        group = Processes(settings, env, Path(directory))
        try:
            yield group
        finally:
            group.stop_all()


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float, workers: Processes
) -> None:
    """Poll ``condition``; fail naming what was missing, with the workers' logs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        workers.check_alive()
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}\n{workers.logs()}")
        time.sleep(0.05)


DESCRIBE_ATTEMPTS = 3


def assignment(settings: Settings, stage: str) -> dict[int, str]:
    """Partition of the stage's input topic -> member id of its consumer group, now."""
    admin = AdminClient(settings.kafka_client_config())
    group = settings.group(stage)
    # A describe can go unanswered while the group rebalances on a loaded machine (seen in
    # CI: one 10 s timeout inside a 120 s wait): ask again, up to DESCRIBE_ATTEMPTS times.
    for attempt in range(1, DESCRIBE_ATTEMPTS + 1):
        try:
            described = admin.describe_consumer_groups([group])[group].result(timeout=10)
            break
        except TimeoutError:
            if attempt == DESCRIBE_ATTEMPTS:
                raise
    topic = settings.topic(topology.STAGES[stage].input_topic)
    return {
        tp.partition: member.member_id
        for member in described.members
        for tp in member.assignment.topic_partitions
        if tp.topic == topic
    }


class CallSampler:
    """The fake server's calls, sampled every ``every_s`` on a thread: the calls made in any
    window can be read off afterwards."""

    def __init__(self, fake: FakeLLMServer, every_s: float = 0.25):
        self._fake = fake
        self._every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="call-sampler", daemon=True)

    def __enter__(self) -> CallSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def calls(self) -> int:
        """Calls started so far; per request id, so :meth:`FakeLLMServer.reset_counters`
        (which a test uses to read the largest number in flight per window) leaves it."""
        tallies = self._fake.request_calls().values()
        return sum(t.started for kinds in tallies for t in kinds.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.calls()))
            self._stop.wait(self._every_s)

    def between(self, start: float, end: float) -> int:
        """Calls made between two monotonic times (nearest samples)."""

        def at(moment: float) -> int:
            before = [calls for t, calls in self.samples if t <= moment]
            return before[-1] if before else 0

        return at(end) - at(start)


def fleet_events(settings: Settings) -> list[tuple[str, FleetEvent | None, int]]:
    """Every record on llm.fleet now: key, event (None: tombstone), timestamp in ms."""
    codec = Codec()
    out: list[tuple[str, FleetEvent | None, int]] = []
    for record in scan(settings, [settings.topic(topology.FLEET)], deadline_s=30):
        key = (record.key or b"").decode()
        event = None
        if record.value is not None:
            content_type = h.text(record.headers_map, h.CONTENT_TYPE)
            event = codec.decode(record.value, FleetEvent, content_type)
        out.append((key, event, record.timestamp_ms or 0))
    return out


def ledger_counts(ledger: Any) -> dict[str, int]:
    """The four numbers every fault test ends with (calls redone added by the caller)."""
    return {
        "missing": len(ledger.missing),
        "duplicates": len(ledger.duplicates),
        "two_places": len(ledger.two_places),
    }


def valid_request(request_id: str, deadline_s: float | None, index: int) -> bytes:
    """A ticket_triage@2 request the fake model answers validly, as JSON, with a deadline
    ``deadline_s`` from now (so an overloaded pipeline drains its excess by deadline)."""
    subject, body, answer = TICKETS[index % len(TICKETS)]
    fields: dict[str, Any] = {
        "request_id": request_id,
        "prompt": PROMPT,
        "prompt_version": VERSION,
        "variables": {
            "subject": subject,
            "body": f"{body}\n[[answer:{json.dumps(answer)}]] [[fake:valid]]",
            "customer_tier": "pro",
        },
    }
    if deadline_s is not None:
        at = datetime.now(UTC) + timedelta(seconds=deadline_s)
        fields["deadline"] = at.isoformat()
    return json.dumps(fields).encode()


class OfferedLoad:
    """Requests produced at ``per_s`` on a thread (the upstream), each with a deadline."""

    def __init__(self, settings: Settings, per_s: float, prefix: str, deadline_s: float) -> None:
        self._settings = settings
        self._per_s = per_s
        self._prefix = prefix
        self._deadline_s = deadline_s
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offered-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        producer = KafkaClients(self._settings).producer()
        topic = self._settings.topic(topology.REQUESTS)
        started = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self._per_s)
            while len(self.ids) < due:
                rid = f"{self._prefix}-{len(self.ids):06d}"
                value = valid_request(rid, self._deadline_s, len(self.ids))
                producer.produce(
                    topic,
                    value=value,
                    key=rid.encode(),
                    headers=[(h.CONTENT_TYPE, b"application/json")],
                )
                self.ids.append(rid)
            producer.poll(0)
            self._stop.wait(0.05)
        left = producer.flush(30)
        assert left == 0, f"{left} requests not delivered"
