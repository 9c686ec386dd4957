"""Added latency: what the pipeline adds on top of the model, at half of its maximum load.

First the maximum is measured in this run (one worker, instant model, backlog drained).
Then requests are produced open-loop at half that rate (an upstream does not wait for
answers), and for each request:

- end-to-end = result's Kafka timestamp - request's Kafka timestamp (both CreateTime,
  set by the producer of each message, same clock);
- model time = ``Completion.latency_ms`` (the HTTP call as the worker timed it);
- added = end-to-end - model time: queueing, three Kafka hops (fetch, linger, acks),
  validation, rendering, parsing, checks, Avro.

Per-hop times come from the intermediate topics' timestamps (same key on every hop).
Run with ``--model-latency 0.2`` to see that the added part does not depend on the model.

    python -m bench.latency [--quick] [--model-latency S]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    FakeLLMProcess,
    Record,
    Report,
    base_args,
    finish,
    fresh_topics,
    percentile,
    plot_lines,
    read_all,
    stage_groups,
    table,
    wait_groups_stable,
    workers,
)
from bench.runs import measure_pipeline, valid_requests
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Completion
from pipeline.harness.scenarios import PlannedRequest
from pipeline.transport.clients import KafkaClients

WARMUP_S = 3.0


def paced_produce(settings: Settings, planned: Sequence[PlannedRequest], rate: float) -> None:
    """Open loop: one request every 1/rate seconds, whatever the pipeline is doing.

    The short sleeps here pace the load generator; they synchronise nothing.
    """
    producer = KafkaClients(settings).producer(**{"linger.ms": 1})
    topic = settings.topic(topology.REQUESTS)
    interval = 1.0 / rate
    next_at = time.monotonic()
    for p in planned:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, value=p.value, key=p.key, headers=list(p.headers))
        producer.poll(0)
        next_at += interval
    if producer.flush(60):
        raise RuntimeError("paced producer: messages not acknowledged")


def _by_key(records: Sequence[Record]) -> dict[bytes, int]:
    return {r.key: r.timestamp_ms for r in records if r.key is not None}


# at-least-once first: its figures are the report's headline (the p99 goal).
MODES = ("at_least_once", "exactly_once")


def run(
    quick: bool, bootstrap: str, model_latency: float = 0.0, modes: tuple[str, ...] = MODES
) -> Report:
    """One measurement per delivery mode; the first mode's figures are the report's."""
    started = time.monotonic()
    duration_s = 20.0 if quick else 60.0
    report = Report(
        "latency",
        "Added latency at half of the measured maximum load",
        {
            "duration_s": duration_s,
            "model_latency_s": model_latency,
            "warmup_s": WARMUP_S,
            "delivery_modes": list(modes),
        },
    )
    by_mode = {m: measure(quick, bootstrap, model_latency, duration_s, m) for m in modes}
    curves: dict[str, list[float]] = {m: sorted(r.pop("_added")) for m, r in by_mode.items()}
    report.results = {**by_mode[modes[0]], "by_delivery_mode": by_mode}
    for mode, res in by_mode.items():
        report.markdown += [
            f"**{mode}** (commit interval {Settings().commit_interval_ms} ms): maximum "
            f"measured in this run: {res['max_rate']:.0f} req/s; offered "
            f"open-loop: {res['offered_rate']:.0f} req/s for {duration_s:.0f} s "
            f"({res['measured']} requests after a {WARMUP_S:.0f} s warm-up).",
            "",
        ]
        report.markdown += table(
            ["ms", "p50", "p95", "p99"],
            [
                (name, *res[key].values())
                for name, key in (
                    ("end to end", "end_to_end_ms"),
                    ("model call", "model_ms"),
                    ("**added by the pipeline**", "added_ms"),
                    ("hop 1: requests -> validated", "hop_validate_ms"),
                    ("hop 2: validated -> completions, minus the call", "hop_model_minus_call_ms"),
                    ("hop 3: completions -> results", "hop_settle_ms"),
                )
            ],
        )
        report.markdown.append("")
    report.notes.append(
        "timestamps are those of the output records, set when they are produced: exactly "
        "once at the hop's next transaction (every LLMPIPE_COMMIT_INTERVAL_MS), at least "
        "once as soon as the stage has decided"
    )
    plot_lines(
        report,
        "cdf",
        {m: (xs, [i / len(xs) for i in range(len(xs))]) for m, xs in curves.items()},
        "added latency (ms)",
        "fraction of requests",
    )
    return finish(report, started, bootstrap)


def measure(
    quick: bool, bootstrap: str, model_latency: float, duration_s: float, mode: str
) -> dict[str, Any]:
    env = {"LLMPIPE_DELIVERY": mode}
    with FakeLLMProcess() as instant:
        peak = measure_pipeline(
            bootstrap,
            valid_requests(3_000 if quick else 6_000, seed=6),
            instant,
            label="max",
            extra_env=env,
        )
    rate = peak.rate / 2
    count = int(rate * duration_s)
    planned = valid_requests(count, seed=7)
    codec = Codec()
    with (
        FakeLLMProcess(latency=model_latency) as fake,
        fresh_topics(bootstrap, model_base_url=fake.url) as settings,
        workers(settings, 1, env),
    ):
        wait_groups_stable(settings, stage_groups(settings), 1, 90)
        paced_produce(settings, planned, rate)
        results = read_all(settings, [topology.RESULTS], count, timeout_s=300)
        requests = _by_key(read_all(settings, [topology.REQUESTS], count))
        validated = _by_key(read_all(settings, [topology.VALIDATED], count))
        completion_records = read_all(settings, [topology.COMPLETIONS], count)
    completions = {r.key: r for r in completion_records}
    first_ts = min(requests.values())
    e2e: list[float] = []
    model: list[float] = []
    added: list[float] = []
    hop1: list[float] = []
    hop2: list[float] = []
    hop3: list[float] = []
    for r in results:
        key = r.key
        if key is None or key not in requests or key not in completions:
            continue
        if requests[key] - first_ts < WARMUP_S * 1000:
            continue
        comp = completions[key]
        content_type = comp.headers.get("content-type", b"").decode()
        c = codec.decode(comp.value or b"", Completion, content_type)
        total = float(r.timestamp_ms - requests[key])
        e2e.append(total)
        model.append(c.latency_ms)
        added.append(total - c.latency_ms)
        hop1.append(float(validated[key] - requests[key]))
        hop2.append(float(comp.timestamp_ms - validated[key]) - c.latency_ms)
        hop3.append(float(r.timestamp_ms - comp.timestamp_ms))

    def pcts(values: list[float]) -> dict[str, float]:
        return {f"p{q}": round(percentile(values, q), 1) for q in (50, 95, 99)}

    return {
        "max_rate": round(peak.rate, 1),
        "offered_rate": round(rate, 1),
        "requests": count,
        "measured": len(e2e),
        "end_to_end_ms": pcts(e2e),
        "model_ms": pcts(model),
        "added_ms": pcts(added),
        "hop_validate_ms": pcts(hop1),
        "hop_model_minus_call_ms": pcts(hop2),
        "hop_settle_ms": pcts(hop3),
        "_added": added,
    }


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--model-latency", type=float, default=0.0)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both", help="delivery mode(s)")
    args = parser.parse_args()
    modes = MODES if args.mode == "both" else (args.mode,)
    run(args.quick, args.bootstrap, args.model_latency, modes)


if __name__ == "__main__":
    main()
