"""Kill switches, flags, the quality breaker and rate limits on a running worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.control.state import FORCE_REVIEW, GLOBAL_MODEL_CALLS, PROMPT_ENABLED, flag_key
from pipeline.control.topic import publish
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import SCENARIO_OVERRIDES, mixed_requests
from pipeline.runtime.worker import Worker
from tests.support import produce, running_worker

pytestmark = pytest.mark.kafka


def _send(settings: Settings, count: int, seed: int, fault: str = "valid") -> list[str]:
    planned = mixed_requests(count, seed=seed, weights={fault: 1}, prefix=f"s{seed}")
    produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
    return [p.request_id for p in planned]


def _routes(settings: Settings, ids: list[str]) -> set[tuple[str, str | None]]:
    ledger = read_terminal(settings, ids, timeout_s=60)
    assert not ledger.missing and not ledger.duplicates
    return {(ledger.first(i).outcome, ledger.first(i).reason) for i in ids}


def _flip(
    settings: Settings, worker: Worker, key: str, value: object, applied: Callable[[], bool]
) -> float:
    """Publish a control event and return how long the running worker took to apply it."""
    started = time.monotonic()
    publish(settings, key, value, actor="test", reason="test")
    deadline = started + 15
    while not applied():
        assert time.monotonic() < deadline, f"{key} did not reach the worker within 15 s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_kill_switch_stops_every_model_call_and_resumes(kafka_settings: Settings) -> None:
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings) as worker:
            assert _routes(settings, _send(settings, 20, 1)) == {("result:model", None)}
            key = flag_key(GLOBAL_MODEL_CALLS)
            seconds = _flip(
                settings, worker, key, False, lambda: not worker.control.model_calls_enabled()
            )
            fake.reset_counters()
            assert _routes(settings, _send(settings, 40, 2)) == {
                ("result:fallback", "model_calls_disabled")
            }
            assert fake.counters()["total_calls"] == 0
            _flip(settings, worker, key, None, worker.control.model_calls_enabled)
            assert _routes(settings, _send(settings, 20, 3)) == {("result:model", None)}
            assert fake.counters()["total_calls"] == 20
    print(f"kill switch reached the worker in {seconds:.3f}s")


def test_force_review_and_prompt_disable(kafka_settings: Settings) -> None:
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings) as worker:
            review = flag_key(FORCE_REVIEW, "ticket_triage")
            _flip(
                settings,
                worker,
                review,
                True,
                lambda: worker.control.flag(FORCE_REVIEW, "ticket_triage"),
            )
            assert _routes(settings, _send(settings, 10, 4)) == {("review", "force_review")}
            _flip(
                settings,
                worker,
                review,
                None,
                lambda: not worker.control.flag(FORCE_REVIEW, "ticket_triage"),
            )
            disabled = flag_key(PROMPT_ENABLED, "ticket_triage")
            _flip(
                settings,
                worker,
                disabled,
                False,
                lambda: not worker.control.flag(PROMPT_ENABLED, "ticket_triage"),
            )
            fake.reset_counters()
            assert _routes(settings, _send(settings, 10, 5)) == {
                ("result:fallback", "prompt_disabled")
            }
            assert fake.counters()["total_calls"] == 0


def test_quality_breaker_stops_paying_for_garbage(kafka_settings: Settings) -> None:
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(
            update={
                "model_base_url": fake.url,
                "quality_breaker_min_calls": 6,
                "quality_breaker_failure_rate": 0.5,
                "breaker_min_calls": SCENARIO_OVERRIDES["breaker_min_calls"],
            }
        )
        with running_worker(settings):
            garbage = _routes(settings, _send(settings, 6, 6, fault="invalid_json"))
            assert garbage == {("result:fallback", "invalid_output")}
            fake.reset_counters()
            after = _routes(settings, _send(settings, 30, 7))
            assert after == {("result:fallback", "quality_breaker_open")}
            assert fake.counters()["total_calls"] == 0


def test_rate_limit_holds_at_the_model_server(kafka_settings: Settings) -> None:
    per_minute, burst = 600, 5
    limits = {"*": {"requests_per_minute": per_minute, "request_burst": burst}}
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(
            update={"model_base_url": fake.url, "model_rate_limits": json.dumps(limits)}
        )
        with running_worker(settings):
            ids = _send(settings, 60, 8)
            started = time.monotonic()
            ledger = read_terminal(settings, ids, timeout_s=60)
            elapsed = time.monotonic() - started
    calls = fake.counters()["total_calls"]
    assert not ledger.missing and calls == 60
    allowed = burst + per_minute / 60 * elapsed
    assert calls <= allowed, f"{calls} calls in {elapsed:.1f}s exceeds {allowed:.0f}"
    assert elapsed >= (60 - burst) / (per_minute / 60) * 0.9


def test_daily_token_budget_sends_the_rest_to_fallback(kafka_settings: Settings) -> None:
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(
            update={
                "model_base_url": fake.url,
                "prompt_daily_tokens": json.dumps({"ticket_triage": 3_000}),
                "max_in_flight": 1,
            }
        )
        with running_worker(settings):
            ids = _send(settings, 12, 9)
            ledger = read_terminal(settings, ids, timeout_s=60)
    assert not ledger.missing
    outcomes = [(ledger.first(i).outcome, ledger.first(i).reason) for i in ids]
    answered = outcomes.count(("result:model", None))
    over = outcomes.count(("result:fallback", "budget_exceeded"))
    assert answered >= 1 and over >= 1 and answered + over == len(ids), outcomes
    assert fake.counters()["total_calls"] == answered


def test_a_listener_logs_each_applied_control_event_once(
    kafka_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator reading a worker's log sees the flag arrive: one line per live event."""
    import asyncio
    import logging

    from pipeline.contract.codec import Codec
    from pipeline.contract.topology import CONTROL
    from pipeline.control.listener import ControlListener
    from pipeline.control.state import ControlState
    from pipeline.transport.clients import KafkaClients

    key = flag_key(GLOBAL_MODEL_CALLS)

    async def run() -> None:
        state, stop = ControlState(), asyncio.Event()
        listener = ControlListener(
            kafka_settings.topic(CONTROL), state, Codec(), KafkaClients(kafka_settings)
        )
        task = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.ready.wait(), 60)
        await asyncio.to_thread(publish, kafka_settings, key, False, "ops", "provider incident")
        for _ in range(1500):  # up to 30 s for the listener to fold the event
            if not state.flag(GLOBAL_MODEL_CALLS):
                break
            await asyncio.sleep(0.02)
        stop.set()
        await task
        assert not state.flag(GLOBAL_MODEL_CALLS), "the event never reached the listener"

    with caplog.at_level(logging.INFO, logger="llmpipe"):
        asyncio.run(run())
    applied = [r.getMessage() for r in caplog.records if "control event applied" in r.getMessage()]
    assert applied == [applied[0]] and f"{key} = False (by ops at" in applied[0], applied
    assert "provider incident" in applied[0]
