"""``llmpipe demo``: the whole pipeline on this machine, with every route exercised.

It starts what is not already running (broker, topics under a fresh prefix, the fake model
server, a worker process), publishes a seeded mix of good requests, bad inputs and model
failures, follows them to their terminal topics, and prints where each kind ended up next
to where it should have. It stops what it started.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Request, Result
from pipeline.harness.environment import stop_process, worker_environment
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import Ledger, read_terminal
from pipeline.harness.scenarios import (
    PROMPT,
    SCENARIO_OVERRIDES,
    TICKETS,
    PlannedRequest,
    mixed_requests,
    plan_request,
)
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.clients import KafkaClients
from pipeline.transport.topics import apply, load_specs

KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
DEMO_MODEL_TIMEOUT_S = 2.0


def _broker_running() -> bool:
    status = subprocess.run(["bash", str(KAFKA_SCRIPT), "status"], capture_output=True, check=False)
    return status.returncode == 0


def run_demo(
    settings: Settings, count: int, keep: bool, console: Console, local_model: bool = False
) -> int:
    """``local_model``: SmolLM2 through llama.cpp's server instead of the fake (see
    :func:`run_local_demo`)."""
    if local_model:
        return run_local_demo(settings, count, keep, console)
    with ExitStack() as stack:
        settings = _broker_and_topics(settings, stack, keep, console)
        fake = stack.enter_context(running_fake_llm())
        console.print(f"[bold]fake model[/bold] listening on {fake.url}")
        settings = settings.model_copy(
            update={
                "model_base_url": fake.url,
                "model_timeout_s": DEMO_MODEL_TIMEOUT_S,
                **SCENARIO_OVERRIDES,
            }
        )
        worker = _start_worker(settings, stack, keep)
        console.print(
            f"[bold]worker[/bold] pid {worker.pid} (stages validate, model, settle, fallback)"
        )
        planned = mixed_requests(count, seed=int(time.time()) % 10_000, prefix="demo")
        produce_batch(
            settings,
            topology.REQUESTS,
            [(p.key, p.value, p.headers) for p in planned],
            timeout_s=BULK_TIMEOUT_S,
        )
        console.print(
            f"[bold]published[/bold] {len(planned)} requests to {settings.topic(topology.REQUESTS)}"
        )
        ledger = _follow(settings, [p.request_id for p in planned], console)
        calls = fake.counters()["total_calls"]
    expected = {p.request_id: (p.fault, p.expected, p.expected_reason) for p in planned}
    _report(ledger, expected, calls, console)
    return 0 if not ledger.missing and not ledger.duplicates else 1


def _broker_and_topics(
    settings: Settings, stack: ExitStack, keep: bool, console: Console
) -> Settings:
    """Start the broker if it is not running, create the topics under a fresh prefix."""
    if not _broker_running():
        console.print("[bold]starting Kafka[/bold] (infra/kafka/kafka.sh up)")
        subprocess.run(["bash", str(KAFKA_SCRIPT), "up"], check=True)
        if not keep:
            stack.callback(subprocess.run, ["bash", str(KAFKA_SCRIPT), "down"], check=False)
    prefix = settings.topic_prefix or f"demo-{time.strftime('%Y%m%d-%H%M%S')}."
    settings = settings.model_copy(update={"topic_prefix": prefix})
    admin = KafkaClients(settings).admin()
    apply(admin, load_specs(settings.topics_dir), prefix)
    console.print(f"[bold]topics[/bold] created under prefix [cyan]{prefix}[/cyan]")
    return settings


LOCAL_MODEL_TIMEOUT_S = 90.0
# A real model decides these; the pipeline only guarantees the answer is checked.
MODEL_ROUTES = frozenset({"result:model", "result:fallback", "review"})
LOCAL_INPUT_FAULTS = ("garbage_bytes", "unknown_prompt", "invalid_variables")


def run_local_demo(settings: Settings, count: int, keep: bool, console: Console) -> int:
    """The demo against a real model: SmolLM2-135M via llama.cpp's server, started here.

    Support tickets without any fake-server directive, plus a few bad inputs, go
    through one worker that calls the model one request at a time (llama.cpp serves one
    at a time; queueing in Kafka beats timing out in its queue). Structured output uses
    llama.cpp's form. Each ticket's route is the model's doing, so the table shows where
    they went; what the run checks is that every request ends somewhere exactly once.
    """
    from pipeline.llm.local_server import STRUCTURED_OUTPUT_MODE, running_local_model

    with ExitStack() as stack:
        settings = _broker_and_topics(settings, stack, keep, console)
        console.print("[bold]local model[/bold] starting llama.cpp's server on SmolLM2-135M")
        server = stack.enter_context(running_local_model())
        console.print(f"[bold]local model[/bold] listening on {server.url}")
        overrides: dict[str, object] = {
            "model_base_url": server.url,
            "model_timeout_s": LOCAL_MODEL_TIMEOUT_S,
            "model_structured_output": STRUCTURED_OUTPUT_MODE,
            "max_in_flight": 1,
            **SCENARIO_OVERRIDES,
        }
        settings = settings.model_copy(update=overrides)
        worker = _start_worker(settings, stack, keep, overrides)
        console.print(
            f"[bold]worker[/bold] pid {worker.pid} (structured output {STRUCTURED_OUTPUT_MODE})"
        )
        planned = local_requests(count, seed=int(time.time()) % 10_000)
        produce_batch(
            settings,
            topology.REQUESTS,
            [(p.key, p.value, p.headers) for p in planned],
            timeout_s=BULK_TIMEOUT_S,
        )
        console.print(f"[bold]published[/bold] {len(planned)} requests (about 2 s each)")
        ledger = _follow(settings, [p.request_id for p in planned], console, timeout_s=900)
    rows: Counter[tuple[str, str, str, str]] = Counter()
    for p in planned:
        if p.request_id not in ledger.seen:
            rows[(p.fault, "MISSING", "-", "no")] += 1
            continue
        seen = ledger.first(p.request_id)
        ok = (
            seen.outcome in MODEL_ROUTES
            if p.fault == "ticket"
            else ((seen.outcome, seen.reason) == (p.expected, p.expected_reason))
        )
        rows[(p.fault, seen.outcome, seen.reason or "-", "yes" if ok else "no")] += 1
    table = Table(title="Where every request ended up (real model)")
    for column in ("input", "route", "reason", "as allowed", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for (fault, route, reason, verdict), n in sorted(rows.items()):
        table.add_row(fault, route, reason, verdict, str(n))
    console.print(table)
    results = [s[0].result for s in ledger.seen.values() if s[0].result is not None]
    costs = [r.usage.cost_usd for r in results if r.usage.cost_usd is not None]
    latencies = sorted(r.latency_ms for r in results if r.source == "model")
    summary = ledger.summary()
    console.print(
        f"requests {summary['requests']}  found {summary['found']}  missing {summary['missing']}  "
        f"duplicates {summary['duplicates']}  model answers {len(latencies)}"
        + (f"  median model latency {latencies[len(latencies) // 2]:.0f} ms" if latencies else "")
        + (f"  cost ${sum(costs):.6f}" if costs else "  cost unknown (no price for this model)")
    )
    for result in results:
        if result.source == "model":
            console.print("[bold]sample model result[/bold] (llm.results): untrusted, but checked")
            console.print_json(_result_json(result))
            break
    disallowed = any(verdict == "no" for (_, _, _, verdict) in rows)
    return 0 if not ledger.missing and not ledger.duplicates and not disallowed else 1


def local_requests(count: int, seed: int) -> list[PlannedRequest]:
    """``count`` plain tickets (no fake directives) and one of each bad input."""
    rng = random.Random(seed)
    codec = Codec()
    planned = [
        plan_request(f"local-{seed}-{i:04d}", fault, rng, codec)
        for i, fault in enumerate(LOCAL_INPUT_FAULTS)
    ]
    for i in range(count):
        subject, body, _ = rng.choice(TICKETS)
        request = Request(
            request_id=f"local-{seed}-t{i:04d}",
            prompt=PROMPT,
            variables={
                "subject": subject,
                "body": body,
                "customer_tier": rng.choice(["free", "pro"]),
            },
            metadata={"scenario": "ticket"},
        )
        value, content_type = codec.encode(request)
        planned.append(
            PlannedRequest(
                request.request_id,
                request.request_id.encode(),
                value,
                [("content-type", content_type.encode())],
                "ticket",
            )
        )
    return planned


def _start_worker(
    settings: Settings,
    stack: ExitStack,
    keep: bool,
    overrides: Mapping[str, object] = SCENARIO_OVERRIDES,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **worker_environment(settings.model_copy(update=dict(overrides))),
        # The demo's worker runs the way an operator's does: as many processes as the
        # settings ask for (0: one per core), not the tests' one.
        "LLMPIPE_WORKER_PROCESSES": str(settings.worker_processes),
    }
    log = open(REPO_ROOT / "demo-worker.log", "wb")  # noqa: SIM115 - closed by the stack
    stack.callback(log.close)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=log, stderr=log
    )

    if not keep:
        stack.callback(stop_process, process)
    return process


def _follow(settings: Settings, ids: list[str], console: Console, timeout_s: float = 180) -> Ledger:
    with Progress(
        TextColumn("[bold]waiting for terminal topics"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("requests", total=len(ids))

        def update(ledger: Ledger) -> None:
            progress.update(task, completed=len(ledger.expected) - len(ledger.missing))

        return read_terminal(settings, ids, timeout_s=timeout_s, settle_s=1, progress=update)


def _report(
    ledger: Ledger, expected: dict[str, tuple[str, str, str | None]], calls: int, console: Console
) -> None:
    rows: Counter[tuple[str, str, str, str]] = Counter()
    mismatches = 0
    for rid, (fault, route, reason) in expected.items():
        if rid not in ledger.seen:
            rows[(fault, f"{route}", reason or "-", "MISSING")] += 1
            mismatches += 1
            continue
        seen = ledger.first(rid)
        matches = (seen.outcome, seen.reason) == (route, reason)
        mismatches += not matches
        verdict = "yes" if matches else f"no (want {route})"
        rows[(fault, seen.outcome, seen.reason or "-", verdict)] += 1
    table = Table(title="Where every request ended up")
    for column in ("input / fault", "route", "reason", "as expected", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for (fault, route, reason, ok), n in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        table.add_row(fault, route, reason, ok, str(n))
    console.print(table)
    summary = ledger.summary()
    console.print(
        f"requests {summary['requests']}  found {summary['found']}  missing {summary['missing']}  "
        f"duplicates {summary['duplicates']}  unexpected routes {mismatches}  model calls {calls}"
    )
    for sightings in ledger.seen.values():
        result = sightings[0].result
        if result is not None and result.source == "model":
            console.print("[bold]sample result[/bold] (llm.results)")
            console.print_json(_result_json(result))
            break
    for sightings in ledger.seen.values():
        if sightings[0].route == "dead_letter":
            headers = {k: v.decode("utf-8", "replace") for k, v in sightings[0].headers.items()}
            console.print(
                "[bold]sample dead letter[/bold] (llm.dlq headers; the value is the original bytes)"
            )
            console.print_json(json.dumps(headers))
            break


def _result_json(result: Result) -> str:
    encoded, _ = Codec(output_format="json").encode(result)
    return encoded.decode()
