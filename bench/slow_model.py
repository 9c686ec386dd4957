"""Slow model: does the pipeline keep its calls in flight busy when the model is slow?

The fake model answers in 500 ms ± 20 %. With n calls in flight in total (``llmpipe worker
--processes P``, each process ``LLMPIPE_MAX_IN_FLIGHT = n / P``) the ideal throughput is
n / 0.5 s (Little's law); achieved / ideal says how well the runners keep their slots
full. For large n the ideal exceeds what the machine's CPU can do at all, so the same run
also measures that ceiling (the instant model, at the largest setting, since more in
flight also means bigger Kafka batches and less CPU per message) and reports the ratio
against min(ideal, ceiling) too. Peak RSS of the whole command (supervisor and workers)
is sampled while each run drains.

    python -m bench.slow_model [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import FakeLLMProcess, Proc, Report, base_args, finish, plot_lines, table
from bench.runs import measure_pipeline, valid_requests
from pipeline.runtime.supervisor import available_cores

LATENCY_S = 0.5
JITTER = 0.2
IN_FLIGHT = (32, 128, 512, 2048)


class PeakRss:
    """The largest resident memory of the watched commands (supervisor plus workers),
    sampled each time the harness checks progress."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.peak_mib = 0.0

    def watch(self, procs: list[Proc]) -> None:
        self.procs.extend(procs)

    def sample(self, _seen: int) -> None:
        for p in self.procs:
            self.peak_mib = max(self.peak_mib, p.rss_mib())


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    processes = available_cores()
    report = Report(
        "slow_model",
        "Slow model (500 ms ± 20 %): achieved vs ideal throughput by calls in flight",
        {
            "requests": "4 x in flight, at least 1,000" if quick else "8 x in flight, >= 2,000",
            "latency_s": LATENCY_S,
            "jitter": JITTER,
            "in_flight": IN_FLIGHT,
            "processes": processes,
            "delivery": "at_least_once",
        },
    )

    def size(n: int) -> int:
        return max(1_000 if quick else 2_000, (4 if quick else 8) * n)

    env = {"LLMPIPE_DELIVERY": "at_least_once"}
    top = max(IN_FLIGHT)
    with FakeLLMProcess() as instant:
        ceiling = measure_pipeline(
            bootstrap,
            valid_requests(size(top), seed=2),
            instant,
            label=f"instant model, {top} in flight",
            supervised=processes,
            preload=True,
            extra_env=env,
            max_in_flight=top // processes,
        )
    rows: list[dict[str, Any]] = []
    with FakeLLMProcess(latency=LATENCY_S, jitter=JITTER) as fake:
        for n in IN_FLIGHT:
            rss = PeakRss()
            r = measure_pipeline(
                bootstrap,
                valid_requests(size(n), seed=2),
                fake,
                label=f"{n} in flight",
                supervised=processes,
                preload=True,
                extra_env=env,
                max_in_flight=max(1, n // processes),
                on_start=rss.watch,
                sampler=rss.sample,
            )
            ideal = n / LATENCY_S
            bound = min(ideal, ceiling.rate)
            rows.append(
                {
                    "in_flight": n,
                    "per_process": max(1, n // processes),
                    "rate": round(r.rate, 1),
                    "ideal": ideal,
                    "ratio_vs_ideal": round(r.rate / ideal, 3),
                    "ratio_vs_min_ideal_ceiling": round(r.rate / bound, 3),
                    "worker_cores": r.cores.get("worker0"),
                    "peak_rss_mib": round(rss.peak_mib, 1),
                    "run": r.as_dict(),
                }
            )
    report.results = {"cpu_ceiling": ceiling.as_dict(), "by_in_flight": rows}
    report.markdown += table(
        [
            "in flight (total)",
            "per process",
            "achieved/s",
            "ideal n/0.5s",
            "achieved/ideal",
            "vs min(ideal, CPU)",
            "worker cores",
            "peak RSS MiB (all processes)",
        ],
        [
            (
                r["in_flight"],
                r["per_process"],
                r["rate"],
                r["ideal"],
                r["ratio_vs_ideal"],
                r["ratio_vs_min_ideal_ceiling"],
                r["worker_cores"],
                r["peak_rss_mib"],
            )
            for r in rows
        ],
    )
    report.markdown += [
        "",
        f"{processes} worker processes (`--processes {processes}`, at-least-once). CPU "
        f"ceiling in the same run (instant model, {top} in flight): {ceiling.rate:.0f}/s "
        f"(workers {ceiling.cores.get('worker0')} cores, whole machine "
        f"{ceiling.cores.get('machine')}).",
    ]
    plot_lines(
        report,
        "throughput",
        {
            "achieved": ([float(r["in_flight"]) for r in rows], [r["rate"] for r in rows]),
            "ideal n/latency": (
                [float(r["in_flight"]) for r in rows],
                [float(r["ideal"]) for r in rows],
            ),
            "CPU ceiling": (
                [float(r["in_flight"]) for r in rows],
                [ceiling.rate for _ in rows],
            ),
        },
        "calls in flight (all processes)",
        "requests/s",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    args = base_args(__doc__.splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)


if __name__ == "__main__":
    main()
