"""One measured run: start processes on empty topics, produce a backlog, time the output.

Shared by the overhead, feature-cost, slow-model, scale-out and memory benchmarks so
they all measure the same way (see :mod:`bench.common` for why Kafka timestamps and the
middle 80 % of messages).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import (
    PYTHON,
    CpuMeter,
    FakeLLMProcess,
    Proc,
    TopicCounter,
    broker_process,
    fresh_topics,
    read_all,
    stage_groups,
    steady_rate,
    wait_groups_stable,
    wait_until,
    workers,
)
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.scenarios import PlannedRequest, mixed_requests
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch

GROUP_JOIN_TIMEOUT_S = 90.0


@dataclass
class Run:
    """What one run measured; ``rate`` is the steady-state messages/s on the output topic."""

    label: str
    count: int
    rate: float
    wall_rate: float
    wall_s: float
    cpu_s: dict[str, float]
    cores: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    steady_cpu_ms: dict[str, float] = field(default_factory=dict)
    """CPU ms per output message by process, over the same 10-90 % window as ``rate``:
    start-up (imports, group joins) and shutdown are left out, unlike ``cpu_s``."""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate"] = round(self.rate, 1)
        data["wall_rate"] = round(self.wall_rate, 1)
        data["wall_s"] = round(self.wall_s, 2)
        return data


def valid_requests(count: int, seed: int = 1) -> list[PlannedRequest]:
    """Scenario "valid": every request should end as a model result in llm.results."""
    return mixed_requests(count, seed=seed, weights={"valid": 1}, prefix="bench")


def send_backlog(settings: Settings, planned: Sequence[PlannedRequest]) -> None:
    produce_batch(
        settings,
        topology.REQUESTS,
        [(p.key, p.value, p.headers) for p in planned],
        timeout_s=BULK_TIMEOUT_S,
    )


def time_outputs(
    settings: Settings,
    count: int,
    procs: Mapping[str, Proc],
    label: str,
    timeout_s: float,
    t0: float,
    meter: CpuMeter,
    sampler: Callable[[int], None] | None = None,
) -> Run:
    """Wait for ``count`` results, then compute rates and CPU shares from their timestamps."""
    samples: list[tuple[float, dict[str, float]]] = []
    with TopicCounter(settings, [topology.RESULTS]) as counter:

        def done() -> bool:
            for name, proc in procs.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} exited: {proc.log_tail()}")
            samples.append((time.time(), {n: p.cpu_s() for n, p in procs.items()}))
            seen = counter.count()
            if sampler is not None:
                sampler(seen)
            return seen >= count

        wait_until(done, timeout_s, f"{count} results ({label})", 0.25)
    # Watermarks also count transaction markers (exactly-once hops write one per partition
    # and commit), so the count above can run ahead: the meter stops only once every
    # result is readable (read_committed), whatever the delivery mode.
    records = read_all(settings, [topology.RESULTS], count, timeout_s=120)
    meter.stop()
    stamps = [r.timestamp_ms for r in records]
    wall_s = (max(stamps) / 1000 - t0) if stamps else float("nan")
    return Run(
        label=label,
        count=count,
        rate=steady_rate(stamps),
        wall_rate=count / wall_s if wall_s > 0 else float("nan"),
        wall_s=wall_s,
        cpu_s=meter.result,
        cores=meter.utilisation(),
        steady_cpu_ms=steady_cpu_ms(stamps, samples),
    )


def steady_cpu_ms(
    stamps_ms: Sequence[int], samples: Sequence[tuple[float, Mapping[str, float]]]
) -> dict[str, float]:
    """CPU ms per message by process between the 10th and 90th percentile output times.

    ``samples`` are (wall time, CPU seconds by process) taken while waiting; the CPU at
    each end of the window is interpolated between the samples around it. Timestamps, not
    watermarks, bound the window, so transaction markers (exactly-once) do not count.
    """
    if len(stamps_ms) < 10 or len(samples) < 2:
        return {}
    ordered = sorted(stamps_ms)
    lo, hi = len(ordered) // 10, len(ordered) * 9 // 10 - 1
    t_lo, t_hi = ordered[lo] / 1000, ordered[hi] / 1000
    out: dict[str, float] = {}
    for name in samples[0][1]:
        used = _cpu_at(samples, name, t_hi) - _cpu_at(samples, name, t_lo)
        out[name] = round(used / (hi - lo) * 1000, 3)
    return out


def _cpu_at(samples: Sequence[tuple[float, Mapping[str, float]]], name: str, t: float) -> float:
    """A process's CPU seconds at wall time ``t``, linear between the nearest samples."""
    before = max((s for s in samples if s[0] <= t), key=lambda s: s[0], default=samples[0])
    after = min((s for s in samples if s[0] >= t), key=lambda s: s[0], default=samples[-1])
    if after[0] <= before[0]:
        return before[1][name]
    share = (t - before[0]) / (after[0] - before[0])
    return before[1][name] + share * (after[1][name] - before[1][name])


