"""The review service: claims, decisions and their exactly-once delivery to Kafka.

Exactly once, and why it is built this way
------------------------------------------
A decision must reach Kafka once even after a double click, a retried POST, a crash or a
restart with a wiped database. Three mechanisms, each covering what the others cannot:

1. **One decision per request, by construction.** The decision id is
   ``uuid5(request_id)`` and the database's primary key is the request id. A second
   attempt (double click, another reviewer, a retry) cannot insert a second row; it gets
   the first decision back and produces nothing.

2. **Outbox with verification before every produce.** The decision row is written first
   with state ``pending``. Before producing, the service waits until the topic follower
   has read ``llm.review.decisions`` up to its current end (:meth:`TopicFollower.sync`)
   and checks whether this decision id is already there. Only if it is not does it
   produce; afterwards it marks the row ``published``. A crash between the produce and
   that mark leaves a ``pending`` row, and the next attempt (the retry loop, or the next
   start) finds the decision on the topic and only marks the row. Nothing is produced
   twice, and nothing is lost: a ``pending`` row is retried until it is on the topic.

3. **One Kafka transaction per decision.** The decision, the ``Result`` and (for an edit)
   the ``Correction`` are written in one transaction with a transactional id stable per
   instance. So "the decision is on the topic" (read committed) implies the result and
   correction are too, and a restart fences and aborts a half-finished transaction of
   the previous incarnation, so the check in (2) can never see a state that later
   changes. Consumers of ``llm.results`` and ``llm.corrections`` should read committed
   (confluent-kafka's default; aiokafka needs ``isolation_level="read_committed"``); a
   read-uncommitted consumer may also see an aborted attempt, and can dedupe on the
   ``x-decision-id`` header.

All producing goes through one lock, so the check-then-produce in (2) cannot interleave
with another thread's produce of the same decision.

Several instances on one database
---------------------------------
Every instance sees every pending decision in the shared database, so "retry what is
pending" needs an owner, or two instances would deliver the same decision. A decision is
owned by the instance that recorded it (``owner``), and only the owner delivers it, with
its own transactional id. The order inside a delivery is fence, then read, then write:
the owner holds a live producer epoch, *then* re-reads that it still owns the row and
checks the topic, *then* produces in that epoch.

An instance that is gone (stopped cleanly, or silent for ``orphan_after_ms``) leaves its
pending decisions to another, which takes them over in the database (``taken_from``
remembers whom from) and fences the old owner's transactional id before delivering. If
the old owner was only paused and wakes up, either it re-reads the row after the takeover
and sees it is no longer its own, or it read it before, held an epoch from before, and
that epoch is fenced, so its commit fails. Either way one commit. Instance ids are
generated unique per process by default; a configured id must be unique per instance
and stays the same across its restarts.

Terminal answers per action
---------------------------
* approve: a ``Result`` (source ``human``) with the model's output.
* edit: a ``Result`` with the corrected output, and a ``Correction`` (training data).
* clarify: a ``Result`` with status ``needs_clarification`` and ``{"question": ...}``.
* reject: only the ``ReviewDecision``. There is no acceptable output to put in a
  ``Result`` (whose contract is "use this output"), and the request already reached its
  terminal place when it was escalated to ``llm.review``; consumers that must learn about
  rejections read ``llm.review.decisions``, which is kept forever.

Audit items (reason ``audit``) were delivered before they were reviewed, so their
decisions produce no second result, except a superseding one for an edit when the prompt
asks for it: see :mod:`pipeline.review.audit`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import (
    Correction,
    Envelope,
    Result,
    ReviewAction,
    ReviewDecision,
)
from pipeline.contract.topology import CORRECTIONS, RESULTS, REVIEW_DECISIONS
from pipeline.errors import LlmpipeError
from pipeline.observability import semconv
from pipeline.observability.hooks import record_audit_verdict, record_human_decision
from pipeline.observability.propagation import configure_tracing, extract, inject, tracer
from pipeline.prompts.errors import PromptError
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.review.audit import AUDIT_CORRECTION, VERDICTS, delivers_result, is_audit
from pipeline.review.display import json_for_editing
from pipeline.review.inputs import InputError, json_object
from pipeline.review.kafka_io import (
    OutboundMessage,
    PublishError,
)
from pipeline.review.model import (
    AuditEntry,
    ClaimOutcome,
    Clock,
    QueueFacets,
    QueueFilter,
    ReviewItem,
    StoredDecision,
    decision_id_for,
    ms_to_datetime,
)
from pipeline.review.store import ReviewStore
from pipeline.review.triage import ConfidenceExplanation, explain_confidence, preview
from pipeline.transport import headers as h

log = logging.getLogger("llmpipe.review")

DECISION_ID_HEADER = "x-decision-id"
REVIEWER_HEADER = "x-reviewer"
ROUTE_DECISION = "review_decision"
ROUTE_RESULT = "result"
ROUTE_CORRECTION = "correction"
MAX_TEXT = 2000
MAX_OUTPUT_CHARS = 200_000
LONG_FIELD_CHARS = 600
"""Variables longer than this (or with more lines than ``LONG_FIELD_LINES``) start folded."""
LONG_FIELD_LINES = 12
HUMAN_CONFIDENCE = 1.0
"""A reviewer vouched for the output; the model's own score stays in ``validation``."""


