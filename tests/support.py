"""Helpers for tests that use the real broker and real workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from pipeline.config import Settings
from pipeline.harness.environment import stop_process, worker_environment
from pipeline.runtime.worker import Worker
from pipeline.transport.batch import BULK_TIMEOUT_S, Message, produce_batch

SESSION = uuid.uuid4().hex[:4]
"""Starts every topic prefix this test run hands out, so that its clean-up deletes its own
topics only: test runs of several checkouts share one broker, and a run that deleted every
new test topic would pull the topics from under another run's test."""


def make_settings(bootstrap: str, **overrides: Any) -> Settings:
    prefix = f"t{SESSION}-{uuid.uuid4().hex[:6]}."
    return Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, **overrides)


def produce(settings: Settings, topic: str, messages: list[Message]) -> None:
    produce_batch(settings, topic, messages, timeout_s=BULK_TIMEOUT_S)


async def until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> float:
    """Seconds until ``condition()`` held (polled every 5 ms on the running loop); fail
    naming ``what`` at the deadline. For tests on an event loop: wait for a condition,
    never sleep to let something happen."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def _wait_until_consuming(
    worker: Worker, thread: threading.Thread, errors: list[BaseException], timeout_s: float = 60
) -> None:
    """Fail fast with the worker's own error instead of waiting for messages that never come."""
    deadline = time.monotonic() + timeout_s
    while not (worker.runners and all(r.started.is_set() for r in worker.runners)):
        if errors:
            raise errors[0]
        assert thread.is_alive(), "the worker thread ended before it started consuming"
        assert time.monotonic() < deadline, f"the worker did not start within {timeout_s}s"
        time.sleep(0.02)


@contextmanager
def running_worker(
    settings: Settings, stages: tuple[str, ...] | None = None, **kwargs: Any
) -> Iterator[Worker]:
    """A real worker on its own event loop in a thread; stopped cleanly on exit."""
    worker = Worker(settings, stages, **kwargs)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(worker.run(stop))
        except BaseException as exc:
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="worker", daemon=True)
    thread.start()
    _wait_until_consuming(worker, thread, errors)
    try:
        yield worker
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(60)
    assert not thread.is_alive(), "worker did not stop within 60 s"
    if errors:
        raise errors[0]


@contextmanager
def worker_process(
    settings: Settings, *extra_env: tuple[str, str], log: IO[bytes] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``llmpipe worker`` as a real OS process, the way an operator runs it.

    Its log goes to ``log`` when given (a long run must not fill a pipe nobody reads),
    else to ``process.stderr``."""
    env = {**os.environ, **worker_environment(settings), **dict(extra_env)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.PIPE,
    )
    try:
        yield process
    finally:
        stop_process(process)
