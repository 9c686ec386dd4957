"""``llmpipe worker`` with ``LLMPIPE_HEALTH_PORT``: its probes follow the broker.

A real worker (a supervisor and two worker processes, the default on a two-core machine)
against a broker of the test's own (other ports, its own data dir: the shared broker is
never stopped) and the fake model: ready once every process has read the control topic and
joined its groups; ``/metrics`` shows both processes' series once requests flowed;
the broker stops, ``/readyz`` turns 503 while ``/healthz`` stays 200 (restarting the process
would not bring the broker back); the broker returns, ``/readyz`` turns 200 and requests
flow again. It ends with the ledger: nothing lost, duplicated, in two places, or paid twice.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.chaos import fake_model, own_broker
from bench.common import end_offsets
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.commits import group_commits
from pipeline.harness.environment import create_topics
from pipeline.harness.ledger import Ledger, calls_of, read_terminal
from pipeline.harness.scenarios import SCENARIO_OVERRIDES, PlannedRequest, mixed_requests
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.clients import KafkaClients
from tests.support import make_settings, worker_process

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# Routes of every kind, none that waits out a model timeout (a hang is the chaos tests' job).
WEIGHTS = {"valid": 6, "hedge": 1, "invalid_json": 1, "server_error": 1, "garbage_bytes": 1}


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (the supervisor's and its children's),
    below the ephemeral range: a port that an outgoing connection holds cannot be bound."""
    for _ in range(200):
        base = random.randrange(20_000, 30_000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {count} consecutive free ports")


def everything_committed(settings: Settings) -> Callable[[], tuple[bool, object]]:
    """Every stage group's commits cover every message of its input topic.

    At least once, a message delivered but not yet committed when a worker process goes is
    done again by its partition's next owner: a duplicate the contract allows. The outage
    below must find the first requests committed, not only delivered, for "no duplicate"
    to be this test's to check (a CI rehearsal stopped the broker within the commit
    interval of the last output and saw 4 duplicates after a process was replaced)."""

    def check() -> tuple[bool, object]:
        consumer = KafkaClients(settings).consumer(None)
        try:
            behind = {}
            for name, stage in topology.STAGES.items():
                written = end_offsets(consumer, settings.topic(stage.input_topic))
                committed = sum(group_commits(settings, name).positions.values())
                if committed < written:
                    behind[name] = (committed, written)
        finally:
            consumer.close()
        return not behind, behind

    return check


def probe(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError) as exc:
        return 0, {"unreachable": str(exc)}


def wait_for(
    what: str, check: Callable[[], tuple[bool, object]], timeout_s: float, alive: Callable[[], None]
) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        alive()
        done, last = check()
        if done:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s; last answer {last}")


def produce(settings: Settings, planned: list[PlannedRequest]) -> None:
    messages = [(p.key, p.value, p.headers) for p in planned]
    produce_batch(settings, topology.REQUESTS, messages, timeout_s=BULK_TIMEOUT_S)


def assert_clean(ledger: Ledger, planned: list[PlannedRequest]) -> None:
    assert not ledger.missing, f"missing: {sorted(ledger.missing)[:5]}"
    assert not ledger.duplicates, f"duplicates: {ledger.duplicates}"
    assert not ledger.two_places, f"in two terminal places: {ledger.two_places}"
    wrong = ledger.wrong_routes({p.request_id: (p.expected, p.expected_reason) for p in planned})
    assert not wrong, f"wrong routes: {wrong}"


def test_readyz_follows_the_broker_and_metrics_show_the_pipeline(tmp_path: Path) -> None:
    with own_broker() as broker, fake_model(latency=0.01) as fake:
        settings = make_settings(broker.bootstrap, model_base_url=fake.url)
        create_topics(settings)
        port = free_ports(3)
        base = f"http://127.0.0.1:{port}"
        env = [
            ("LLMPIPE_HEALTH_PORT", str(port)),
            ("OTEL_METRICS_EXPORTER", "prometheus"),
            ("LLMPIPE_WORKER_PROCESSES", "2"),
            ("LLMPIPE_MODEL_MAX_ATTEMPTS", "2"),
            # What is under test is the probes, not exactly-once hops through a restart
            # (tests/e2e/test_pipeline_crash.py): idempotent sends resume at once.
            ("LLMPIPE_DELIVERY", "at_least_once"),
            *((f"LLMPIPE_{k.upper()}", str(v)) for k, v in SCENARIO_OVERRIDES.items()),
        ]
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log, worker_process(settings, *env, log=log) as worker:

            def alive() -> None:
                if worker.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise AssertionError(f"the worker exited {worker.returncode}: {tail}")

            def status(path: str, want: int) -> Callable[[], tuple[bool, object]]:
                def check() -> tuple[bool, object]:
                    code, body = probe(base + path)
                    return code == want, (code, body)

                return check

            wait_for("ready after start", status("/readyz", 200), 120, alive)
            _, ready = probe(base + "/readyz")
            processes = ready["processes"]
            assert isinstance(processes, list) and len(processes) == 2, ready
            for answer in processes:
                assert answer["control_topic_read"] is True, ready
                assert answer["stages_joined"] == ["fallback", "model", "settle", "validate"]

            before = mixed_requests(16, seed=11, weights=WEIGHTS, prefix="ep-before")
            produce(settings, before)
            ledger = read_terminal(settings, [p.request_id for p in before], timeout_s=120)
            assert_clean(ledger, before)

            instances: set[str] = set()

            def has_series() -> tuple[bool, object]:
                with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
                    text = response.read().decode()
                wanted = ("llmpipe_requests_total{", "llmpipe_stage_messages_total{")
                instances.clear()
                instances.update(re.findall(r'service_instance_id="([^"]+)"', text))
                both = {'llmpipe_process="0"', 'llmpipe_process="1"'}
                found = all(w in text for w in wanted) and all(p in text for p in both)
                return found and len(instances) == 2, text[:500]

            wait_for("llmpipe series on /metrics", has_series, 30, alive)
            wait_for("the first requests committed", everything_committed(settings), 60, alive)
            calls_before = fake.server.request_calls()

            broker.down()

            def broker_unready() -> tuple[bool, object]:
                code, body = probe(base + "/readyz")
                live, live_body = probe(base + "/healthz")
                assert live == 200, f"/healthz failed during a broker outage: {live_body}"
                return code == 503 and "broker unreachable" in str(body), body

            wait_for("not ready once the broker is down", broker_unready, 60, alive)

            broker.up()
            # A consumer that librdkafka left with no broker through the restart exits its
            # process and the supervisor replaces it (StageRunner._check_orphaned), well
            # within this wait.
            wait_for("ready again once the broker is back", status("/readyz", 200), 120, alive)
            assert probe(base + "/healthz")[0] == 200

            after = mixed_requests(16, seed=12, weights=WEIGHTS, prefix="ep-after")
            produce(settings, after)
            everyone = before + after
            ledger = read_terminal(
                settings, [p.request_id for p in everyone], timeout_s=180, settle_s=2
            )
            assert_clean(ledger, everyone)
            now = fake.server.request_calls()
            redone = {
                p.request_id: calls_of(now, p.request_id) - calls_of(calls_before, p.request_id)
                for p in before
                if calls_of(now, p.request_id) != calls_of(calls_before, p.request_id)
            }
            assert not redone, f"model calls redone after the outage: {redone}"

        # Every log line names its process the way its metrics do (both children logged
        # the outage).
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
        logged = {line.get("service.instance.id") for line in lines}
        assert None not in logged, [line for line in lines if "service.instance.id" not in line]
        assert instances <= set(logged), (instances, logged)
