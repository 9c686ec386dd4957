"""Slow model: does the pipeline keep its calls in flight busy when the model is slow?

The fake model answers in 500 ms ± 20 %. With n calls in flight in total (``llmpipe worker
--processes P``, each process ``LLMPIPE_MAX_IN_FLIGHT = n / P``) the ideal throughput is
n / 0.5 s (Little's law); achieved / ideal says how well the runners keep their slots
full. Every level is measured with one process and with one per core: on 2 cores shared
with the broker and the fake model a second process adds its own fixed costs and
contention, and is worth it only where one event loop is CPU-bound. For large n the ideal
exceeds what the machine's CPU can do at all, so the same run also measures that ceiling:
the instant model at 512 and at 2,048 in flight, the better of the two (with an instant
model every message is ready at once, and at 2,048 the event loop spends long turns on
them between fetches and commits). Each level reports the ratio
against min(ideal, ceiling) too, the workers' CPU per request (steady 10-90 % window)
split into a fixed cost (the CPU an idle worker spends per second, measured before the
backlog, spread over the rate) and the cost per request, the cores the ideal would need
at that CPU per request, and the peak RSS of the supervisor and of each worker process.

Every run starts the supervisor on empty topics and produces the backlog once every group
is stable with all its worker processes, so no rebalance falls inside the measured window.
The backlog is 8 (quick) or 16 times the calls in flight: at 4 times, the first
generation's ramp-up and the drain once the backlog runs out (fewer calls in flight) were
a quarter of the run and inside its 10-90 % window, and pulled achieved / ideal down
(measured at 512 in flight, one process: 0.87-0.93 at 8 times, 0.96 at 30 times).

    python -m bench.slow_model [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    FakeLLMProcess,
    LoopDemand,
    Proc,
    Report,
    finish,
    plot_lines,
    run_main,
    table,
)
from bench.runs import Run, measure_pipeline, valid_requests
from pipeline.runtime.supervisor import available_cores

LATENCY_S = 0.5
JITTER = 0.2
IN_FLIGHT = (32, 128, 512, 2048)
CEILING_IN_FLIGHT = (512, 2048)
IDLE_S = 5.0


class PeakRss:
    """The largest resident memory of the watched command, sampled each time the harness
    checks progress: the whole command (supervisor plus workers), the command's own
    process (the supervisor, when there are several workers) and its largest child."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.total_mib = 0.0
        self.command_mib = 0.0
        self.child_mib = 0.0

    def watch(self, procs: list[Proc]) -> None:
        self.procs.extend(procs)

    def sample(self, _seen: int) -> None:
        for p in self.procs:
            sizes = p.rss_by_process_mib()
            if not sizes:
                continue
            self.total_mib = max(self.total_mib, sum(sizes))
            self.command_mib = max(self.command_mib, sizes[0])
            self.child_mib = max(self.child_mib, max(sizes[1:], default=0.0))


