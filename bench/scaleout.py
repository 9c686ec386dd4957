"""Scale-out: 1, 2 and 3 worker processes sharing a 6-partition request topic.

Workers are started on empty topics, the backlog is produced once every stage's consumer
group is stable with all members, and the steady-state rate is read from the result
timestamps. CPU per process is recorded because on this 2-core machine the answer to
"why does the third worker not help" is arithmetic: each worker is a single-threaded
event loop that saturates about one core, and the broker and the fake model need CPU too.

    python -m bench.scaleout [--quick]
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import FakeLLMProcess, Report, base_args, finish, plot_bars, table
from bench.runs import Run, measure_pipeline, valid_requests

PROCESSES = (1, 2, 3)


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 6_000 if quick else 15_000
    report = Report(
        "scaleout",
        "Scale-out: 1 vs 2 vs 3 worker processes, 6 partitions, instant model",
        {"requests": count, "partitions": 6, "cpu_count": os.cpu_count()},
    )
    planned = valid_requests(count, seed=3)
    runs: list[Run] = []
    with FakeLLMProcess() as fake:
        for n in PROCESSES:
            runs.append(
                measure_pipeline(
                    bootstrap,
                    planned,
                    fake,
                    label=f"{n} worker(s)",
                    processes=n,
                    preload=False,
                )
            )
    base = runs[0].rate
    rows: list[dict[str, Any]] = []
    for n, r in zip(PROCESSES, runs, strict=True):
        worker_cores = sum(v for k, v in r.cores.items() if k.startswith("worker"))
        rows.append(
            {
                "processes": n,
                "rate": round(r.rate, 1),
                "speedup": round(r.rate / base, 2),
                "worker_cores_total": round(worker_cores, 2),
                "our_cores_total": round(
                    sum(v for k, v in r.cores.items() if k not in ("machine", "others")), 2
                ),
                "machine_cores": r.cores.get("machine"),
                "others_cores": r.cores.get("others"),
                "cores": r.cores,
                "run": r.as_dict(),
            }
        )
    report.results = {"by_processes": rows}
    report.markdown += table(
        [
            "workers",
            "steady req/s",
            "speedup vs 1",
            "worker cores (sum)",
            "our processes",
            "whole machine (of 2)",
            "cores by process",
        ],
        [
            (
                r["processes"],
                r["rate"],
                r["speedup"],
                r["worker_cores_total"],
                r["our_cores_total"],
                r["machine_cores"],
                ", ".join(f"{k} {v:g}" for k, v in r["cores"].items()),
            )
            for r in rows
        ],
    )
    report.notes += [
        "Why it stops scaling here: each worker is one asyncio event loop, so it can use at "
        "most one core (alone it reaches ~1.0). Two workers can use both cores, minus what "
        "the broker, the fake model and other tenants take, so the gain is well under 2x "
        "once the whole machine is near 2.0 cores busy. A third worker adds no CPU, only "
        "contention: three loops time-sharing two cores, more group members and fetch "
        "sessions, smaller produce batches per worker.",
        "With more cores the limit is the partition count: 6 partitions per stage topic "
        "allow at most 6 busy members per consumer group; a 7th worker would own nothing.",
    ]
    plot_bars(
        report,
        "rates",
        [f"{n} worker(s)" for n in PROCESSES],
        [r.rate for r in runs],
        "requests/s (steady state)",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    args = base_args(__doc__.splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)


if __name__ == "__main__":
    main()