class ReviewError(LlmpipeError):
    """A decision or claim the service refuses; ``status`` is the HTTP status to show."""

    status = 400

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class NotFound(ReviewError):
    status = 404


class NotClaimed(ReviewError):
    status = 409


class NotReady(ReviewError):
    status = 503


class Publisher(Protocol):
    def begin(self) -> None:
        """Hold a live epoch of this instance's transactional id (fences its predecessor)."""

    def fence(self, instance: str) -> None:
        """Fence another instance's transactional id."""

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Produce in one transaction with the epoch :meth:`begin` holds."""


class TopicState(Protocol):
    """What the service needs from the topic follower."""

    def sync(self, timeout_s: float) -> bool: ...


@dataclass(frozen=True)
class DecideOutcome:
    decision: StoredDecision
    duplicate: bool
    """True when this call found an earlier decision and did nothing."""

    @property
    def delivered(self) -> bool:
        return self.decision.state == "published"


@dataclass(frozen=True)
class Variable:
    """One request variable as a reviewer reads it: text as text, anything else as JSON."""

    name: str
    text: str
    is_text: bool
    long: bool


@dataclass(frozen=True)
class ItemView:
    """Everything the item page shows, prepared so the template only formats."""

    item: ReviewItem
    prompt: PromptVersion | None
    messages: list[dict[str, str]]
    render_error: str | None
    audit: list[AuditEntry]
    output_json: str | None
    variables: list[Variable]
    confidence: ConfidenceExplanation
    draft: str
    holder: str | None
    age_ms: int
    overdue: bool


@dataclass(frozen=True)
class QueueRow:
    item: ReviewItem
    preview: str
    threshold: float | None
    age_ms: int
    overdue: bool
    holder: str | None


@dataclass
class DeliveryStats:
    published: int = 0
    found_on_topic: int = 0
    deferred: int = 0
    failures: list[str] = field(default_factory=list)


class ReviewService:
    def __init__(
        self,
        store: ReviewStore,
        registry: PromptRegistry,
        publisher: Publisher,
        topics: TopicState,
        topic_name: Callable[[str], str],
        clock: Clock,
        *,
        codec: Codec | None = None,
        lease_ms: int = 10 * 60_000,
        sla_ms: int = 60 * 60_000,
        sync_timeout_s: float = 10.0,
        instance: str = "0",
        orphan_after_ms: int = 60_000,
    ) -> None:
        self.store = store
        self.instance = instance
        self.orphan_after_ms = orphan_after_ms
        """Silence after which an instance's pending decisions are taken over; longer than
        Kafka's transaction timeout, so a dead owner's open transaction is aborted by then."""
        self.registry = registry
        self.clock = clock
        self.lease_ms = lease_ms
        self.sla_ms = sla_ms
        self._publisher = publisher
        self._topics = topics
        self._topic_name = topic_name
        self._codec = codec or Codec()
        self._sync_timeout_s = sync_timeout_s
        self._publish_lock = threading.Lock()
        self._ready = threading.Event()
        self.stats = DeliveryStats()
        configure_tracing()

    # -- readiness ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def become_ready(self, timeout_s: float) -> bool:
        """Catch up with the topics, then re-drive decisions left pending by a crash.

        Decisions are refused until this succeeds: with a freshly rebuilt database, an
        item could otherwise be decided again before its earlier decision is read back.
        """
        if not self._topics.sync(timeout_s):
            return False
        self._ready.set()
        self.deliver_pending(take_over_silent=False)
        return True

    # -- reading ------------------------------------------------------------------------

    def queue(self, query: QueueFilter) -> list[ReviewItem]:
        return self.store.open_items(query, self.clock())

    def queue_rows(self, query: QueueFilter) -> list[QueueRow]:
        """The queue as the reviewer triages it: a preview and the threshold per item."""
        now = self.clock()
        rows = []
        for item in self.store.open_items(query, now):
            prompt = self._prompt(item)
            rows.append(
                QueueRow(
                    item=item,
                    preview=preview(prompt, item.escalation),
                    threshold=prompt.confidence.accept if prompt is not None else None,
                    age_ms=item.age_ms(now),
                    overdue=item.age_ms(now) >= self.sla_ms,
                    holder=item.holder(now),
                )
            )
        return rows

    def _prompt(self, item: ReviewItem) -> PromptVersion | None:
        ref = item.escalation.validated.prompt
        try:
            return self.registry.get(ref.name, ref.version)
        except PromptError:
            return None

    def facets(self) -> QueueFacets:
        return self.store.facets()

    def view(self, request_id: str) -> ItemView:
        item = self.store.item(request_id)
        if item is None:
            raise NotFound(f"no review item {request_id!r}")
        esc = item.escalation
        prompt: PromptVersion | None = None
        messages: list[dict[str, str]] = []
        render_error: str | None = None
        try:
            prompt = self.registry.get(esc.validated.prompt.name, esc.validated.prompt.version)
            messages = render_messages(prompt, esc.validated.request.variables)
        except PromptError as exc:
            render_error = str(exc)
        now = self.clock()
        age = item.age_ms(now)
        return ItemView(
            item=item,
            prompt=prompt,
            messages=messages,
            render_error=render_error,
            audit=self.store.audit_trail(request_id),
            output_json=_pretty(esc.output) if esc.output is not None else None,
            variables=[_variable(k, v) for k, v in esc.validated.request.variables.items()],
            confidence=explain_confidence(esc, prompt),
            draft=json_for_editing(esc.output if esc.output is not None else {}),
            holder=item.holder(now),
            age_ms=age,
            overdue=age >= self.sla_ms,
        )

    def audit_log(self, actor: str | None = None, limit: int = 500) -> list[AuditEntry]:
        return self.store.audit_log(actor, limit)

    # -- claims -------------------------------------------------------------------------

    def claim(self, request_id: str, reviewer: str) -> ClaimOutcome:
        return self.store.claim(request_id, reviewer, self.clock(), self.lease_ms)

    def claim_next(self, reviewer: str, query: QueueFilter) -> str | None:
        """Claim the oldest free item; a lost race just moves on to the next candidate."""
        now = self.clock()
        for request_id in self.store.next_claimable(query, now, reviewer):
            if self.store.claim(request_id, reviewer, now, self.lease_ms).ok:
                return request_id
        return None

    def release(self, request_id: str, reviewer: str, *, holder: str | None = None) -> bool:
        """Free a claim; True only if one was freed (the notice must say what happened)."""
        return self.store.release(request_id, reviewer, self.clock(), holder=holder)

    # -- decisions ----------------------------------------------------------------------

    def decide(
        self,
        request_id: str,
        reviewer: str,
        action: str,
        *,
        output_text: str | None = None,
        reason: str | None = None,
        question: str | None = None,
    ) -> DecideOutcome:
        """Record and deliver a decision; idempotent per request.

        Refuses (``ReviewError``) unless the reviewer holds a live claim and the input is
        valid; an edit must be a JSON object that the prompt version's output schema
        accepts. A request that already has a decision returns it unchanged.
        """
        if not self.ready:
            raise NotReady("the review queue is still catching up with Kafka; try again")
        item = self.store.item(request_id)
        if item is None:
            raise NotFound(f"no review item {request_id!r}")
        if item.decision is not None:
            return DecideOutcome(item.decision, duplicate=True)
        now = self.clock()
        if item.holder(now) != reviewer:
            holder = item.holder(now)
            raise NotClaimed(
                f"claimed by {holder}" if holder else "claim the item before deciding",
            )
        try:
            decision = self._build_decision(item, reviewer, action, output_text, reason, question)
        except ReviewError as exc:
            detail = "; ".join([str(exc), *exc.errors])
            self.store.audit(reviewer, request_id, f"refused:{action[:20]}", detail, now)
            raise
        if not self.store.record_decision(decision, now, self.instance):
            existing = self.store.decision(request_id)
            assert existing is not None
            return DecideOutcome(existing, duplicate=True)
        self._deliver(decision.request_id)
        stored = self.store.decision(request_id)
        assert stored is not None
        return DecideOutcome(stored, duplicate=False)

    def deliver_pending(self, *, take_over_silent: bool = True) -> DeliveryStats:
        """Re-drive this instance's decisions not yet known to be on Kafka (after a crash
        or an outage), after taking over those of instances that are gone.

        Stopped instances are always gone. Silent ones only count when
        ``take_over_silent``: the caller says no while it has itself not been in touch
        with the database for ``orphan_after_ms`` (just started, or just back from an
        outage in which every instance fell silent), so a database outage does not make
        every instance take over every other one's decisions.
        """
        alive_since = self.clock() - self.orphan_after_ms if take_over_silent else None
        for owner in self.store.orphaned_owners(self.instance, alive_since):
            moved = self.store.take_over(owner, self.instance, self.clock())
            if moved:  # zero when another instance took them over first
                log.warning("took over %d pending decision(s) of instance %s", moved, owner)
        for pending in self.store.pending_decisions(self.instance):
            self._deliver(pending.decision.request_id)
        return self.stats

    def _deliver(self, request_id: str) -> None:
        """Produce the decision's messages unless the decisions topic already has it.

        Fence, then read, then write (see the module docstring): the producer epoch is
        held before the row is read, so a takeover after the read is caught by the fence.
        """
        with self._publish_lock:
            try:
                self._publisher.begin()
            except PublishError as exc:
                self.stats.deferred += 1
                log.warning("decision %s deferred: %s", request_id, exc)
                return
            stored = self.store.decision(request_id)
            if stored is None or stored.state == "published" or stored.owner != self.instance:
                return
            if stored.taken_from is not None:
                try:
                    self._publisher.fence(stored.taken_from)
                except PublishError as exc:
                    self.stats.deferred += 1
                    log.warning("decision %s deferred: %s", request_id, exc)
                    return
            if not self._topics.sync(self._sync_timeout_s):
                self.stats.deferred += 1
                log.warning("decision %s deferred: decisions topic not readable", request_id)
                return
            stored = self.store.decision(request_id)
            assert stored is not None
            decision = stored.decision
            if stored.on_topic or stored.state == "published":
                self.stats.found_on_topic += 1
                self.store.mark_published(decision.decision_id, self.clock())
                self.store.audit(
                    "system",
                    request_id,
                    "delivered",
                    "already on the decisions topic",
                    self.clock(),
                )
                return
            item = self.store.item(request_id)
            if item is None:  # the decision row exists only for a known item
                return
            try:
                self._publisher.publish(self._messages(item, decision))
            except PublishError as exc:
                self.stats.failures.append(str(exc))
                self.store.audit("system", request_id, "delivery_failed", str(exc), self.clock())
                log.warning("decision %s not delivered (%s); will retry", request_id, exc)
                return
            self.stats.published += 1
            self.store.mark_published(decision.decision_id, self.clock())
            record_human_decision(decision.action, item.escalation.validated.prompt)
            if is_audit(item.escalation):
                record_audit_verdict(VERDICTS[decision.action], item.escalation.validated.prompt)
            produced = ["decision"]
            if delivers_result(item.escalation, decision.action, self.registry):
                produced.append("result")
            if decision.action == "edit":
                produced.append("correction")
            note = f"{', '.join(produced)} produced in one transaction"
            self.store.audit("system", request_id, "delivered", note, self.clock())

    def _build_decision(
        self,
        item: ReviewItem,
        reviewer: str,
        action: str,
        output_text: str | None,
        reason: str | None,
        question: str | None,
    ) -> ReviewDecision:
        esc = item.escalation
        output: dict[str, Any] | None
        chosen: ReviewAction
        if action == "approve":
            if esc.output is None:
                raise ReviewError("there is no parsed model output to approve; edit it instead")
            chosen, output, reason = "approve", esc.output, None
        elif action == "edit":
            chosen, output, reason = "edit", self._validated_output(item, output_text), None
        elif action == "reject":
            reason = (reason or "").strip()
            if not reason:
                raise ReviewError("a rejection needs a reason", ["reason: required"])
            chosen, output = "reject", None
        elif action == "clarify":
            question = (question or "").strip()
            if not question:
                raise ReviewError("a clarification needs a question", ["question: required"])
            chosen, output, reason = "clarify", {"question": question[:MAX_TEXT]}, None
        else:
            raise ReviewError(f"unknown action {action!r}")
        return ReviewDecision(
            decision_id=decision_id_for(item.request_id),
            request_id=item.request_id,
            action=chosen,
            reviewer=reviewer,
            output=output,
            reason=reason[:MAX_TEXT] if reason else None,
            prompt=esc.validated.prompt,
            decided_at=ms_to_datetime(self.clock()),
        )

    def _validated_output(self, item: ReviewItem, text: str | None) -> dict[str, Any]:
        """Parse and schema-check an edited output; every problem is reported at once."""
        try:
            value = json_object(text, MAX_OUTPUT_CHARS)
        except InputError as exc:
            raise ReviewError(str(exc), exc.errors) from None
        ref = item.escalation.validated.prompt
        try:
            prompt = self.registry.get(ref.name, ref.version)
        except PromptError as exc:
            raise ReviewError(
                f"{ref.ref} is not loaded here, so an edit cannot be validated", [str(exc)]
            ) from None
        errors = sorted(prompt.output_validator.iter_errors(value), key=lambda e: e.json_path)
        if errors:
            raise ReviewError(
                "the corrected output does not match the output schema",
                [f"{e.json_path}: {e.message}" for e in errors],
            )
        return value

    # -- what goes to Kafka -------------------------------------------------------------

    def _messages(self, item: ReviewItem, decision: ReviewDecision) -> list[OutboundMessage]:
        """Deterministic in the decision: a re-driven delivery produces the same content."""
        esc = item.escalation
        request = esc.validated.request
        key = item.key if item.key is not None else request.request_id.encode()
        parent = extract([(h.TRACEPARENT, item.traceparent.encode())] if item.traceparent else [])
        with tracer().start_as_current_span(
            "review decide", context=parent, kind=trace.SpanKind.PRODUCER
        ) as span:
            span.set_attribute(semconv.REVIEW_ACTION, decision.action)
            span.set_attribute(semconv.REQUEST_ID, request.request_id)
            trace_headers = inject()
            trace_id = format(span.get_span_context().trace_id, "032x")
        envelopes: list[tuple[str, str, Envelope]] = [(REVIEW_DECISIONS, ROUTE_DECISION, decision)]
        if delivers_result(esc, decision.action, self.registry):
            assert decision.output is not None
            envelopes.append((RESULTS, ROUTE_RESULT, self._result(item, decision, trace_id)))
        if decision.action == "edit":
            assert decision.output is not None
            correction = Correction(
                request_id=request.request_id,
                prompt=esc.validated.prompt,
                variables=request.variables,
                original_output=esc.output,
                corrected_output=decision.output,
                reviewer=decision.reviewer,
                decided_at=decision.decided_at,
            )
            envelopes.append((CORRECTIONS, ROUTE_CORRECTION, correction))
        messages = []
        for topic, route, envelope in envelopes:
            value, content_type = self._codec.encode(envelope)
            headers = h.output_headers(
                request.request_id,
                esc.validated.prompt,
                route,
                content_type,
                trace_headers,
                f"review_{decision.action}",
            )
            headers += [
                (DECISION_ID_HEADER, decision.decision_id.encode()),
                (REVIEWER_HEADER, decision.reviewer.encode()),
            ]
            messages.append(OutboundMessage(self._topic_name(topic), key, value, headers))
        return messages

    @staticmethod
    def _result(item: ReviewItem, decision: ReviewDecision, trace_id: str) -> Result:
        esc = item.escalation
        validated = esc.validated
        assert decision.output is not None
        elapsed = (decision.decided_at - validated.received_at).total_seconds() * 1000
        return Result(
            request_id=validated.request.request_id,
            status="needs_clarification" if decision.action == "clarify" else "ok",
            output=decision.output,
            confidence=HUMAN_CONFIDENCE,
            source="human",
            prompt=validated.prompt,
            model=esc.model,
            usage=esc.usage,
            latency_ms=max(0.0, elapsed),
            attempts=esc.attempts,
            validation=esc.validation,
            metadata=validated.request.metadata,
            trace_id=trace_id,
            reason=AUDIT_CORRECTION if is_audit(esc) else f"review_{decision.action}",
            reviewer=decision.reviewer,
            produced_at=decision.decided_at,
            calls=esc.calls,
        )


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def _variable(name: str, value: Any) -> Variable:
    text = value if isinstance(value, str) else _pretty(value)
    long = len(text) > LONG_FIELD_CHARS or text.count("\n") >= LONG_FIELD_LINES
    return Variable(name, text, isinstance(value, str), long)
