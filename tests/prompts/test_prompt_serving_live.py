"""Pins, canaries and rollbacks reach a running worker through the control topic, no restart.

One worker runs for the whole scenario. Each control change is made with the
real CLI (``llmpipe prompts pin`` / ``rollback``), the test waits until the
worker's folded control state shows it, then sends requests and checks which
version and arm the results name. Propagation time (from invoking the CLI,
and from the broker's acknowledgement, to the worker's state) is printed;
run with ``-s`` to see it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence

import pytest
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.envelopes import Result
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.prompts import PromptRegistry, canary_bucket, select
from pipeline.runtime.worker import Worker
from tests.support import produce, running_worker

pytestmark = pytest.mark.kafka

EXAMPLES = REPO_ROOT / "prompts"
NAME = "ticket_triage"
# A valid answer for both versions (v1 accepts no customer_tier, so none is sent).
ANSWER = {"label": "billing", "priority": "normal", "summary": "Customer was charged twice."}
CANARY_PERCENT = 30.0
runner = CliRunner()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition`` until true; return the seconds it took (fail after ``timeout_s``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.002)
    return time.monotonic() - started


class Stopwatch:
    """Times control changes two ways: from invoking the CLI, and from its acknowledged write.

    Only the second is bounded: the first includes the CLI's own start-up and its producer's
    connection, which a loaded machine stretches and which says nothing about propagation.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.worst_after_ack_s = 0.0

    def change(
        self, what: str, settings: Settings, args: Sequence[str], shown: Callable[[], bool]
    ) -> None:
        invoked = time.monotonic()
        cli(settings, *args)
        acked = time.monotonic()
        wait_until(shown, 10, f"the {what} to reach the worker")
        applied = time.monotonic()
        self.worst_after_ack_s = max(self.worst_after_ack_s, applied - acked)
        self.lines.append(
            f"{what}: {(applied - invoked) * 1000:.0f} ms from invoking the CLI, "
            f"{(applied - acked) * 1000:.0f} ms after the broker acknowledged it"
        )


def cli(settings: Settings, *args: str) -> str:
    env = {
        "LLMPIPE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
    }
    result = runner.invoke(
        prompts_app, [*args, "--actor", "test", "--prompts-dir", str(EXAMPLES)], env=env
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout


def serve(settings: Settings, keys: Sequence[str]) -> list[tuple[str, Result]]:
    """Send one request per key (the Kafka key drives the canary) and return (key, result)."""
    requests = []
    for key in keys:
        rid = f"{key}-{uuid.uuid4().hex[:8]}"
        body = {
            "request_id": rid,
            "prompt": NAME,
            "variables": {
                "subject": "Charged twice this month",
                "body": f"My card was charged twice.\n[[answer:{json.dumps(ANSWER)}]]",
            },
        }
        requests.append((key, rid, json.dumps(body).encode()))
    produce(
        settings,
        "llm.requests",
        [(k.encode(), v, [("content-type", b"application/json")]) for k, _, v in requests],
    )
    ledger = read_terminal(settings, [rid for _, rid, _ in requests], timeout_s=30)
    assert not ledger.missing, f"no outcome for {sorted(ledger.missing)}"
    served = []
    for key, rid, _ in requests:
        result = ledger.first(rid).result
        assert result is not None and result.source == "model", ledger.first(rid)
        served.append((key, result))
    return served


def arms(served: Sequence[tuple[str, Result]]) -> set[tuple[int, str]]:
    return {(r.prompt.version, r.prompt.arm) for _, r in served}


def shows(worker: Worker, version: int | None, candidate: int | None = None) -> Callable[[], bool]:
    def check() -> bool:
        pin = worker.control.pins.get(NAME)
        if version is None:
            return pin is None
        return pin is not None and (pin.version, pin.candidate) == (version, candidate)

    return check


def test_pin_canary_and_rollback_change_what_a_running_worker_serves(
    kafka_settings: Settings,
) -> None:
    registry = PromptRegistry.load(EXAMPLES)
    watch = Stopwatch()
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings, registry=registry) as worker:
            # Unpinned: the newest version serves.
            assert arms(serve(settings, ["k-a", "k-b", "k-c"])) == {(3, "latest")}

            # Pin v1.
            watch.change(
                "pin", settings, ["pin", NAME, "1", "--reason", "v2 bad"], shows(worker, 1)
            )
            assert arms(serve(settings, ["k-a", "k-b", "k-c"])) == {(1, "pinned")}

            # Canary v2 at 30% on top of v1.
            canary = ["pin", NAME, "1", "--candidate", "2", "--percent", "30", "--reason", "x"]
            watch.change("canary", settings, canary, shows(worker, 1, 2))
            pins = worker.control.pins
            keys = [f"customer-{i}" for i in range(40)]
            served = serve(settings, keys + keys)  # every key twice
            by_key: dict[str, set[tuple[int, str]]] = {}
            for key, result in served:
                by_key.setdefault(key, set()).add((result.prompt.version, result.prompt.arm))
            assert all(len(a) == 1 for a in by_key.values()), "a key changed arm"
            for key, ((version, arm),) in ((k, tuple(a)) for k, a in by_key.items()):
                in_canary = canary_bucket(NAME, key.encode()) < CANARY_PERCENT * 100
                assert (version, arm) == ((2, "canary") if in_canary else (1, "control")), key
            assert arms(served) == {(2, "canary"), (1, "control")}
            # The share, over 1,000 keys, with the pin exactly as the worker folded it.
            share = sum(
                select(registry, pins, NAME, f"key-{i}", None).arm == "canary" for i in range(1000)
            )
            assert abs(share / 10 - CANARY_PERCENT) <= 3, share

            # Roll back: the previous pin (v1 alone) returns.
            rollback = ["rollback", NAME, "--reason", "canary over-escalates too"]
            watch.change("rollback", settings, rollback, shows(worker, 1))
            assert arms(serve(settings, ["k-a", "k-d"])) == {(1, "pinned")}

            # Roll back again: no earlier pin, so unpinned; the newest serves again.
            rollback = ["rollback", NAME, "--reason", "v2 fixed upstream"]
            watch.change("unpin", settings, rollback, shows(worker, None))
            assert arms(serve(settings, ["k-a", "k-d"])) == {(3, "latest")}
    print("\npin propagation to a running worker:\n  " + "\n  ".join(watch.lines))
    # Typically a few milliseconds after the acknowledged write: 5 s is >100x that.
    assert watch.worst_after_ack_s < 5, watch.lines


def test_a_pin_outlives_a_worker_restart(kafka_settings: Settings) -> None:
    """A worker that starts after the pin was written serves it from its first request."""
    registry = PromptRegistry.load(EXAMPLES)
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        cli(settings, "pin", NAME, "1", "--reason", "before start")
        with running_worker(settings, registry=registry):
            # The worker folds the control topic before it consumes its first request.
            assert arms(serve(settings, ["k-x"])) == {(1, "pinned")}