def measure_pipeline(
    bootstrap: str,
    planned: Sequence[PlannedRequest],
    fake: FakeLLMProcess,
    *,
    label: str,
    processes: int = 1,
    supervised: int = 1,
    extra_env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    timeout_s: float = 900.0,
    sampler: Callable[[int], None] | None = None,
    on_start: Callable[[list[Proc]], None] | None = None,
    preload: bool | None = None,
    discard_stdout: bool = False,
    idle_s: float = 0.0,
    **overrides: Any,
) -> Run:
    """``processes`` real ``llmpipe worker`` commands through all stages, each running
    ``supervised`` worker processes (``--processes``; more than 1 is a supervisor).

    One worker process: the backlog is produced *before* it starts, so the harness's
    producer never limits the rate and the measured window is pure draining. Several:
    they are started on empty topics and the backlog is produced once every group is
    stable with all of them, so no rebalance falls inside the measured window.

    ``idle_s`` (not with ``preload``): before the backlog, the workers' CPU is measured
    for that long with nothing to do (polls, commit timers, state listeners), as
    ``extra["idle_cores"]``, so a low rate's CPU per request can be split into a fixed
    cost per second and a cost per request.
    """
    overrides.setdefault("model_timeout_s", 30.0)
    members = processes * supervised
    preload = members == 1 if preload is None else preload
    extra_env = {**(extra_env or {}), "LLMPIPE_WORKER_PROCESSES": str(supervised)}
    with fresh_topics(bootstrap, model_base_url=fake.url, **overrides) as settings:
        if preload:
            send_backlog(settings, planned)
        t0 = time.time()
        with workers(settings, processes, extra_env, argv, discard_stdout) as procs:
            named: dict[str, Proc] = {p.name: p for p in procs}
            if fake.proc is not None:
                named["fakellm"] = fake.proc
            idle: float | None = None
            meter = CpuMeter({**named, "broker": broker_process(bootstrap)})
            if preload:
                meter.start()
            else:
                wait_groups_stable(settings, stage_groups(settings), members, GROUP_JOIN_TIMEOUT_S)
                idle = idle_cores(procs, idle_s) if idle_s > 0 else None
                meter.start()
                t0 = time.time()
                send_backlog(settings, planned)
            if on_start is not None:
                on_start(procs)
            run = time_outputs(settings, len(planned), named, label, timeout_s, t0, meter, sampler)
            if idle is not None:
                run.extra["idle_cores"] = idle
            return run


def idle_cores(procs: Sequence[Proc], seconds: float) -> float:
    """The cores the worker commands use over ``seconds`` with no messages to process."""
    before = sum(p.cpu_s() for p in procs)
    started = time.monotonic()
    time.sleep(seconds)  # measuring a rate over a fixed window, not waiting for a condition
    return round((sum(p.cpu_s() for p in procs) - before) / (time.monotonic() - started), 3)


def measure_relay(
    bootstrap: str,
    planned: Sequence[PlannedRequest],
    *,
    client: str = "confluent",
    timeout_s: float = 300.0,
) -> Run:
    """The no-processing baseline through the same three hops (see :mod:`bench.relay`).

    The backlog is produced first, then the relay starts and drains it: at tens of
    thousands of messages a second the relay would otherwise just follow the producer.
    """
    with fresh_topics(bootstrap) as settings:
        send_backlog(settings, planned)
        argv = [PYTHON, "-m", "bench.relay", "--bootstrap", bootstrap]
        argv += ["--prefix", settings.topic_prefix, "--client", client]
        t0 = time.time()
        relay = Proc(f"relay-{client}", argv, _env())
        try:
            meter = CpuMeter({"relay": relay, "broker": broker_process(bootstrap)})
            meter.start()
            return time_outputs(
                settings, len(planned), {"relay": relay}, f"relay ({client})", timeout_s, t0, meter
            )
        finally:
            relay.stop()


def _env() -> dict[str, str]:
    import os

    from bench.common import pythonpath

    return {**os.environ, "PYTHONPATH": pythonpath()}


def median_run(runs: Sequence[Run]) -> Run:
    """The run with the median rate: one number per variant, robust to one noisy repeat."""
    ordered = sorted(runs, key=lambda r: r.rate)
    chosen = ordered[len(ordered) // 2]
    chosen.extra["repeats"] = [round(r.rate, 1) for r in runs]
    return chosen
