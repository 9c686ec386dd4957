"""The codec's CPU per message, today's against an earlier revision's, in one process.

    python -m bench.codec [--against 900edcc] [--calls 300] [--rounds 15]

The codec module of ``--against`` (default 900edcc, the codec before issue #18's work:
``model_dump`` and fastavro's writer, JSON through ``json.loads``) is loaded from git
beside today's, and both encode and decode what the stages exchange on every request (a
request in, then a validated request, a completion, a result or an escalation; a request
also as JSON, as half the benchmark's upstream traffic is). Both must give the same
bytes and envelopes. The two alternate within every round, so a noisy neighbour slows
both alike; each figure is the median over rounds of the process CPU time per call, and
the ratio old / new is what to read. The load average is printed with the figures: the
machine is shared. The collector is tuned as a worker tunes it (``tune_gc``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipeline.config import REPO_ROOT
from pipeline.contract.codec import JSON, Codec
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


def codec_at(revision: str) -> Any:
    """``pipeline.contract.codec`` as it was at ``revision``, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:pipeline/contract/codec.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"codec_at_{revision}")
    module.__file__ = str(REPO_ROOT / "pipeline" / "contract" / "codec.py")  # its schemas/
    exec(compile(source, f"{revision}:pipeline/contract/codec.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="900edcc", help="git revision of the old codec")
    parser.add_argument("--calls", type=int, default=300, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    tune_gc()
    old, new = codec_at(args.against).Codec(), Codec()
    load_before = os.getloadavg()
    print(f"codec at {args.against} (old) vs this checkout (new), CPU us per call (median)\n")
    print(
        "| envelope | bytes | encode old | encode new | ratio | decode old | decode new | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, envelope in samples().items():
        data, _ = new.encode(envelope)
        assert data == old.encode(envelope)[0], f"{name}: the bytes differ"
        cls = type(envelope)
        assert new.decode(data, cls) == old.decode(data, cls) == envelope, name
        us = per_call_us(
            {
                "encode old": functools.partial(old.encode, envelope),
                "encode new": functools.partial(new.encode, envelope),
                "decode old": functools.partial(old.decode, data, cls),
                "decode new": functools.partial(new.decode, data, cls),
            },
            args.calls,
            args.rounds,
        )
        print(
            f"| {name} | {len(data)} | {us['encode old']:.1f} | {us['encode new']:.1f} "
            f"| {us['encode old'] / us['encode new']:.2f} | {us['decode old']:.1f} "
            f"| {us['decode new']:.1f} | {us['decode old'] / us['decode new']:.2f} |"
        )
        if isinstance(envelope, Request):
            text = json.dumps(envelope.model_dump(mode="json")).encode()
            us = per_call_us(
                {
                    "old": functools.partial(old.decode_fields, text, Request, JSON),
                    "new": functools.partial(new.decode_fields, text, Request, JSON),
                },
                args.calls,
                args.rounds,
            )
            print(
                f"| Request as JSON (decode_fields) | {len(text)} | | | | {us['old']:.1f} "
                f"| {us['new']:.1f} | {us['old'] / us['new']:.2f} |"
            )
    load_after = os.getloadavg()
    print(
        f"\nload average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
        f"{load_after[2]:.2f}, on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
