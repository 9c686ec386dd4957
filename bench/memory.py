"""Memory: peak RSS of one worker while a large backlog drains.

The runner's back-pressure claim is structural: when all ``max_in_flight`` slots are busy
it stops fetching, so a backlog stays in Kafka, not in memory. If that holds, RSS
depends on the number in flight and the client buffers, not on the backlog: RSS when 90 %
is drained should be about what it was at 10 %. A leak per message (a dict that is never
pruned, spans kept alive, ...) shows up as a slope. 100,000 requests (quick: 20,000).

The second backlog is of large requests (1,000 of ~900 KB, just under the default
``LLMPIPE_MAX_REQUEST_BYTES``; quick: 300): what the Kafka clients read ahead must be
bounded in bytes (``LLMPIPE_KAFKA_PREFETCH_KBYTES``), not in messages, or a backlog of
large requests fills the worker with prefetched copies. Its RSS should stay within a few
prefetch bounds of the small backlog's.

    python -m bench.memory [--quick]
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from bench.common import FakeLLMProcess, Proc, Report, finish, plot_lines, run_main, table
from bench.runs import Run, measure_pipeline, valid_requests
from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Request
from pipeline.harness.scenarios import PlannedRequest

BOUNDED_RATIO = 1.25  # RSS at 90 % / RSS at 10 %: allows allocator noise, not a leak
LARGE_PADDING_BYTES = 900_000  # under max_request_bytes (1,000,000), envelope included


def large_requests(count: int, seed: int = 6) -> list[PlannedRequest]:
    """Valid requests padded (in ``metadata``, which every hop carries but no prompt
    renders) to ~900 KB, as JSON."""
    codec = Codec()
    padding = "x" * LARGE_PADDING_BYTES
    out: list[PlannedRequest] = []
    for p in valid_requests(count, seed=seed):
        content_type = dict(p.headers).get("content-type", b"").decode()
        request = codec.decode(p.value, Request, content_type)
        fields = request.model_dump(mode="json", exclude_none=True)
        fields["metadata"] = {**fields.get("metadata", {}), "padding": padding}
        value = json.dumps(fields).encode()
        out.append(replace(p, value=value, headers=[("content-type", b"application/json")]))
    return out


def drain(
    bootstrap: str, planned: list[PlannedRequest], label: str
) -> tuple[Run, list[tuple[float, float, float]]]:
    """One worker draining ``planned`` (produced before it starts); RSS samples as
    (seconds, fraction drained, MiB)."""
    procs: list[Proc] = []
    samples: list[tuple[float, float, float]] = []
    t0 = time.monotonic()

    def on_start(started_procs: list[Proc]) -> None:
        procs.extend(started_procs)

    def sample(seen: int) -> None:
        if procs:
            samples.append((time.monotonic() - t0, seen / len(planned), procs[0].rss_mib()))

    with FakeLLMProcess() as fake:
        r = measure_pipeline(
            bootstrap,
            planned,
            fake,
            label=label,
            sampler=sample,
            on_start=on_start,
            timeout_s=3_600,
        )
    return r, samples


def summary(r: Run, samples: list[tuple[float, float, float]]) -> dict[str, float | bool]:
    def rss_at(fraction: float) -> float:
        return next((rss for _, f, rss in samples if f >= fraction), float("nan"))

    rss10, rss50, rss90 = rss_at(0.1), rss_at(0.5), rss_at(0.9)
    ratio = rss90 / rss10
    return {
        "rss_mib_at_10pct": round(rss10, 1),
        "rss_mib_at_50pct": round(rss50, 1),
        "rss_mib_at_90pct": round(rss90, 1),
        "peak_rss_mib": round(max((rss for _, _, rss in samples), default=float("nan")), 1),
        "ratio_90_vs_10": round(ratio, 3),
        "bounded": ratio < BOUNDED_RATIO,
        "rate": round(r.rate, 1),
        "samples": len(samples),
    }


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 20_000 if quick else 100_000
    large = 300 if quick else 1_000
    defaults = Settings()
    report = Report(
        "memory",
        f"Memory: worker RSS while a {count:,}-request backlog drains",
        {
            "requests": count,
            "large_requests": large,
            "large_request_bytes": LARGE_PADDING_BYTES,
            "max_in_flight": defaults.max_in_flight,
            "kafka_prefetch_kbytes": defaults.kafka_prefetch_kbytes,
            "kafka_producer_buffer_kbytes": defaults.kafka_producer_buffer_kbytes,
            "bounded_if_ratio_below": BOUNDED_RATIO,
        },
    )
    small_run, small = drain(bootstrap, valid_requests(count, seed=5), "memory")
    large_run, big = drain(bootstrap, large_requests(large), "memory-large")
    report.results = {
        **summary(small_run, small),
        "run": small_run.as_dict(),
        "large": {**summary(large_run, big), "run": large_run.as_dict()},
    }
    rows = []
    for name, r in (
        (f"{count:,} small", report.results),
        (f"{large:,} x ~900 KB", report.results["large"]),
    ):
        rows.append(
            (
                name,
                r["rss_mib_at_10pct"],
                r["rss_mib_at_50pct"],
                r["rss_mib_at_90pct"],
                r["peak_rss_mib"],
                r["ratio_90_vs_10"],
                "yes" if r["bounded"] else "NO",
                r["rate"],
            )
        )
    report.markdown += table(
        [
            "backlog",
            "RSS @10 %",
            "RSS @50 %",
            "RSS @90 %",
            "peak",
            "90 % / 10 %",
            "bounded",
            "req/s",
        ],
        rows,
    )
    report.markdown += [
        "",
        f"(MiB; one worker, max_in_flight {defaults.max_in_flight}, prefetch bound "
        f"{defaults.kafka_prefetch_kbytes:,} KiB per stage consumer, producer buffer "
        f"{defaults.kafka_producer_buffer_kbytes:,} KiB)",
    ]
    plot_lines(
        report,
        "rss",
        {
            "small requests": ([f * 100 for _, f, _ in small], [rss for _, _, rss in small]),
            "~900 KB requests": ([f * 100 for _, f, _ in big], [rss for _, _, rss in big]),
        },
        "% of backlog drained",
        "RSS (MiB)",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    run_main(__doc__, run)


if __name__ == "__main__":
    main()
