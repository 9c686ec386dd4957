"""Several worker processes under one supervisor: every core used, one exit code.

One worker is one asyncio event loop, so it uses at most one core; ``llmpipe worker
--processes N`` starts N of them (default: the cores this process may use) and keeps them
running. Each child is an ordinary ``llmpipe worker --processes 1``: its own consumer
group members, producers and transactional ids, so Kafka spreads the partitions over the
children the way it would over separate machines, and a child's crash is one member
leaving the groups (its uncommitted work is redone by whoever takes its partitions).

What the supervisor does, and nothing else:

- restarts a child that exits while the supervisor runs, after a delay that doubles with
  each quick failure (1 s, 2 s, 4 s ... capped at 30 s) and resets once a child has run for
  a minute, so a crash loop does not spin the CPU or flood the broker with group joins;
- stops for good, with the child's exit code, when a child exits with the usage/config
  error code (2): restarting cannot fix a bad setting, and hiding it behind restarts
  would leave an operator with a silent, idle fleet;
- forwards SIGTERM/SIGINT to every child (each drains and commits as a lone worker would)
  and exits 0 when they all stopped cleanly, otherwise with the first failing child's code;
- asks the kernel to send each child SIGTERM if the supervisor itself dies (Linux), so a
  SIGKILLed supervisor leaves no orphaned workers behind.

A child with static membership (``LLMPIPE_GROUP_INSTANCE_ID``) gets ``<id>-<index>``:
unique per child, and the same for the child that replaces it, which fences its
predecessor at once. With ``LLMPIPE_HEALTH_PORT`` the supervisor serves ``/healthz``,
``/readyz`` and ``/metrics`` there for all its children, each of which serves its own on
a loopback port above it (:class:`pipeline.runtime.health.ChildEndpoints`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import LlmpipeError
from pipeline.observability import endpoints
from pipeline.runtime.health import ChildEndpoints, child_port

log = logging.getLogger("llmpipe.supervisor")

PROCESSES_ENV = "LLMPIPE_WORKER_PROCESSES"
INSTANCE_ENV = "LLMPIPE_GROUP_INSTANCE_ID"
HEALTH_PORT_ENV = "LLMPIPE_HEALTH_PORT"
HEALTH_HOST_ENV = "LLMPIPE_HEALTH_HOST"
CONFIG_ERROR_EXIT = LlmpipeError.exit_code
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial_s`` doubling per quick failure up to ``max_s``; a child
    that ran ``reset_after_s`` or longer counts as healthy and resets the delay."""

    initial_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, quick_failures: int) -> float:
        if quick_failures <= 0:
            return self.initial_s
        return float(min(self.max_s, self.initial_s * 2 ** (quick_failures - 1)))


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (``cpu.max``, what a container's CPU limit sets), at least 1.

    ``os.cpu_count()`` counts the host's cores, so in a container limited to 2 CPUs on a
    64-core node it would start 64 workers that then share 2 cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def child_environment(base: Mapping[str, str], index: int) -> dict[str, str]:
    """A child's environment: one process each, a static member id and an endpoint port
    of its own (loopback only: the supervisor answers for it)."""
    env = {**base, PROCESSES_ENV: "1"}
    instance = base.get(INSTANCE_ENV)
    if instance:
        env[INSTANCE_ENV] = f"{instance}-{index}"
    port = base.get(HEALTH_PORT_ENV, "").strip()
    if port:
        env[HEALTH_PORT_ENV] = str(child_port(int(port), index))
        env[HEALTH_HOST_ENV] = "127.0.0.1"
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Keeps ``count`` children of ``argv`` running until ``stop`` is set (see the module).

    ``argv`` is the child's command line (by default ``llmpipe worker --processes 1`` with
    the same stages); ``environ`` the environment children inherit.
    """

    def __init__(
        self,
        count: int,
        argv: Sequence[str],
        environ: Mapping[str, str] | None = None,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError("a supervisor needs at least one process")
        self.count = count
        self._argv = list(argv)
        self._environ = dict(os.environ if environ is None else environ)
        self._backoff = backoff
        self._clock = clock
        self._fatal: int | None = None
        self.restarts = 0
        self.pids: dict[int, int] = {}
        """Child index -> pid of the process running in that slot now."""

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` (or a fatal child exit); return the one exit code."""
        codes = await asyncio.gather(*(self._keep(i, stop) for i in range(self.count)))
        if self._fatal is not None:
            return self._fatal
        return next((code for code in codes if code != 0), 0)

    async def _keep(self, index: int, stop: asyncio.Event) -> int:
        """One slot: start its child, restart it when it exits, stop it on ``stop``."""
        quick_failures = 0
        while not stop.is_set():
            started = self._clock()
            child = await asyncio.create_subprocess_exec(
                *self._argv,
                env=child_environment(self._environ, index),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            self.pids[index] = child.pid
            log.info("worker process %d started (pid %d)", index, child.pid)
            exited = asyncio.ensure_future(child.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():  # stop was asked: forward it, wait for the drain
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
                code = await exited
                return 0 if code in (0, -signal.SIGTERM) else code
            code = exited.result()
            if stop.is_set():
                return 0 if code in (0, -signal.SIGTERM) else code
            if code == CONFIG_ERROR_EXIT:
                log.error(
                    "worker process %d exited with %d (a usage or configuration error): "
                    "stopping every worker process, restarting cannot fix it",
                    index,
                    code,
                )
                self._fatal = code
                stop.set()
                return code
            ran_s = self._clock() - started
            quick_failures = 0 if ran_s >= self._backoff.reset_after_s else quick_failures + 1
            delay = self._backoff.delay(quick_failures)
            log.warning(
                "worker process %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                index,
                child.pid,
                _describe(code),
                ran_s,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if not stop.is_set():
                self.restarts += 1
        return 0


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def worker_argv(stages: Sequence[str]) -> list[str]:
    """The command line of one child worker running ``stages``."""
    argv = [sys.executable, "-m", "pipeline.cli", "worker", "--processes", "1"]
    return [*argv, "--stages", ",".join(stages)] if stages else argv


def run_supervisor(count: int, stages: Sequence[str]) -> int:
    """Blocking entry point for the CLI: SIGTERM and SIGINT stop every child cleanly."""

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("supervisor starting %d worker processes", count)
        settings = Settings()
        if settings.health_port is None:
            return await Supervisor(count, worker_argv(stages)).run(stop)
        port = settings.health_port
        server = endpoints.serve(settings.health_host, port)
        children = ChildEndpoints([child_port(port, i) for i in range(count)])
        endpoints.set_checks(liveness=children.liveness, readiness=children.readiness)
        endpoints.set_registry_source(lambda: children.registry)
        try:
            return await Supervisor(count, worker_argv(stages)).run(stop)
        finally:
            await asyncio.to_thread(endpoints.stop, server)

    return asyncio.run(main())
