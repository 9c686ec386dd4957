"""How a worker process ends: ``llmpipe worker`` in a real process, its ``Worker`` stood in
for by one whose run ends at once (cleanly, or with a fatal Kafka error).

A fatal Kafka error (a fenced static member, say) ends the process crash-only
(:func:`pipeline.runtime.worker.exit_fatally`): exit code 1 and one ``error:`` line, and no
interpreter shutdown, which is where a fenced zombie worker once died with SIGABRT instead
(the e2e zombie test). The atexit handler the child registers is the witness: an ordinary
exit runs it, the crash-only one must not.
"""

from __future__ import annotations

import subprocess
import sys

from pipeline.config import REPO_ROOT

CHILD = """
import atexit, logging, sys
from pipeline.cli.main import app
from pipeline.runtime import worker
from pipeline.transport.delivery import KafkaFatalError

class StandIn:
    def __init__(self, settings, stages=None):
        self.stage_names = list(stages or [])

    async def run(self, stop):
        logging.getLogger("llmpipe.test").warning("stand-in worker ending: %s", HOW)
        if HOW == "fatal":
            raise KafkaFatalError("stage model: consumer failed: Static consumer fenced")

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


def test_a_worker_that_stops_cleanly_exits_0_through_the_ordinary_shutdown() -> None:
    child = _run("clean")
    why = f"stdout={child.stdout!r} stderr={child.stderr!r}"
    assert child.returncode == 0, why
    assert not [line for line in child.stderr.splitlines() if line.startswith("error:")], why
    assert "ATEXIT-RAN" in child.stdout, why
