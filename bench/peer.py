"""The peer: what a team would write instead of llmpipe, measured beside it in one run.

A confluent-kafka consumer loop on ``llm.requests``: each batch (up to ``--in-flight``
messages) is parsed and validated with pydantic, sent to the model through the official
``openai`` SDK (``AsyncOpenAI``, JSON-schema structured output), each answer validated
with a pydantic model of the ticket-triage output, the results produced to
``llm.results``, and the input offsets committed once the producer has confirmed every
result (at-least-once). One hop, no tracing, no metrics, no retries beyond the SDK's,
no fallback, no review, no dead letters: an honest "first version" of the same job.

``python -m bench.peer`` runs the comparison: the same requests (as JSON, the peer's only
format) against the same instant fake model, the peer and ``llmpipe worker`` (all stages,
both delivery modes) interleaved, and reports llmpipe / peer for CPU per request and for
throughput. ``python -m bench.peer --serve --bootstrap B --prefix P --url U`` is the peer
process itself (stops on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, Field

from bench.common import (
    PYTHON,
    CpuMeter,
    FakeLLMProcess,
    Proc,
    Report,
    base_args,
    broker_process,
    finish,
    fresh_topics,
    plot_bars,
    pythonpath,
    read_all,
    table,
)
from bench.runs import Run, measure_pipeline, median_run, send_backlog, time_outputs, valid_requests
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Request
from pipeline.harness.scenarios import PlannedRequest
from pipeline.transport.clients import KafkaClients

MODEL = "gpt-4o-mini"
SYSTEM = (
    "You triage support tickets for Acme Cloud. Choose one label (billing, bug, account, "
    "feature_request, other), one priority (low, normal, high, urgent) and write a neutral "
    "summary of at most 200 characters."
)


class TicketVariables(BaseModel):
    subject: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)
    customer_tier: Literal["free", "pro", "enterprise"] = "free"


class TicketRequest(BaseModel):
    request_id: str = Field(min_length=1)
    prompt: str
    variables: TicketVariables


class Triage(BaseModel):
    label: Literal["billing", "bug", "account", "feature_request", "other"]
    priority: Literal["low", "normal", "high", "urgent"]
    summary: str = Field(min_length=1, max_length=200)


class TicketResult(BaseModel):
    request_id: str
    output: Triage | None
    error: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


RESPONSE_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "triage", "schema": Triage.model_json_schema(), "strict": False},
}


async def serve(bootstrap: str, prefix: str, url: str, in_flight: int, stop: asyncio.Event) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="peer", max_retries=2, timeout=30.0)
    # Built by the project's one Kafka edge (the same librdkafka settings a team would
    # pick: idempotent producer, acks=all, manual commits of the consumed positions).
    clients = KafkaClients(Settings(bootstrap_servers=bootstrap))
    consumer = clients.consumer(f"{prefix}peer", **{"enable.auto.offset.store": True})
    producer = clients.producer()
    consumer.subscribe([prefix + topology.REQUESTS])
    loop = asyncio.get_running_loop()

    async def handle(value: bytes) -> tuple[str, bytes]:
        request = TicketRequest.model_validate_json(value)
        v = request.variables
        user = f"Customer tier: {v.customer_tier}\nSubject: {v.subject}\n\n{v.body}"
        try:
            answer = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                temperature=0,
                max_tokens=200,
                response_format=RESPONSE_FORMAT,
            )
            usage = answer.usage
            result = TicketResult(
                request_id=request.request_id,
                output=Triage.model_validate_json(answer.choices[0].message.content or ""),
                model=answer.model,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
        except Exception as exc:  # the team's version: record the failure as the result
            result = TicketResult(request_id=request.request_id, output=None, error=repr(exc))
        return request.request_id, result.model_dump_json().encode()

    try:
        while not stop.is_set():
            batch = await loop.run_in_executor(None, consumer.consume, in_flight, 0.1)
            values = [m.value() or b"" for m in batch if m.error() is None]
            if not values:
                continue
            for request_id, value in await asyncio.gather(*(handle(v) for v in values)):
                producer.produce(prefix + topology.RESULTS, value=value, key=request_id.encode())
            await loop.run_in_executor(None, producer.flush, 30)  # every result delivered
            await loop.run_in_executor(None, lambda: consumer.commit(asynchronous=False))
    finally:
        consumer.close()
        await client.close()


def as_json(planned: Sequence[PlannedRequest]) -> list[PlannedRequest]:
    """The same requests as JSON, the one format the peer reads (half arrive as Avro)."""
    codec = Codec()
    out: list[PlannedRequest] = []
    for p in planned:
        content_type = dict(p.headers).get("content-type", b"").decode()
        value = p.value
        if "json" not in content_type:
            value = codec.decode(p.value, Request, content_type).model_dump_json().encode()
        out.append(replace(p, value=value, headers=[("content-type", b"application/json")]))
    return out


def measure_peer(
    bootstrap: str, planned: Sequence[PlannedRequest], fake: FakeLLMProcess, in_flight: int
) -> Run:
    """The peer draining a backlog of ``planned`` (produced before it starts)."""
    with fresh_topics(bootstrap) as settings:
        send_backlog(settings, planned)
        argv = [PYTHON, "-m", "bench.peer", "--serve", "--bootstrap", bootstrap]
        argv += ["--prefix", settings.topic_prefix, "--url", fake.url]
        argv += ["--in-flight", str(in_flight)]
        t0 = time.time()
        peer = Proc("peer", argv, {**os.environ, "PYTHONPATH": pythonpath()})
        named = {"peer": peer, **({"fakellm": fake.proc} if fake.proc else {})}
        try:
            meter = CpuMeter({**named, "broker": broker_process(bootstrap)})
            meter.start()
            run = time_outputs(settings, len(planned), named, "peer", 600.0, t0, meter)
        finally:
            peer.stop()
        results = read_all(settings, [topology.RESULTS], len(planned))
        failed = [r for r in results if json.loads(r.value or b"{}").get("output") is None]
        if failed:  # a peer whose answers failed would measure a cheaper, wrong path
            raise RuntimeError(f"{len(failed)} peer results carry no output: {failed[0].value!r}")
        return run


MODES = ("at_least_once", "exactly_once")


def run(quick: bool, bootstrap: str) -> Report:
    started = time.monotonic()
    count = 3_000 if quick else 10_000
    repeats = 1 if quick else 2
    in_flight = 64
    report = Report(
        "peer",
        "llmpipe vs the peer a team would write (instant model)",
        {"requests": count, "repeats": repeats, "in_flight": in_flight, "peer_hops": 1},
    )
    planned = valid_requests(count, seed=9)
    peer_planned = as_json(planned)
    runs: dict[str, list[Run]] = {"peer": [], **{m: [] for m in MODES}}
    with FakeLLMProcess() as fake:
        for _ in range(repeats):  # interleaved: drifting background load hits all alike
            runs["peer"].append(measure_peer(bootstrap, peer_planned, fake, in_flight))
            for mode in MODES:
                runs[mode].append(
                    measure_pipeline(
                        bootstrap,
                        planned,
                        fake,
                        label=f"llmpipe ({mode})",
                        extra_env={"LLMPIPE_DELIVERY": mode},
                        max_in_flight=in_flight,
                    )
                )
    chosen = {k: median_run(v) for k, v in runs.items()}
    peer = chosen["peer"]
    peer_cpu = peer.steady_cpu_ms.get("peer", float("nan"))
    rows: list[dict[str, Any]] = []
    for name, r in chosen.items():
        process = "peer" if name == "peer" else "worker0"
        cpu = r.steady_cpu_ms.get(process, float("nan"))
        rows.append(
            {
                "variant": r.label,
                "rate": round(r.rate, 1),
                "cpu_ms_per_request": cpu,
                "rate_vs_peer": round(r.rate / peer.rate, 3),
                "cpu_vs_peer": round(cpu / peer_cpu, 2),
                "cores": r.cores,
            }
        )
    report.results = {"runs": {k: v.as_dict() for k, v in chosen.items()}, "rows": rows}
    report.markdown += table(
        ["variant", "steady req/s", "CPU ms per request", "req/s vs peer", "CPU vs peer"],
        [
            (r["variant"], r["rate"], r["cpu_ms_per_request"], r["rate_vs_peer"], r["cpu_vs_peer"])
            for r in rows
        ],
    )
    alo = next(r for r in rows if r["variant"].endswith("(at_least_once)"))
    report.notes += [
        f"llmpipe / peer, at-least-once: {alo['cpu_vs_peer']}x the CPU per request, "
        f"{alo['rate_vs_peer']}x the throughput. The peer makes one hop and one model call "
        "with no tracing, metrics, content rules, prompt registry, confidence, fallback, "
        "review, dead letters or retry budget; llmpipe makes three hops (validate, model, "
        "settle) with all of them on, and exactly-once adds a transaction per hop and commit.",
        "CPU per request is the steady 10-90 % window of each process (start-up excluded).",
    ]
    plot_bars(
        report,
        "cpu",
        [r["variant"] for r in rows],
        [r["cpu_ms_per_request"] for r in rows],
        "CPU ms per request (steady state)",
    )
    return finish(report, started, bootstrap)


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the peer process itself")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    if not args.serve:
        run(args.quick, args.bootstrap)
        return

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.bootstrap, args.prefix, args.url, args.in_flight, stop)

    asyncio.run(main_loop())


if __name__ == "__main__":
    main()
