"""The codec's CPU per message, hot path vs reference, per envelope type, in one process.

    python -m bench.codec [--calls 500] [--rounds 21]

What the stages exchange on every request (a request in, then a validated request, a
completion, a result or an escalation) is encoded and decoded with the codec's hot path
and with its reference (``Codec.record`` written by fastavro's schemaless writer: the
encoder before the compiled writer, and what the Confluent path still uses). The variants
alternate within every round, so a noisy neighbour slows both alike; each figure is the
median over rounds of the process CPU time per call, and the ratio reference / hot path
is what to read. The load average is printed with the figures: the machine is shared.
The collector is tuned as a worker tunes it (``tune_gc``), so its cost is a worker's.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import fastavro

from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import (
    Completion,
    Envelope,
    Escalation,
    ModelCall,
    PromptRef,
    Request,
    Result,
    Usage,
    ValidatedRequest,
    ValidationReport,
)
from pipeline.runtime.worker import tune_gc

NOW = datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=UTC)


def samples() -> dict[str, Envelope]:
    """Envelopes shaped like the benchmark's "valid" traffic (bench.runs.valid_requests)."""
    request = Request(
        request_id="bench-000123",
        prompt="ticket_triage",
        variables={
            "text": "My invoice for November is wrong, I was charged twice for the same order.",
            "customer": {"id": 42, "tier": "gold"},
        },
        metadata={"tenant": "acme", "source": "bench"},
    )
    prompt = PromptRef(name="ticket_triage", version=3, hash="ab12cd34ef56")
    validated = ValidatedRequest(request=request, prompt=prompt, received_at=NOW)
    calls = [ModelCall(purpose="answer", model="gpt-4o-mini", attempt=1, outcome="ok")]
    usage = Usage(prompt_tokens=120, completion_tokens=30, cost_usd=0.00012)
    output = {"category": "billing", "priority": "high", "summary": "double charge"}
    completion = Completion(
        validated=validated,
        model="gpt-4o-mini",
        raw_text='{"category": "billing", "priority": "high", "summary": "double charge"}',
        finish_reason="stop",
        usage=usage,
        latency_ms=12.5,
        attempts=1,
        completed_at=NOW,
        calls=calls,
    )
    result = Result(
        request_id=request.request_id,
        status="ok",
        output=output,
        confidence=0.92,
        source="model",
        prompt=prompt,
        model="gpt-4o-mini",
        usage=usage,
        latency_ms=14.0,
        attempts=1,
        validation=ValidationReport(
            checks=["schema", "pii", "length"], confidence_components={"schema": 1.0}
        ),
        metadata=request.metadata,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        produced_at=NOW,
        calls=calls,
    )
    escalation = Escalation(
        validated=validated,
        reason="low_confidence",
        detail="0.40 < 0.70",
        output=output,
        raw_text=completion.raw_text,
        model="gpt-4o-mini",
        confidence=0.4,
        usage=usage,
        attempts=1,
        escalated_at=NOW,
        calls=calls,
    )
    return {type(e).__name__: e for e in (request, validated, completion, result, escalation)}


def per_call_us(
    variants: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    """Median CPU microseconds per call of each variant, the variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def reference_encoder(codec: Codec, envelope: Envelope) -> Callable[[], bytes]:
    name = codec.schema_name(type(envelope))
    schema = fastavro.parse_schema(codec.registry_schema(name))

    def encode() -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, codec.record(envelope))
        return buffer.getvalue()

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    tune_gc()
    codec = Codec()
    load_before = os.getloadavg()
    print("| envelope | bytes | encode reference us | encode hot us | ratio |")
    print("|---|---|---|---|---|")
    for name, envelope in samples().items():
        reference = reference_encoder(codec, envelope)
        data, _ = codec.encode(envelope)
        assert data == reference(), f"{name}: the hot path's bytes differ from the reference"
        us = per_call_us(
            {"reference": reference, "hot": functools.partial(codec.encode, envelope)},
            args.calls,
            args.rounds,
        )
        ratio = us["reference"] / us["hot"]
        print(f"| {name} | {len(data)} | {us['reference']:.1f} | {us['hot']:.1f} | {ratio:.2f} |")
    load_after = os.getloadavg()
    print(
        f"\nload average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
        f"{load_after[2]:.2f}, on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
