"""Memory: peak RSS of one worker while a large backlog drains.

The runner's back-pressure claim is structural: when all ``max_in_flight`` slots are busy
it stops fetching, so a backlog stays in Kafka, not in memory. If that holds, RSS
depends on the number in flight and the client buffers, not on the backlog: RSS when 90 %
is drained should be about what it was at 10 %. A leak per message (a dict that is never
pruned, spans kept alive, ...) shows up as a slope. 100,000 requests (quick: 20,000).

    python -m bench.memory [--quick]
"""

from __future__ import annotations

import time

from bench.common import FakeLLMProcess, Proc, Report, base_args, finish, plot_lines, table
from bench.runs import measure_pipeline, valid_requests

BOUNDED_RATIO = 1.25  # RSS at 90 % / RSS at 10 %: allows allocator noise, not a leak


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 20_000 if quick else 100_000
    report = Report(
        "memory",
        f"Memory: worker RSS while a {count:,}-request backlog drains",
        {"requests": count, "max_in_flight": 64, "bounded_if_ratio_below": BOUNDED_RATIO},
    )
    planned = valid_requests(count, seed=5)
    procs: list[Proc] = []
    samples: list[tuple[float, float, float]] = []  # (seconds, fraction drained, RSS MiB)
    t0 = time.monotonic()

    def on_start(started_procs: list[Proc]) -> None:
        procs.extend(started_procs)

    def sample(seen: int) -> None:
        if procs:
            samples.append((time.monotonic() - t0, seen / count, procs[0].rss_mib()))

    with FakeLLMProcess() as fake:
        r = measure_pipeline(
            bootstrap,
            planned,
            fake,
            label="memory",
            sampler=sample,
            on_start=on_start,
            timeout_s=3_600,
        )

    def rss_at(fraction: float) -> float:
        return next((rss for _, f, rss in samples if f >= fraction), float("nan"))

    rss10, rss50, rss90 = rss_at(0.1), rss_at(0.5), rss_at(0.9)
    peak = max((rss for _, _, rss in samples), default=float("nan"))
    ratio = rss90 / rss10
    report.results = {
        "rss_mib_at_10pct": round(rss10, 1),
        "rss_mib_at_50pct": round(rss50, 1),
        "rss_mib_at_90pct": round(rss90, 1),
        "peak_rss_mib": round(peak, 1),
        "ratio_90_vs_10": round(ratio, 3),
        "bounded": ratio < BOUNDED_RATIO,
        "rate": round(r.rate, 1),
        "samples": len(samples),
        "run": r.as_dict(),
    }
    report.markdown += table(
        ["RSS @10 %", "RSS @50 %", "RSS @90 %", "peak", "90 % / 10 %", "bounded"],
        [(rss10, rss50, rss90, peak, ratio, "yes" if ratio < BOUNDED_RATIO else "NO")],
    )
    report.markdown += ["", f"(MiB; drained at {r.rate:.0f} requests/s)"]
    plot_lines(
        report,
        "rss",
        {"worker RSS": ([f * 100 for _, f, _ in samples], [rss for _, _, rss in samples])},
        "% of backlog drained",
        "RSS (MiB)",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    args = base_args(__doc__.splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)


if __name__ == "__main__":
    main()
