"""What tracing costs: messages/s of one worker draining the same backlog, telemetry off vs on.

    python -m bench.tracing [--count 2000] [--repeats 3]

Method, and why:

* The worker runs as its own OS process (``llmpipe worker``), configured only by the
  ``OTEL_*`` variables an operator would set, because OpenTelemetry's providers are
  per process: a fresh process per mode is the only honest "off".
* The fake model runs in another process and answers instantly, so what is measured is
  the pipeline (and its telemetry), not a model.
* The backlog (``--count`` valid requests) is produced *before* the worker starts, and
  the rate is read from the broker's timestamps on ``llm.results`` over the middle 80 %
  of the results: group joins, warm-up and the tail are excluded the same way for
  every mode.
* Modes alternate within each repeat (off, default, otlp, ..., off, ...) and the median
  is reported, because the machine is shared and noisy; the ratio to ``off`` from the
  same run is what to read, not the absolute rate.
* Wall-clock rate suffers from whatever else runs on the machine; the worker's own CPU
  time per message over the same window (from ``/proc/<pid>/stat``) is the steadier
  measure of what telemetry costs, so both are reported.

Modes: ``off`` (``OTEL_SDK_DISABLED=true``: no-op tracer and meter, results carry no trace
id); ``default`` (what a worker does with no configuration: spans are created so results
carry trace ids, nothing is exported); ``otlp`` (spans and metrics exported over
OTLP/HTTP to a local receiver); ``otlp+content`` (plus redacted prompts and completions);
``otlp 10%`` (``parentbased_traceidratio`` sampling at 0.1: the usual mitigation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from bench.common import free_port
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.harness.scenarios import mixed_requests
from pipeline.observability.testing import running_otlp_receiver
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.clients import KafkaClients
from pipeline.transport.topics import apply, load_specs


def modes(otlp_endpoint: str) -> dict[str, dict[str, str]]:
    exported = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
    }
    return {
        "off": {"OTEL_SDK_DISABLED": "true"},
        "default": {},
        "otlp": exported,
        "otlp+content": {**exported, "LLMPIPE_TRACE_CONTENT": "true"},
        "otlp 10%": {
            **exported,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far (Linux); None where /proc is unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steady_rate(timestamps_ms: list[int]) -> float:
    """Messages per second between the 10th and 90th percentile of the output timestamps."""
    ordered = sorted(timestamps_ms)
    low, high = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
    return (len(ordered) * 8 / 10) / max((high - low) / 1000, 1e-3)


@contextmanager
def fake_model() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.harness.fakellm", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the fake model did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


def result_timestamps(
    settings: Settings, count: int, timeout_s: float, pid: int
) -> tuple[list[int], float | None]:
    """Broker timestamps of ``count`` results, and the worker's CPU seconds per message
    between the 10th and the 90th percentile result (read as they arrive)."""
    consumer = KafkaClients(settings).consumer(None)
    topic = settings.topic(topology.RESULTS)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        stamps: list[int] = []
        marks: dict[int, tuple[int, float | None]] = {}
        deadline = time.monotonic() + timeout_s
        while len(stamps) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(stamps)} of {count} results")
            for message in consumer.consume(num_messages=100, timeout=0.05):
                if message.error() is None:
                    stamps.append(int(message.timestamp()[1]))
            for tenth in (1, 9):
                if tenth not in marks and len(stamps) >= count * tenth // 10:
                    marks[tenth] = (len(stamps), cpu_seconds(pid))
        (first, start), (last, end) = marks[1], marks[9]
        per_message = (end - start) / (last - first) if start and end and last > first else None
        return stamps, per_message
    finally:
        consumer.close()


def run_once(
    bootstrap: str, model_url: str, env: Mapping[str, str], count: int
) -> tuple[float, float | None]:
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=f"ovh{uuid.uuid4().hex[:8]}.",
        model_base_url=model_url,
    )
    admin = KafkaClients(settings).admin()
    specs = load_specs(settings.topics_dir)
    apply(admin, specs, settings.topic_prefix)
    try:
        planned = mixed_requests(count, seed=1, weights={"valid": 1}, prefix="ovh")
        produce_batch(
            settings,
            topology.REQUESTS,
            [(p.key, p.value, p.headers) for p in planned],
            timeout_s=BULK_TIMEOUT_S,
        )
        worker_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "LLMPIPE_BOOTSTRAP_SERVERS": bootstrap,
            "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
            "LLMPIPE_MODEL_BASE_URL": model_url,
            "PYTHONPATH": str(REPO_ROOT),
            "LLMPIPE_WORKER_PROCESSES": "1",
            **env,
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env=worker_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            stamps, cpu = result_timestamps(settings, count, 300, worker.pid)
            return steady_rate(stamps), cpu
        finally:
            worker.terminate()
            worker.wait(30)
    finally:
        names = [settings.topic(s.name) for s in specs]
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.result()


def measure(bootstrap: str, count: int, repeats: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with running_otlp_receiver() as receiver, fake_model() as model_url:
        table = modes(receiver.endpoint)
        for repeat in range(repeats):
            for name, env in table.items():
                rate, per_message = run_once(bootstrap, model_url, env, count)
                rates.setdefault(name, []).append(rate)
                if per_message is not None:
                    cpu.setdefault(name, []).append(per_message * 1000)
                shown = f"{per_message * 1000:6.3f}" if per_message is not None else "  n/a"
                print(
                    f"repeat {repeat + 1} {name:13} {rate:8.1f} msg/s  {shown} cpu ms/msg",
                    flush=True,
                )
        exported_spans = len(receiver.spans())
    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "count": count,
        "repeats": repeats,
        "rates": rates,
        "median_msgs_per_s": medians,
        "ratio_to_off": {name: medians[name] / medians["off"] for name in medians},
        "cpu_ms_per_message": cpu,
        "median_cpu_ms_per_message": cpu_medians,
        "cpu_ratio_to_off": {name: cpu_medians[name] / cpu_medians["off"] for name in cpu_medians}
        if "off" in cpu_medians
        else {},
        "spans_received_over_otlp": exported_spans,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default=Settings().bootstrap_servers)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report = measure(args.bootstrap, args.count, args.repeats)
    cpu = cast("dict[str, float]", report["median_cpu_ms_per_message"])
    cpu_ratio = cast("dict[str, float]", report["cpu_ratio_to_off"])
    for name, ratio in cast("dict[str, float]", report["ratio_to_off"]).items():
        rate = report["median_msgs_per_s"][name]
        line = f"{name:13} median {rate:8.1f} msg/s ({ratio:5.3f} x off)"
        if name in cpu:
            line += f"  {cpu[name]:6.3f} cpu ms/msg ({cpu_ratio.get(name, 0):5.3f} x off)"
        print(line)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
