"""Wire bytes of every envelope type are pinned: the codec may get faster, never different.

The bytes in ``golden/envelopes.json`` were written by the codec as of commit 900edcc
(fastavro's schemaless writer over ``model_dump``), before the compiled writer replaced it
on the hot path. Regenerating them is a wire-format change: consumers on other versions
would read different bytes. The values cover the encodings' edge cases: multi-byte
lengths and counts, negative and past-32-bit ints, UTF-8, empty and absent unions, enums,
JSON-marked fields, timestamps before the epoch and in other zones.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.contract.codec import AVRO, Codec
from pipeline.contract.envelopes import (
    ENVELOPES,
    BurnInClaim,
    Completion,
    ControlEvent,
    Correction,
    Escalation,
    FleetEvent,
    ModelCall,
    PromptRef,
    Request,
    Result,
    ReviewDecision,
    Usage,
    ValidatedRequest,
    ValidationReport,
)

AT = datetime(2026, 12, 1, 12, 30, 5, 123000, tzinfo=UTC)
BEFORE_EPOCH = datetime(1969, 7, 20, 20, 17, 40, 500000, tzinfo=UTC)
OFFSET = datetime(2030, 1, 2, 3, 4, 5, 6000, tzinfo=timezone(timedelta(hours=-5)))
PROMPT = PromptRef(name="ticket_triage", version=3, hash="ab12cd34", arm="canary")
REQUEST = Request(
    request_id="r-ü-1",
    prompt="ticket_triage",
    prompt_version=3,
    variables={"text": "Ünïcödé " * 12, "n": [1, -2, 2.5, 1e16, None, True], "deep": {"k": {}}},
    metadata={"tenant": "acme", "": "empty key"},
    deadline=OFFSET,
)
VALIDATED = ValidatedRequest(request=REQUEST, prompt=PROMPT, flags=["pii", "long"], received_at=AT)
CALLS = [
    ModelCall(
        purpose="answer", model="gpt-4o-mini", attempt=1, outcome="timeout", latency_ms=30000.25
    ),
    ModelCall(purpose="answer", model="fallback", attempt=0, outcome="skipped:open"),
]
USAGE = Usage(prompt_tokens=2**31 + 7, completion_tokens=64, cached_prompt_tokens=63, cost_usd=-0.0)
GOLDEN = {
    "Request": Request(request_id="r", prompt="p"),
    "ValidatedRequest": VALIDATED,
    "Completion": Completion(
        validated=VALIDATED,
        model="gpt-4o-mini",
        raw_text='{"a": "' + "x" * 200 + '"}',
        finish_reason="stop",
        usage=USAGE,
        token_logprobs=[-0.5, -1e-7, 0.0],
        tokens=["{", '"a"'],
        latency_ms=12.5,
        attempts=2,
        completed_at=BEFORE_EPOCH,
        calls=CALLS,
    ),
    "Result": Result(
        request_id="r-1",
        status="needs_clarification",
        output={"answer": "yes", "score": 0.1},
        confidence=1.0,
        source="human",
        prompt=PROMPT,
        model=None,
        usage=Usage(),
        latency_ms=0.0,
        attempts=-3,
        validation=ValidationReport(
            checks=["schema"],
            warnings=["w"] * 70,
            errors=[],
            confidence_components={"schema": 0.75},
        ),
        metadata={"k" * 100: "v"},
        trace_id="0af7651916cd43dd8448eb211c80319c",
        reason="r",
        reviewer="ana",
        produced_at=AT,
        calls=CALLS,
    ),
    "Escalation": Escalation(
        validated=VALIDATED,
        reason="low_confidence",
        detail="0.4 < 0.7",
        risk_rules=["r1"],
        output={},
        raw_text=None,
        model="m",
        confidence=0.4,
        escalated_at=AT,
    ),
    "ReviewDecision": ReviewDecision(
        decision_id="d",
        request_id="r",
        action="edit",
        reviewer="ana",
        output={"x": [1]},
        reason=None,
        prompt=PROMPT,
        decided_at=AT,
    ),
    "Correction": Correction(
        request_id="r",
        prompt=PROMPT,
        variables={},
        original_output=None,
        corrected_output={"x": 2},
        reviewer="ana",
        decided_at=AT,
    ),
    "ControlEvent": ControlEvent(key="pin", value=[1, "two", None], actor="ops", at=AT),
    "FleetEvent": FleetEvent(key="breaker", worker="w-1", value=None, at=AT),
    "BurnInClaim": BurnInClaim(prompt=PROMPT, request_id="r", claimed_at=AT),
}


GOLDEN_FILE = Path(__file__).parent / "golden" / "envelopes.json"
WIRE: dict[str, str] = json.loads(GOLDEN_FILE.read_text())
CODEC = Codec()


def test_every_envelope_type_is_pinned() -> None:
    assert set(GOLDEN) == set(WIRE) == set(ENVELOPES) - {"Usage", "PromptRef", "ValidationReport"}


@pytest.mark.parametrize("name", sorted(WIRE))
def test_encoding_gives_the_pinned_bytes(name: str) -> None:
    data, content_type = CODEC.encode(GOLDEN[name])
    assert content_type == AVRO
    assert data.hex() == WIRE[name]


@pytest.mark.parametrize("name", sorted(WIRE))
def test_the_pinned_bytes_decode_to_the_envelope(name: str) -> None:
    envelope = GOLDEN[name]
    assert CODEC.decode(bytes.fromhex(WIRE[name]), type(envelope)) == envelope
