"""``llmpipe worker --processes N``: real processes, real signals, one exit code.

The first test runs the real thing: a supervisor of two ``llmpipe worker`` children on the
shared broker and the fake model. A SIGKILLed child is replaced, the pipeline still
answers every request (ledger: none missing, none in two places), and SIGTERM stops the
supervisor and every child with exit code 0. The others use a tiny stand-in child
(a Python one-liner) to pin the supervisor's rules cheaply: a configuration error (exit
2) stops everything with 2 instead of restarting, a crash loop backs off, and a
SIGKILLed supervisor leaves no orphans (the kernel sends its children SIGTERM).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pipeline.harness.environment import worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from pipeline.runtime.supervisor import Backoff, Supervisor, available_cores, child_environment
from tests.support import make_settings, produce

CHILD_START_S = 120.0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.1)


def live_children(parent: psutil.Process) -> set[int]:
    return {
        c.pid for c in parent.children() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
    }


@pytest.mark.kafka
def test_a_killed_child_is_replaced_and_sigterm_stops_all_with_exit_0(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from pipeline.harness.environment import create_topics

    planned = mixed_requests(40, seed=5, weights={"valid": 1}, prefix="sup")
    with running_fake_llm() as fake:
        settings = make_settings(kafka_bootstrap, model_base_url=fake.url, delivery="at_least_once")
        create_topics(settings)
        env = {**os.environ, **worker_environment(settings), "LLMPIPE_WORKER_PROCESSES": "2"}
        log = tmp_path / "supervisor.log"
        with log.open("wb") as sink:  # a file, not a pipe: the children log to it too
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            parent = psutil.Process(supervisor.pid)
            wait_for(lambda: len(live_children(parent)) == 2, CHILD_START_S, "2 children")
            first = live_children(parent)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: len(live_children(parent)) == 2 and victim not in live_children(parent),
                CHILD_START_S,
                "the killed child to be replaced",
            )
            children = live_children(parent)
            assert len(children & first) == 1, (first, children)
            produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
            ledger = read_terminal(settings, [p.request_id for p in planned], timeout_s=240)
            assert not ledger.missing, f"missing: {sorted(ledger.missing)[:10]}"
            assert not ledger.two_places, ledger.two_places
            assert ledger.routes() == {"result:model": len(planned)}, ledger.routes()
            supervisor.send_signal(signal.SIGTERM)
            code = supervisor.wait(120)
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
                supervisor.wait()
        stderr = log.read_text(errors="replace")
    assert code == 0, stderr[-2000:]
    assert not any(psutil.pid_exists(pid) for pid in children), "a child outlived the supervisor"
    assert "exited with signal SIGKILL" in stderr and "restarting in" in stderr, stderr[-2000:]


def stand_in(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_a_configuration_error_stops_every_child_with_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    # Child 0 fails like `llmpipe worker` with a bad setting; child 1 would run forever.
    script = (
        "import os, sys, time, pathlib\n"
        f"pathlib.Path({str(marker)!r} + os.environ['LLMPIPE_GROUP_INSTANCE_ID']).touch()\n"
        "if os.environ['LLMPIPE_GROUP_INSTANCE_ID'].endswith('-0'):\n"
        # Child 0 fails once child 1 has started (its marker exists), at most 60 s on.
        "    deadline = time.monotonic() + 60\n"
        f"    while not pathlib.Path({str(marker)!r} + 'w-1').exists():\n"
        "        assert time.monotonic() < deadline, 'child 1 never started'\n"
        "        time.sleep(0.01)\n"
        "    sys.exit(2)\n"
        "time.sleep(600)\n"
    )
    supervisor = Supervisor(
        2, stand_in(script), {**os.environ, "LLMPIPE_GROUP_INSTANCE_ID": "w"}, Backoff(0.05)
    )
    started = time.monotonic()
    code = asyncio.run(asyncio.wait_for(supervisor.run(asyncio.Event()), 60))
    assert code == 2
    assert supervisor.restarts == 0, "a configuration error must not be restarted"
    assert (tmp_path / "startedw-0").exists() and (tmp_path / "startedw-1").exists()
    assert time.monotonic() - started < 60
    assert not psutil.pid_exists(supervisor.pids[1]), "the healthy child was left running"


def test_a_crashing_child_is_restarted_with_growing_delays() -> None:
    supervisor = Supervisor(1, stand_in("import sys; sys.exit(1)"), backoff=Backoff(0.05, 0.4))

    async def run() -> tuple[int, list[float]]:
        stop = asyncio.Event()
        starts: list[float] = []
        task = asyncio.create_task(supervisor.run(stop))
        seen = None
        while len(starts) < 6:
            pid = supervisor.pids.get(0)
            if pid != seen and pid is not None:
                seen = pid
                starts.append(time.monotonic())
            await asyncio.sleep(0.005)
        stop.set()
        return await asyncio.wait_for(task, 30), starts

    code, starts = asyncio.run(asyncio.wait_for(run(), 60))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert code == 0
    assert supervisor.restarts >= 5
    # 0.05, 0.1, 0.2, 0.4, 0.4: each gap at least its delay, and the cap holds.
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.4, 0.4], strict=False):
        assert gap >= delay, (gaps, delay)


def test_a_killed_supervisor_takes_its_children_with_it(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from pipeline.runtime.supervisor import Supervisor\n"
        "s = Supervisor(2, [sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "asyncio.run(s.run(asyncio.Event()))\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code])
    try:
        parent = psutil.Process(supervisor.pid)
        wait_for(lambda: len(live_children(parent)) == 2, 60, "2 children")
        children = live_children(parent)
        supervisor.kill()
        supervisor.wait(30)
        wait_for(
            lambda: (
                not any(
                    psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                    for p in children
                )
            ),
            30,
            "the children to stop after their supervisor died",
        )
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def test_children_get_one_process_each_and_their_own_member_id() -> None:
    env = child_environment({"LLMPIPE_GROUP_INSTANCE_ID": "pod-a", "X": "1"}, 3)
    assert env == {
        "LLMPIPE_GROUP_INSTANCE_ID": "pod-a-3",
        "X": "1",
        "LLMPIPE_WORKER_PROCESSES": "1",
    }
    assert "LLMPIPE_GROUP_INSTANCE_ID" not in child_environment({}, 0)


def test_available_cores_honours_a_container_cpu_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == len(os.sched_getaffinity(0))
    assert available_cores(tmp_path / "missing") == len(os.sched_getaffinity(0))
