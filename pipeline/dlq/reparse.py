"""``dlq reparse``: re-run stored model answers through today's parsing and scoring rules.

The model stage writes every raw answer to ``llm.stage.completions`` *before* parsing it,
precisely so that a parser fix, a relaxed check or a corrected prompt rule can be applied to
answers that were already paid for. This module finds the requests whose outcome came from
parsing or scoring (fallback results and review items with reason ``invalid_output``,
``refusal`` or ``low_confidence``; dead letters of the settle stage), looks up their stored
completion, and settles it again with ``Settler(client=None)``: no re-ask, no model call,
ever. A request whose new outcome equals the old one produces nothing.

The new message supersedes the old one for consumers that keep the latest message per
request id (``llm.results`` is keyed by request id); it carries ``x-reparse-source`` naming
the message it replaces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from pipeline.config import Settings
from pipeline.contract.decisions import DeadLetter, Decision, Emit
from pipeline.contract.envelopes import Completion, Escalation, Result
from pipeline.contract.topology import COMPLETIONS, DLQ, FALLBACK, RESULTS, REVIEW
from pipeline.control.burn_in import start_burn_in_ledger
from pipeline.control.state import ControlState
from pipeline.dlq.engine import Outgoing, PlanItem, marker_value
from pipeline.dlq.model import DeadLetterView, Facts, Filter, ReasonedView, decode_value
from pipeline.observability.propagation import configure_tracing, extract, inject, tracer
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.fallback import FallbackWorker
from pipeline.stages.settle import Settler
from pipeline.transport import headers as h
from pipeline.transport.reader import (
    SourceRecord,
    read_ranges,
    reader_consumer,
    snapshot_ranges,
)
from pipeline.transport.registry import codec_for

REPARSE_SOURCE = h.REPARSE_SOURCE
REPARSE_REASONS = frozenset({"invalid_output", "refusal", "low_confidence"})
SOURCES = {"dlq": DLQ, "results": RESULTS, "review": REVIEW}
KIND = "reparse"


@dataclass
class Candidate:
    """A request to re-settle and what happened to it the first time."""

    request_id: str
    old_outcome: str  # result:fallback | review | dead_letter
    old_reason: str | None
    completion: Completion | None = None
    key: bytes | None = None
    headers: dict[str, bytes] | None = None


def outcome_of(decision: Decision) -> tuple[str, str | None]:
    if isinstance(decision, DeadLetter):
        return "dead_letter", decision.reason
    if decision.topic == RESULTS and isinstance(decision.envelope, Result):
        return f"result:{decision.envelope.source}", decision.reason
    return decision.route, decision.reason


class ReparseSelector:
    """Selects parse/score outcomes and settles their stored completions again, offline."""

    kind = KIND
    marker_header = REPARSE_SOURCE

    def __init__(
        self,
        settings: Settings,
        selection: Filter,
        *,
        group: str,
        registry: PromptRegistry,
        control: ControlState,
        sources: Iterable[str] = tuple(SOURCES),
        reasons: frozenset[str] = REPARSE_REASONS,
    ) -> None:
        self._settings = settings
        self._filter = selection
        self._group = group
        self._registry = registry
        self._control = control
        self._sources = sorted(set(sources))
        self._reasons = reasons
        self._codec = codec_for(settings)
        self._topics = {settings.topic(SOURCES[s]): SOURCES[s] for s in self._sources}

    @property
    def source_topics(self) -> list[str]:
        return sorted(self._topics)

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "filter": list(self._filter.spelled),
            "sources": self._sources,
            "reasons": sorted(self._reasons),
        }

    # -- selection --------------------------------------------------------------------

    def consider(self, record: SourceRecord) -> PlanItem | None:
        logical = self._topics.get(record.topic)
        facts: Facts
        if logical == DLQ:
            view = DeadLetterView(record)
            if view.stage != "settle":
                return None
            facts = view.facts()
            envelope = view.decoded.envelope
            candidate = Candidate(
                request_id=record.request_id or "",
                old_outcome="dead_letter",
                old_reason=view.reason,
                completion=envelope if isinstance(envelope, Completion) else None,
                key=record.key,
                headers=record.headers_map,
            )
        elif logical in (RESULTS, REVIEW):
            kind = "result" if logical == RESULTS else "review"
            reasoned = ReasonedView(record, kind)
            facts = reasoned.facts()
            envelope = reasoned.decoded.envelope
            if isinstance(envelope, Result):
                if envelope.source != "fallback":
                    return None
                old = "result:fallback"
            elif isinstance(envelope, Escalation):
                old = "review"
            else:
                return None
            if (facts.reason or "") not in self._reasons:
                return None
            candidate = Candidate(record.request_id or "", old, facts.reason)
        else:
            return None
        if not candidate.request_id or not self._filter.matches(facts):
            return None
        name, version = facts.prompt, facts.version
        return PlanItem(
            ref=record.ref,
            timestamp_ms=record.timestamp_ms,
            action="send",
            note="",
            destination=None,
            summary={
                "request_id": candidate.request_id,
                "reason": candidate.old_reason or "-",
                "stage": logical,
                "prompt": f"{name}@{version}" if name else "-",
                "was": candidate.old_outcome,
                "at": record.timestamp_ms,
            },
            payload=candidate,
        )

    # -- deciding -----------------------------------------------------------------------

    def finalize(self, items: list[PlanItem]) -> None:
        """Look the completions up once for all candidates, then settle each one again."""
        wanted = {
            item.payload.request_id
            for item in items
            if isinstance(item.payload, Candidate) and item.payload.completion is None
        }
        stored = self._stored_completions(wanted) if wanted else {}
        seen: dict[str, tuple[str, int, int]] = {}
        pending: list[tuple[PlanItem, Candidate]] = []
        for item in items:
            candidate = item.payload
            assert isinstance(candidate, Candidate)
            if candidate.request_id in seen:
                item.action, item.note = "refuse", "duplicate: the request is re-parsed once"
                continue
            seen[candidate.request_id] = item.ref
            if candidate.completion is None:
                found = stored.get(candidate.request_id)
                if found is None:
                    item.action = "refuse"
                    item.note = f"no stored completion on {COMPLETIONS} (expired or never made)"
                    continue
                candidate.completion, candidate.key, candidate.headers = found
            pending.append((item, candidate))
        if pending:
            asyncio.run(self._settle_all(pending))

    async def _settle_all(self, pending: list[tuple[PlanItem, Candidate]]) -> None:
        configure_tracing()
        # The same review policy as the workers: a version in burn-in is held for review
        # here too, and audit copies are written with their results.
        burn_in = await start_burn_in_ledger(self._settings, self._registry, self._codec)
        settler = Settler(self._registry, self._control, client=None, burn_in=burn_in)
        fallback = FallbackWorker(self._registry, self._control)
        try:
            for item, candidate in pending:
                assert candidate.completion is not None
                carrier = (candidate.headers or {}).items()
                with tracer().start_as_current_span(
                    "dlq reparse", context=extract(carrier), kind=trace.SpanKind.INTERNAL
                ):
                    decision = await settler(candidate.completion)
                    if isinstance(decision, Emit) and decision.topic == FALLBACK:
                        assert isinstance(decision.envelope, Escalation)
                        decision = fallback(decision.envelope)
                    self._record(item, candidate, decision)
        finally:
            if burn_in is not None:
                await burn_in.stop()

    def _record(self, item: PlanItem, candidate: Candidate, decision: Decision) -> None:
        new = outcome_of(decision)
        old = (candidate.old_outcome, candidate.old_reason)
        item.summary["now"] = f"{new[0]} ({new[1]})" if new[1] else new[0]
        if isinstance(decision, DeadLetter):
            item.action = "refuse"
            item.note = f"still fails: {decision.reason}: {decision.message[:120]}"
            return
        if new == old:
            item.action, item.note = "refuse", "unchanged under the current rules"
            return
        ref = SourceRecord(item.ref[0], item.ref[1], item.ref[2], None, None, None)
        key = candidate.key if candidate.key is not None else decision.request_id.encode()
        item.destination = self._settings.topic(decision.topic)
        item.note = f"{old[0]} -> {new[0]}"
        # The result first, then its copies (an audit item): what a worker would produce.
        item.payload = [self._outgoing(emit, candidate, ref, key) for emit in decision.outputs()]

    def _outgoing(
        self, emit: Emit, candidate: Candidate, ref: SourceRecord, key: bytes
    ) -> Outgoing:
        value, content_type = self._codec.encode(emit.envelope)
        headers = h.output_headers(
            emit.request_id,
            emit.prompt,
            emit.route,
            content_type,
            inject(),
            emit.reason,
            candidate.headers,
        )
        headers.append((REPARSE_SOURCE, marker_value(self._group, ref)))
        return Outgoing(
            topic=self._settings.topic(emit.topic),
            partition=None,
            key=key,
            value=value,
            headers=tuple(headers),
        )

    def outgoing(self, record: SourceRecord, item: PlanItem) -> list[Outgoing]:
        """Decided in :meth:`finalize`, so a dry run shows exactly what a real run sends."""
        assert isinstance(item.payload, list)
        return list(item.payload)

    def _stored_completions(
        self, wanted: set[str]
    ) -> dict[str, tuple[Completion, bytes | None, dict[str, bytes]]]:
        """The newest stored completion per wanted request id (headers filter before decoding)."""
        found: dict[str, tuple[Completion, bytes | None, dict[str, bytes]]] = {}
        consumer = reader_consumer(self._settings)
        try:
            topic = self._settings.topic(COMPLETIONS)
            for record in read_ranges(consumer, snapshot_ranges(consumer, [topic])):
                rid = record.request_id
                if rid not in wanted:
                    continue
                decoded = decode_value(record.value, Completion, record.header(h.CONTENT_TYPE))
                completion = decoded.envelope
                if not isinstance(completion, Completion):
                    continue
                previous = found.get(rid)
                if previous is None or completion.completed_at >= previous[0].completed_at:
                    found[rid] = (completion, record.key, record.headers_map)
        finally:
            consumer.close()
        return found
