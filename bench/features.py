"""Cost of features: the overhead run with tracing and redaction switched on and off.

Switches are the ones operators have (see ``pipeline/observability/setup.py`` and
``pipeline/config.py``): ``OTEL_SDK_DISABLED=true`` (no-op tracer and meter, no trace ids),
the default (SDK on, ``OTEL_TRACES_EXPORTER`` unset: spans carry trace context and ids
but are not recorded, since nothing would receive them; with no metric reader no metric
is measured either),
``OTEL_TRACES_EXPORTER=console`` / ``OTEL_METRICS_EXPORTER=console`` with stdout sent to
/dev/null (the cost of serialising every span), and ``LLMPIPE_PII_POLICY=allow`` (no
personal-data scan of the variables) against the default ``flag``. Variants are run
interleaved, so slow drifts of the shared machine's load hit them all alike.

    python -m bench.features [--quick]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import FakeLLMProcess, Report, finish, plot_bars, run_main, table
from bench.runs import Run, measure_pipeline, median_run, valid_requests

DEFAULT = "default (SDK on, no exporter, PII flag)"
TRACING_OFF = "tracing off (OTEL_SDK_DISABLED)"
TELEMETRY_PAIR = (DEFAULT, TRACING_OFF)
"""The pair the telemetry goal is read from: it gets more repeats than the other variants.
One quick run of 3,000 requests (two seconds of steady state) put the cost at -25 % to
+16 % on the same code (2026-12-02/03): a single short run is the machine's noise."""


VARIANTS: dict[str, dict[str, str]] = {
    DEFAULT: {},
    TRACING_OFF: {"OTEL_SDK_DISABLED": "true"},
    "traces exported (console to /dev/null)": {"OTEL_TRACES_EXPORTER": "console"},
    "traces + metrics exported (console)": {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    },
    "redaction off (PII allow)": {"LLMPIPE_PII_POLICY": "allow"},
}


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 6_000
    pair_repeats, repeats = (3, 1) if quick else (5, 3)
    report = Report(
        "features",
        "Cost of features: tracing and redaction on/off (one worker, instant model)",
        {"requests": count, "repeats": repeats, "telemetry_pair_repeats": pair_repeats},
    )
    planned = valid_requests(count, seed=4)
    runs: dict[str, list[Run]] = {k: [] for k in VARIANTS}
    with FakeLLMProcess() as fake:
        for repeat in range(pair_repeats):
            for label, env in VARIANTS.items():
                if repeat >= repeats and label not in TELEMETRY_PAIR:
                    continue
                runs[label].append(
                    measure_pipeline(
                        bootstrap, planned, fake, label=label, extra_env=env, discard_stdout=True
                    )
                )
    chosen = {k: median_run(v) for k, v in runs.items()}
    base = chosen[DEFAULT]
    rows: list[dict[str, Any]] = []
    for label, r in chosen.items():
        cpu_ms = r.steady_cpu_ms.get("worker0", float("nan"))
        rows.append(
            {
                "variant": label,
                "rate": round(r.rate, 1),
                "ratio_vs_default": round(r.rate / base.rate, 3),
                "worker_cpu_ms_per_request": round(cpu_ms, 2),
                "repeats": r.extra.get("repeats"),
            }
        )
    off = next(r for r in rows if r["variant"].startswith("tracing off"))
    default = rows[0]
    pairs = list(zip(runs[DEFAULT], runs[TRACING_OFF], strict=True))
    telemetry = {
        "throughput_cost": round(1 - default["rate"] / off["rate"], 3),
        "cpu_cost": round(
            default["worker_cpu_ms_per_request"] / off["worker_cpu_ms_per_request"] - 1, 3
        ),
        # Each repeat runs default and off back to back, under the same background load:
        # the median of those paired ratios is the figure least moved by the load.
        "paired_throughput_cost": round(
            1 - statistics.median([d.rate / o.rate for d, o in pairs]), 3
        ),
        "paired_cpu_cost": round(statistics.median([_cpu(d) / _cpu(o) for d, o in pairs]) - 1, 3),
    }
    exported = {
        r["variant"]: round(
            r["worker_cpu_ms_per_request"] / default["worker_cpu_ms_per_request"] - 1, 3
        )
        for r in rows
        if "exported" in r["variant"]
    }
    report.results = {"variants": rows, "telemetry_cost": telemetry, "export_cpu_cost": exported}
    report.markdown += table(
        ["variant", "steady req/s", "vs default", "worker CPU ms / request", "repeats"],
        [
            (
                r["variant"],
                r["rate"],
                r["ratio_vs_default"],
                r["worker_cpu_ms_per_request"],
                r["repeats"],
            )
            for r in rows
        ],
    )
    report.notes += [
        f"Telemetry cost (default vs OTEL_SDK_DISABLED): {telemetry['throughput_cost']:.1%} "
        f"of throughput, {telemetry['cpu_cost']:.1%} more CPU per request (median runs); "
        f"median of the {len(pairs)} back-to-back pairs: "
        f"{telemetry['paired_throughput_cost']:.1%} of throughput, "
        f"{telemetry['paired_cpu_cost']:.1%} more CPU per request. Exporting on top "
        "of the default (CPU per request): "
        + ", ".join(f"{k} +{v:.0%}" for k, v in exported.items())
        + ".",
        "CPU ms per request (steady 10-90 % window) is the steadier figure on a shared "
        "machine: the rate also moves with whatever else is running, the worker's own CPU "
        "time much less.",
    ]
    plot_bars(
        report, "rates", [r["variant"] for r in rows], [r["rate"] for r in rows], "requests/s"
    )
    return finish(report, started, bootstrap)


def _cpu(run: Run) -> float:
    return run.steady_cpu_ms.get("worker0", float("nan"))


def main() -> None:
    run_main(__doc__, run)


if __name__ == "__main__":
    main()
