"""How a worker process ends: ``llmpipe worker`` in a real process, its ``Worker`` stood in
for by one whose run ends at once (cleanly, with a fatal Kafka error, or cleanly but with a
thread left behind), and a real worker SIGTERMed after answering requests.

A fatal Kafka error (a fenced static member, say) ends the process crash-only
(:func:`pipeline.runtime.worker.exit_fatally`): exit code 1 and one ``error:`` line, and no
interpreter shutdown, which is where a fenced zombie worker once died with SIGABRT instead
(the e2e zombie test), and so does an unexpected exception (a bug), with its traceback
logged. The atexit handler the child registers is the witness: an ordinary exit runs it,
the crash-only one must not. A thread stuck in a call (inside librdkafka in
a broker outage, say) must not keep a stopped worker up: it leaves after
:data:`~pipeline.runtime.worker.THREADS_EXIT_WAIT_S`, with exit code 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.contract.envelopes import Request
from pipeline.harness.environment import worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.runtime.worker import THREADS_EXIT_WAIT_S
from pipeline.transport.batch import Message
from tests.policy_support import ANSWER, NAME, write_prompts
from tests.support import produce

CHILD = """
import atexit, logging, sys, threading, time
from pipeline.cli.main import app
from pipeline.runtime import worker
from pipeline.transport.delivery import KafkaFatalError

NEVER = threading.Event()

class StandIn:
    def __init__(self, settings, stages=None):
        self.stage_names = list(stages or [])

    async def run(self, stop):
        logging.getLogger("llmpipe.test").warning("stand-in worker ending: %s", HOW)
        if HOW == "fatal":
            raise KafkaFatalError("stage model: consumer failed: Static consumer fenced")
        if HOW == "bug":  # an unexpected exception, with a call stuck on a non-daemon thread
            threading.Thread(target=NEVER.wait, name="kafka-stuck").start()
            print("STOPPED-AT", time.monotonic(), flush=True)
            raise ZeroDivisionError("division by zero in a stage")
        if HOW == "stuck":  # a call that never returns, on a non-daemon thread
            threading.Thread(target=NEVER.wait, name="kafka-stuck").start()
        if HOW == "slow":  # one that returns soon after the stop
            threading.Thread(target=time.sleep, args=(0.5,), name="kafka-slow").start()
        print("STOPPED-AT", time.monotonic(), flush=True)

HOW = sys.argv[1]
worker.Worker = StandIn
atexit.register(lambda: print("ATEXIT-RAN", flush=True))
sys.argv = ["llmpipe", "worker", "--processes", "1", "--stages", "model"]
app()
"""


def _run(how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, how],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fatal_kafka_error_ends_the_process_crash_only_with_exit_code_1_and_one_line() -> None:
    child = _run("fatal")
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    assert child.returncode == 1, why
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: stage model: consumer failed: Static consumer fenced"], why
    # The log written just before the error is out (flushed before os._exit) ...
    assert "stand-in worker ending: fatal" in child.stderr, why
    # ... and the interpreter did not shut down: its atexit handlers never ran.
    assert "ATEXIT-RAN" not in child.stdout, why


def test_a_bug_escaping_the_worker_ends_it_crash_only_with_its_traceback_and_exit_code_1() -> None:
    """Not a hang: the thread stuck in a call is not joined, as the interpreter's shutdown
    would (for ever), and the traceback is in the log for whoever fixes the bug."""
    child = _run("bug")
    exited_after_s = _stopped_for(child, time.monotonic())
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    assert child.returncode == 1, why
    assert exited_after_s < 10, why
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: worker failed: ZeroDivisionError: division by zero in a stage"], why
    assert "Traceback" in child.stderr and "in run" in child.stderr, why
    assert "ATEXIT-RAN" not in child.stdout, why


def test_a_worker_that_stops_cleanly_exits_0_through_the_ordinary_shutdown() -> None:
    child = _run("clean")
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    assert child.returncode == 0, why
    assert not [line for line in child.stderr.splitlines() if line.startswith("error:")], why
    assert "ATEXIT-RAN" in child.stdout, why


def _stopped_for(child: subprocess.CompletedProcess[str], ended: float) -> float:
    """Seconds from the end of the stand-in's run to the child's exit (CLOCK_MONOTONIC is
    one clock for every process of the machine)."""
    stopped = [line for line in child.stdout.splitlines() if line.startswith("STOPPED-AT ")]
    assert stopped, child.stdout
    return ended - float(stopped[0].split()[1])


def test_a_thread_stuck_in_a_call_does_not_keep_a_stopped_worker_up() -> None:
    child = _run("stuck")
    exited_after_s = _stopped_for(child, time.monotonic())
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    # A clean stop's exit code, once the bound is over, not a hang until SIGKILL ...
    assert child.returncode == 0, why
    assert THREADS_EXIT_WAIT_S <= exited_after_s < THREADS_EXIT_WAIT_S + 5, why
    # ... saying which thread was left and that nothing is lost ...
    warnings = [line for line in child.stderr.splitlines() if "kafka-stuck" in line]
    assert len(warnings) == 1, why
    assert f"did not end within {THREADS_EXIT_WAIT_S:.0f}s" in warnings[0], why
    assert "nothing is lost" in warnings[0], why
    assert not [line for line in child.stderr.splitlines() if line.startswith("error:")], why
    # ... and without the interpreter's shutdown, which would join the thread for ever.
    assert "ATEXIT-RAN" not in child.stdout, why


def test_a_thread_that_ends_within_the_bound_is_waited_for_and_the_shutdown_is_ordinary() -> None:
    child = _run("slow")
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    assert child.returncode == 0, why
    assert "kafka-slow" not in child.stderr, why
    assert "ATEXIT-RAN" in child.stdout, why


SIGTERMED_CHILD = """
import atexit, contextlib, sys
from pathlib import Path
from pipeline.cli.main import app

