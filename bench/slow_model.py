"""Slow model: does the pipeline keep ``max_in_flight`` calls busy when the model is slow?

The fake model answers in 500 ms ± 20 %. With ``LLMPIPE_MAX_IN_FLIGHT = n`` the model
stage can have at most n calls outstanding, so the ideal throughput is n / 0.5 s (Little's
law). The ratio achieved / ideal says how well the runner keeps its slots full. For large
n the ideal exceeds what one worker's CPU can do at all, so the same run also measures
that ceiling (the instant model, at the largest in-flight setting, since more
in flight also means bigger Kafka batches and less CPU per message) and reports the
ratio against min(ideal, ceiling) too.

    python -m bench.slow_model [--quick]
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import FakeLLMProcess, Report, base_args, finish, plot_lines, table
from bench.runs import measure_pipeline, valid_requests

LATENCY_S = 0.5
JITTER = 0.2
IN_FLIGHT = (32, 128, 512)


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 1_000 if quick else 2_000
    report = Report(
        "slow_model",
        "Slow model (500 ms ± 20 %): achieved vs ideal throughput by max_in_flight",
        {"requests": count, "latency_s": LATENCY_S, "jitter": JITTER, "in_flight": IN_FLIGHT},
    )
    planned = valid_requests(count, seed=2)
    with FakeLLMProcess() as instant:
        ceiling = measure_pipeline(
            bootstrap,
            planned,
            instant,
            label=f"instant model, in_flight {max(IN_FLIGHT)}",
            max_in_flight=max(IN_FLIGHT),
        )
    rows: list[dict[str, Any]] = []
    with FakeLLMProcess(latency=LATENCY_S, jitter=JITTER) as fake:
        for n in IN_FLIGHT:
            r = measure_pipeline(bootstrap, planned, fake, label=f"in_flight {n}", max_in_flight=n)
            ideal = n / LATENCY_S
            bound = min(ideal, ceiling.rate)
            rows.append(
                {
                    "max_in_flight": n,
                    "rate": round(r.rate, 1),
                    "ideal": ideal,
                    "ratio_vs_ideal": round(r.rate / ideal, 3),
                    "ratio_vs_min_ideal_ceiling": round(r.rate / bound, 3),
                    "worker_cores": r.cores.get("worker0"),
                    "run": r.as_dict(),
                }
            )
    report.results = {"cpu_ceiling": ceiling.as_dict(), "by_in_flight": rows}
    report.markdown += table(
        [
            "max_in_flight",
            "achieved/s",
            "ideal n/0.5s",
            "achieved/ideal",
            "vs min(ideal, CPU)",
            "worker cores",
        ],
        [
            (
                r["max_in_flight"],
                r["rate"],
                r["ideal"],
                r["ratio_vs_ideal"],
                r["ratio_vs_min_ideal_ceiling"],
                r["worker_cores"],
            )
            for r in rows
        ],
    )
    report.markdown += [
        "",
        f"CPU ceiling in the same run (instant model, in_flight {max(IN_FLIGHT)}): "
        f"{ceiling.rate:.0f}/s "
        f"(worker {ceiling.cores.get('worker0')} cores).",
    ]
    plot_lines(
        report,
        "throughput",
        {
            "achieved": ([float(r["max_in_flight"]) for r in rows], [r["rate"] for r in rows]),
            "ideal n/latency": (
                [float(r["max_in_flight"]) for r in rows],
                [float(r["ideal"]) for r in rows],
            ),
            "CPU ceiling": (
                [float(r["max_in_flight"]) for r in rows],
                [ceiling.rate for _ in rows],
            ),
        },
        "LLMPIPE_MAX_IN_FLIGHT",
        "requests/s",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    args = base_args(__doc__.splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)


if __name__ == "__main__":
    main()
