"""Scale-out: ``llmpipe worker --processes N`` for N = 1, 2, 3 on 6-partition topics.

One command, one supervisor, N worker processes (see :mod:`pipeline.runtime.supervisor`).
The supervisor is started on empty topics, the backlog is produced once every stage's
consumer group is stable with all N members, and the steady-state rate is read from the
result timestamps. CPU is recorded for the whole command (supervisor and children), the
broker, the fake model and everything else on the machine, because on this shared 2-core
machine the answer to "why does the next process add less" is arithmetic: each worker
is a single-threaded event loop that saturates about one core, and the broker, the fake
model and other tenants need CPU too.

    python -m bench.scaleout [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import FakeLLMProcess, LoopDemand, Report, base_args, finish, plot_bars, table
from bench.runs import Run, measure_pipeline, valid_requests
from pipeline.runtime.supervisor import available_cores

PROCESSES = (1, 2, 3)


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 6_000 if quick else 15_000
    cores = available_cores()
    report = Report(
        "scaleout",
        "Scale-out: llmpipe worker --processes 1, 2, 3; 6 partitions, instant model",
        {"requests": count, "partitions": 6, "available_cores": cores},
    )
    planned = valid_requests(count, seed=3)
    runs: list[Run] = []
    demands: list[LoopDemand] = []
    with FakeLLMProcess() as fake:
        for n in PROCESSES:
            demand = LoopDemand()
            demands.append(demand)
            runs.append(
                measure_pipeline(
                    bootstrap,
                    planned,
                    fake,
                    label=f"--processes {n}",
                    supervised=n,
                    preload=False,
                    extra_env={"LLMPIPE_DELIVERY": "at_least_once"},
                    on_start=demand.watch,
                    sampler=demand.sample,
                )
            )
    base = runs[0].rate
    rows: list[dict[str, Any]] = []
    previous = 0.0
    for n, r, demand in zip(PROCESSES, runs, demands, strict=True):
        running, waiting = demand.shares()
        rows.append(
            {
                "processes": n,
                "rate": round(r.rate, 1),
                "speedup": round(r.rate / base, 2),
                "efficiency": round(r.rate / (n * base), 2),
                "added_by_last_process": round((r.rate - previous) / base, 2),
                "worker_cores": r.cores.get("worker0"),
                "broker_cores": r.cores.get("broker"),
                "fakellm_cores": r.cores.get("fakellm"),
                "machine_cores": r.cores.get("machine"),
                "others_cores": r.cores.get("others"),
                "worker_cpu_ms_per_request": r.steady_cpu_ms.get("worker0"),
                "loop_running": running,
                "loop_waiting_for_cpu": waiting,
                "run": r.as_dict(),
            }
        )
        previous = r.rate
    report.results = {"by_processes": rows, "available_cores": cores}
    report.markdown += table(
        [
            "processes",
            "steady req/s",
            "speedup vs 1",
            "efficiency (speedup / N)",
            "added by the last process (x one)",
            "worker cores (all processes)",
            "worker CPU ms / request",
            "each loop: running, waiting for a core",
            "broker, fake model cores",
            f"whole machine (of {cores})",
            "other tenants",
        ],
        [
            (
                r["processes"],
                r["rate"],
                r["speedup"],
                r["efficiency"],
                r["added_by_last_process"],
                r["worker_cores"],
                r["worker_cpu_ms_per_request"],
                f"{r['loop_running']}, {r['loop_waiting_for_cpu']}",
                f"{r['broker_cores']}, {r['fakellm_cores']}",
                r["machine_cores"],
                r["others_cores"],
            )
            for r in rows
        ],
    )
    report.notes += explain(rows, cores)
    plot_bars(
        report,
        "rates",
        [f"--processes {n}" for n in PROCESSES],
        [r.rate for r in runs],
        "requests/s (steady state)",
    )
    return finish(report, started, bootstrap)


def explain(rows: list[dict[str, Any]], cores: int) -> list[str]:
    """What limits the scale-out, from this run's own numbers."""
    busiest = max(rows, key=lambda r: r["machine_cores"] or 0)
    return [
        f"This machine has {cores} cores, shared by the worker processes, the broker, the "
        "fake model and the other tenants. One worker process is one event loop and uses "
        "at most one core; a second can use the other core only as far as nobody else "
        f"does: the whole machine was at {busiest['machine_cores']} of {cores} cores "
        f"with {busiest['processes']} processes, {busiest['others_cores']} of it other "
        "tenants'. A process beyond the core count adds no CPU, only time-sharing, more "
        "group members and fetch sessions and smaller produce batches per process.",
        "Each loop: the share of wall time each worker's event loop ran on a core and the "
        "share it was ready but waited for one (/proc/<pid>/schedstat, mean over the "
        "processes). Efficiency per process is the speedup over N; a flat worker CPU per "
        "request with a growing wait share says the next process is limited by the cores "
        "it can get, not by the pipeline.",
        "With more cores the next limit is the partition count: 6 partitions per stage "
        "topic allow at most 6 busy members per consumer group (a 7th process owns nothing).",
    ]


def main() -> None:
    args = base_args(__doc__.splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)


if __name__ == "__main__":
    main()