def librdkafka_threads():
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(comm.read_text().strip())
    return sorted(name for name in names if name.startswith("rdk:"))

# Registered first, so it runs last; after the interpreter joined its threads.
atexit.register(lambda: print("RDK-AT-EXIT", librdkafka_threads(), flush=True))
sys.argv = ["llmpipe", "worker", "--processes", "1"]
app()
"""


@pytest.mark.kafka
@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_a_worker_stopped_by_sigterm_has_closed_every_kafka_client_before_interpreter_shutdown(
    kafka_settings: Settings, tmp_path: Path, delivery: str
) -> None:
    """A real ``llmpipe worker`` (every stage, so the fleet link and, with a prompt in
    burn-in, the burn-in ledger too) answers requests through the fake model, then gets
    SIGTERM: it exits 0, and when the interpreter runs its atexit handlers no librdkafka
    thread (``rdk:main``, ``rdk:broker…``) is left, i.e. every client it made was closed or
    destroyed before Python began finalising (before, the fleet's state publisher was not)."""
    write_prompts(tmp_path, {"burn_in": {"answers": 2}})
    ids = [f"exit-{i}" for i in range(5)]
    log_path = tmp_path / "worker.log"
    with running_fake_llm() as fake, log_path.open("wb") as log:
        settings = kafka_settings.model_copy(
            update={
                "model_base_url": fake.url,
                "prompts_dir": tmp_path / "prompts",
                "delivery": delivery,
            }
        )
        child = subprocess.Popen(
            [sys.executable, "-c", SIGTERMED_CHILD],
            cwd=REPO_ROOT,
            env={**os.environ, **worker_environment(settings)},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            produce(settings, topology.REQUESTS, _requests(ids))
            ledger = read_terminal(settings, ids, timeout_s=120)
            assert not ledger.missing, log_path.read_text()
            child.send_signal(signal.SIGTERM)
            stdout, _ = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    why = f"stdout={stdout!r} log={log_path.read_text()[-3000:]!r}"
    assert child.returncode == 0, why
    assert "RDK-AT-EXIT []" in stdout.splitlines(), why


def _requests(ids: list[str]) -> list[Message]:
    """Requests for the burn-in prompt whose fake-model answer is fixed and valid."""
    messages: list[Message] = []
    for request_id in ids:
        body = f"Please refund order {request_id}. [[answer:{json.dumps(ANSWER)}]]"
        request = Request(
            request_id=request_id, prompt=NAME, variables={"subject": "Refund", "body": body}
        )
        headers = [("content-type", b"application/json")]
        messages.append((request_id.encode(), request.model_dump_json().encode(), headers))
    return messages
