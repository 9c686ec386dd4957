"""Confidence that means something, measured on a real model: SmolLM2-135M via llama.cpp.

The shipped ticket dataset goes through the real stages twice in one run: ticket_triage@3
as declared (agreement with the keyword rule, the label's own logprob, summary support,
keyword fallback below the threshold) and the same version with its confidence components
switched off (the baseline: whole-answer logprob only). The baseline replays the first
run's answers (temperature 0: the same request has the same answer), so the runs differ
only in confidence and routing.

Asserted: the pipeline's numbers (error among what it delivered, the share it left to
people), never what the model answered. The model is expected to be wrong often; the
point is that llmpipe no longer delivers those wrong answers as confident results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.evaluation.evaluate import evaluate, load_dataset, markdown, report
from pipeline.evaluation.harness import live_client
from pipeline.llm.local_server import LocalModelServer
from pipeline.prompts.registry import PromptRegistry

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "prompts" / "ticket_triage" / "dataset.jsonl"
REPORT_DIR = ROOT / ".llmpipe" / "real-model"


@pytest.mark.timeout(900)
async def test_components_keep_a_real_models_confident_errors_out_of_delivered_results(
    local_model: LocalModelServer,
) -> None:
    registry = PromptRegistry.load(ROOT / "prompts")
    shipped = registry.get("ticket_triage", 3)
    # The prompt's 15 s timeout is for a hosted model; a CPU-bound local model on a busy CI
    # machine can need longer, and a timed-out call is retried while the server still works
    # on it. This test is about confidence, not latency: same version, a patient timeout.
    model = shipped.model.model_copy(update={"timeout_s": 120.0})
    pv = shipped.model_copy(update={"model": model})
    cases = load_dataset(DATASET)
    settings = Settings(
        model_base_url=local_model.url,
        model_structured_output=local_model.structured_output,
        model_timeout_s=120.0,
    )
    client = live_client(settings)
    try:
        evaluation = await evaluate(registry, [pv], cases, client, settings.model_timeout_s)
    finally:
        await client.aclose()
    data = report(evaluation, target=0.1)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "ticket_triage_eval.json").write_text(json.dumps(data, indent=2))
    (REPORT_DIR / "ticket_triage_eval.md").write_text(markdown(data))
    print(markdown(data))

    declared, baseline = data["versions"]
    assert (declared["variant"], baseline["variant"]) == ("declared", "components off")
    on, off = declared["declared"], baseline["declared"]
    assert on["cases"] == off["cases"] == len(cases)
    # Every request reached a terminal route, and the replayed routing is the pipeline's.
    assert declared["mismatches"] == [] and baseline["mismatches"] == []
    # The baseline paid (almost) nothing new: its calls were replays of the first run's
    # answers; only a request that failed there (a timeout on a busy machine) is sent again.
    assert evaluation.replayed >= 0.9 * len(cases), (evaluation.calls, evaluation.replayed)
    assert on["delivered_error"] <= 0.20, markdown(data)
    assert on["review_share"] <= 0.30, markdown(data)
    assert on["delivered_error"] <= off["delivered_error"], markdown(data)