def cpu_split(run: Run, idle_cores: float) -> tuple[float | None, float | None]:
    """(worker CPU ms per request, of which the idle worker's fixed cost per second spread
    over this rate): what is left is the cost that scales with requests."""
    per_request = run.steady_cpu_ms.get("worker0")
    if per_request is None or run.rate <= 0:
        return per_request, None
    return per_request, round(min(per_request, idle_cores / run.rate * 1000), 3)


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    processes = available_cores()
    counts = sorted({1, processes})
    report = Report(
        "slow_model",
        "Slow model (500 ms ± 20 %): achieved vs ideal throughput by calls in flight",
        {
            "requests": "8 x in flight, >= 2,000" if quick else "16 x in flight, >= 4,000",
            "latency_s": LATENCY_S,
            "jitter": JITTER,
            "in_flight": IN_FLIGHT,
            "ceiling_in_flight": CEILING_IN_FLIGHT,
            "processes": counts,
            "delivery": "at_least_once",
        },
    )

    def size(n: int) -> int:
        return max(2_000 if quick else 4_000, (8 if quick else 16) * n)

    def measure(
        fake: FakeLLMProcess, n: int, label: str, processes: int
    ) -> tuple[Run, PeakRss, LoopDemand]:
        rss, demand = PeakRss(), LoopDemand()

        def watch(procs: list[Proc]) -> None:
            rss.watch(procs)
            demand.watch(procs)

        def sample(seen: int) -> None:
            rss.sample(seen)
            demand.sample(seen)

        r = measure_pipeline(
            bootstrap,
            valid_requests(size(n), seed=2),
            fake,
            label=label,
            supervised=processes,
            preload=False,
            extra_env={"LLMPIPE_DELIVERY": "at_least_once"},
            max_in_flight=max(1, n // processes),
            idle_s=IDLE_S,
            on_start=watch,
            sampler=sample,
        )
        return r, rss, demand

    with FakeLLMProcess() as instant:
        ceilings = [
            measure(instant, n, f"instant, {n} in flight", processes)[0] for n in CEILING_IN_FLIGHT
        ]
    ceiling = max(ceilings, key=lambda r: r.rate)
    rows: list[dict[str, Any]] = []
    with FakeLLMProcess(latency=LATENCY_S, jitter=JITTER) as fake:
        for n, count in ((n, count) for n in IN_FLIGHT for count in counts):
            r, rss, demand = measure(fake, n, f"{n} in flight, {count} processes", count)
            running, waiting = demand.shares()
            ideal = n / LATENCY_S
            bound = min(ideal, ceiling.rate)
            idle = float(r.extra.get("idle_cores", 0.0))
            per_request, fixed = cpu_split(r, idle)
            rows.append(
                {
                    "in_flight": n,
                    "processes": count,
                    "per_process": max(1, n // count),
                    "rate": round(r.rate, 1),
                    "ideal": ideal,
                    "ratio_vs_ideal": round(r.rate / ideal, 3),
                    "ratio_vs_min_ideal_ceiling": round(r.rate / bound, 3),
                    "worker_cpu_ms_per_request": per_request,
                    "fixed_cpu_ms_per_request": fixed,
                    "fakellm_cpu_ms_per_request": r.steady_cpu_ms.get("fakellm"),
                    "idle_worker_cores": idle,
                    "cores_for_ideal": (
                        round(ideal * per_request / 1000, 2) if per_request is not None else None
                    ),
                    "worker_cores": r.cores.get("worker0"),
                    "loop_running": running,
                    "loop_waiting_for_cpu": waiting,
                    "others_cores": r.cores.get("others"),
                    "machine_cores": r.cores.get("machine"),
                    "peak_rss_mib": round(rss.total_mib, 1),
                    "peak_rss_supervisor_mib": round(rss.command_mib, 1),
                    "peak_rss_per_worker_mib": round(rss.child_mib, 1),
                    "run": r.as_dict(),
                }
            )
    report.results = {
        "cpu_ceiling": ceiling.as_dict(),
        "cpu_ceilings": [c.as_dict() for c in ceilings],
        "by_in_flight": rows,
        "best_by_in_flight": best_by_in_flight(rows),
    }
    report.markdown += table(
        [
            "in flight (total)",
            "processes",
            "per process",
            "achieved/s",
            "ideal n/0.5s",
            "achieved/ideal",
            "vs min(ideal, CPU ceiling)",
            "worker CPU ms/request (fixed part)",
            "fake model CPU ms/request",
            "cores the ideal needs",
            "worker cores used",
            "each loop: running, waiting for a core",
            "other tenants' cores",
            "peak RSS MiB: all, supervisor, per worker",
        ],
        [
            (
                r["in_flight"],
                r["processes"],
                r["per_process"],
                r["rate"],
                r["ideal"],
                r["ratio_vs_ideal"],
                r["ratio_vs_min_ideal_ceiling"],
                f"{r['worker_cpu_ms_per_request']} ({r['fixed_cpu_ms_per_request']})",
                r["fakellm_cpu_ms_per_request"],
                r["cores_for_ideal"],
                r["worker_cores"],
                f"{r['loop_running']}, {r['loop_waiting_for_cpu']}",
                r["others_cores"],
                f"{r['peak_rss_mib']}, {r['peak_rss_supervisor_mib']}, "
                f"{r['peak_rss_per_worker_mib']}",
            )
            for r in rows
        ],
    )
    ceiling_text = ", ".join(
        f"{c.rate:.0f}/s at {n} in flight ({c.steady_cpu_ms.get('worker0')} ms CPU per request)"
        for n, c in zip(CEILING_IN_FLIGHT, ceilings, strict=True)
    )
    report.markdown += [
        "",
        f"Each level with `--processes` {' and '.join(map(str, counts))} (at-least-once). "
        f"CPU ceiling in the same run (instant model, {processes} processes): "
        f"{ceiling_text}; the better one ({ceiling.rate:.0f}/s) is the ceiling, measured "
        f"with the workers at {ceiling.cores.get('worker0')} cores and the whole machine "
        f"at {ceiling.cores.get('machine')} of {processes}. Best per level: "
        + ", ".join(
            f"{b['in_flight']} in flight {b['ratio_vs_ideal']} ({b['processes']} processes)"
            for b in report.results["best_by_in_flight"]
        )
        + ".",
    ]
    report.notes += explain(rows, ceiling, processes)
    plot_lines(
        report,
        "throughput",
        {
            **{
                f"achieved, {count} processes": (
                    [float(r["in_flight"]) for r in rows if r["processes"] == count],
                    [r["rate"] for r in rows if r["processes"] == count],
                )
                for count in counts
            },
            "ideal n/latency": ([float(n) for n in IN_FLIGHT], [n / LATENCY_S for n in IN_FLIGHT]),
            "CPU ceiling": ([float(n) for n in IN_FLIGHT], [ceiling.rate for _ in IN_FLIGHT]),
        },
        "calls in flight (all processes)",
        "requests/s",
    )
    return finish(report, started, bootstrap)


def best_by_in_flight(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level, the process count that came closest to the ideal (the goal allows any)."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if (
            r["in_flight"] not in best
            or r["ratio_vs_ideal"] > best[r["in_flight"]]["ratio_vs_ideal"]
        ):
            best[r["in_flight"]] = r
    return [
        {k: best[n][k] for k in ("in_flight", "processes", "rate", "ratio_vs_ideal")}
        for n in sorted(best)
    ]


def explain(rows: list[dict[str, Any]], ceiling: Run, cores: int) -> list[str]:
    """What limits each level, from this run's own numbers."""
    notes = [
        "Each loop: the share of wall time each worker's event loop (main thread) ran on a "
        "core and the share it was ready but waited for one (/proc/<pid>/schedstat), "
        "averaged over the workers: together near 1 means the loop is CPU-bound, and the "
        "waiting part is the CPU the broker, the fake model and other processes took.",
        "Worker CPU per request is the steady 10-90 % window of the supervisor and its "
        "workers; in brackets, the part that is the idle workers' fixed cost per second "
        "(polls, commit timers, state listeners) spread over that level's rate: at a low "
        "rate it dominates, at a high rate what is left is the cost per request.",
    ]
    for r in rows:
        if r["ratio_vs_ideal"] >= 0.9:
            continue
        notes.append(
            f"{r['in_flight']} in flight, {r['processes']} processes: the ideal "
            f"{r['ideal']:.0f}/s needs "
            f"{r['cores_for_ideal']} cores of worker CPU at {r['worker_cpu_ms_per_request']} "
            f"ms per request; the machine has {cores}, shared with the broker, the fake "
            f"model ({r['fakellm_cpu_ms_per_request']} ms per request) and other tenants "
            f"({r['others_cores']} cores during this run); the workers got "
            f"{r['worker_cores']} cores (each event loop ran {r['loop_running']} of the time "
            f"and waited for a core {r['loop_waiting_for_cpu']}) and reached "
            f"{r['ratio_vs_ideal']} of the ideal, {r['ratio_vs_min_ideal_ceiling']} of "
            f"min(ideal, CPU ceiling {ceiling.rate:.0f}/s)."
        )
    return notes


def main() -> None:
    run_main(__doc__, run)


if __name__ == "__main__":
    main()
