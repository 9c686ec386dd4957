"""What one dead letter (or result, or review item) says about itself, and how to select it.

Everything here is pure: records come in as plain values, so the selection rules that decide
what an operator replays can be tested without a broker, and so ``inspect``, ``stats``,
``replay`` and ``reparse`` cannot disagree about which messages a filter selects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import (
    Completion,
    Envelope,
    Escalation,
    Request,
    Result,
    ValidatedRequest,
)
from pipeline.digits import ascii_int
from pipeline.observability.redact import DEFAULT_REDACTOR
from pipeline.transport import headers as h
from pipeline.transport.reader import RawHeaders, SourceRecord

PREVIEW_BYTES = 96
HEX_BYTES = 48
# Shown strings are clipped *before* redaction: redacting costs about a second per
# megabyte, a too_large dead letter carries one, and only the clipped part is shown.
MAX_SHOWN_CHARS = 2000
_CODEC = Codec()
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


@dataclass
class Decoded:
    """The value as the stage saw it: a whole envelope, only its fields, or raw bytes."""

    envelope: Envelope | None = None
    fields: dict[str, Any] | None = None
    error: str | None = None

    def as_json(self, redact: bool = True) -> Any:
        if self.envelope is not None:
            data: Any = self.envelope.model_dump(mode="json")
        elif self.fields is not None:
            data = self.fields
        else:
            return None
        clipped = clip(data)
        return DEFAULT_REDACTOR.value(clipped) if redact else clipped


def clip(value: Any, limit: int = MAX_SHOWN_CHARS) -> Any:
    """Long strings cut to ``limit`` characters, saying how much was left out."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}… [{len(value) - limit} more characters]"
    if isinstance(value, dict):
        return {k: clip(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [clip(v, limit) for v in value]
    return value


def decode_value(
    value: bytes | None, cls: type[Envelope] | None, content_type: str | None
) -> Decoded:
    """Decode with the stage's input type; fall back to bare fields so a message that failed
    validation (e.g. ``invalid_envelope``) still shows what it contained."""
    if value is None:
        return Decoded(error="no value (tombstone)")
    if cls is None:
        return Decoded(error="unknown stage: no envelope type to decode with")
    try:
        return Decoded(envelope=_CODEC.decode(value, cls, content_type))
    except DecodeError as exc:
        first = f"{exc.reason}: {exc.detail}"
    try:
        return Decoded(fields=_CODEC.decode_fields(value, cls, content_type), error=first)
    except DecodeError:
        return Decoded(error=first)


def raw_preview(value: bytes | None, redact: bool = True) -> dict[str, Any]:
    """Undecodable bytes, escaped and truncated: safe to print on any terminal."""
    if value is None:
        return {"length": 0, "repr": "None", "hex": ""}
    text = repr(value[:PREVIEW_BYTES])
    if redact:
        text = DEFAULT_REDACTOR.text(text)
    return {
        "length": len(value),
        "repr": text + ("…" if len(value) > PREVIEW_BYTES else ""),
        "hex": value[:HEX_BYTES].hex(" ") + (" …" if len(value) > HEX_BYTES else ""),
    }


def split_prompt_ref(ref: str | None) -> tuple[str | None, int | None]:
    """``name@version`` as written in ``x-prompt``; a bare name has no version."""
    if not ref:
        return None, None
    name, _, version = ref.partition("@")
    return name or None, ascii_int(version)


@dataclass(frozen=True)
class Facts:
    """What filters look at, for any kind of record (dead letter, result, review item)."""

    kind: str  # dead_letter | result | review
    reason: str | None
    stage: str | None
    prompt: str | None
    version: int | None
    timestamp_ms: int | None
    request_id: str | None
    text: str  # what --grep searches: the error message, class and detail


class DeadLetterView:
    """Typed access to a dead letter's provenance headers, with its value decoded lazily."""

    def __init__(self, record: SourceRecord) -> None:
        self.record = record

    def _int(self, name: str) -> int | None:
        raw = self.record.header(name)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    @property
    def reason(self) -> str:
        return self.record.header(h.DLQ_REASON) or "-"

    @property
    def stage(self) -> str:
        return self.record.header(h.DLQ_STAGE) or "-"

    @property
    def error_class(self) -> str:
        return self.record.header(h.DLQ_ERROR_CLASS) or ""

    @property
    def error_message(self) -> str:
        return self.record.header(h.DLQ_ERROR_MESSAGE) or ""

    @property
    def original_topic(self) -> str | None:
        return self.record.header(h.DLQ_TOPIC)

    @property
    def original_partition(self) -> int | None:
        return self._int(h.DLQ_PARTITION)

    @property
    def original_offset(self) -> int | None:
        return self._int(h.DLQ_OFFSET)

    @property
    def original_timestamp_ms(self) -> int | None:
        ts = self._int(h.DLQ_TIMESTAMP)
        return ts if ts is not None and ts >= 0 else None

    @property
    def consumer_group(self) -> str | None:
        return self.record.header(h.DLQ_GROUP)

    @property
    def attempts(self) -> int | None:
        return self._int(h.DLQ_ATTEMPTS)

    @property
    def replay_count(self) -> int:
        return self._int(h.DLQ_REPLAY_COUNT) or 0

    @property
    def first_failure_at(self) -> datetime | None:
        """When the request first failed; survives replays, so it is the request's real age."""
        raw = self.record.header(h.DLQ_FIRST_FAILURE)
        parsed = _parse_iso(raw) if raw else None
        return parsed or self.record.time

    @cached_property
    def decoded(self) -> Decoded:
        # The value of a dead letter is the input of the stage that refused it.
        stage = topology.STAGES.get(self.stage)
        return decode_value(
            self.record.value,
            stage.input_envelope if stage else None,
            self.record.header(h.CONTENT_TYPE),
        )

    @cached_property
    def prompt(self) -> tuple[str | None, int | None]:
        """From ``x-prompt`` when the stage had resolved a version, else from the value.

        ``unknown_prompt`` and ``unknown_prompt_version`` dead letters have no resolved version
        by definition, yet an operator filters them by the prompt the caller asked for.
        """
        name, version = split_prompt_ref(self.record.header(h.PROMPT))
        if name is not None:
            return name, version
        decoded = self.decoded
        envelope = decoded.envelope
        if isinstance(envelope, Request):
            return envelope.prompt, envelope.prompt_version
        if isinstance(envelope, ValidatedRequest):
            return envelope.prompt.name, envelope.prompt.version
        if isinstance(envelope, Completion | Escalation):
            return envelope.validated.prompt.name, envelope.validated.prompt.version
        fields = decoded.fields or {}
        prompt = fields.get("prompt")
        version = fields.get("prompt_version")
        return (
            prompt if isinstance(prompt, str) and prompt else None,
            version if isinstance(version, int) else None,
        )

    @property
    def prompt_label(self) -> str:
        name, version = self.prompt
        if name is None:
            return "-"
        return f"{name}@{version}" if version is not None else f"{name}@latest"

    def facts(self) -> Facts:
        name, version = self.prompt
        return Facts(
            kind="dead_letter",
            reason=self.reason,
            stage=self.stage,
            prompt=name,
            version=version,
            timestamp_ms=self.record.timestamp_ms,
            request_id=self.record.request_id,
            text=f"{self.error_class} {self.error_message}",
        )


class ReasonedView:
    """A result or review item, seen through the same :class:`Facts` as a dead letter."""

    def __init__(self, record: SourceRecord, kind: str) -> None:
        self.record = record
        self.kind = kind
        cls: type[Envelope] = Result if kind == "result" else Escalation
        self.decoded = decode_value(record.value, cls, record.header(h.CONTENT_TYPE))

    def facts(self) -> Facts:
        envelope = self.decoded.envelope
        name, version = split_prompt_ref(self.record.header(h.PROMPT))
        text = ""
        if isinstance(envelope, Result):
            name, version = envelope.prompt.name, envelope.prompt.version
            text = "; ".join(envelope.validation.errors)
        elif isinstance(envelope, Escalation):
            name, version = envelope.validated.prompt.name, envelope.validated.prompt.version
            text = f"{envelope.detail} {'; '.join(envelope.validation.errors)}"
        return Facts(
            kind=self.kind,
            reason=self.record.header(h.REASON),
            stage=None,
            prompt=name,
            version=version,
            timestamp_ms=self.record.timestamp_ms,
            request_id=self.record.request_id,
            text=text,
        )


@dataclass(frozen=True)
class Filter:
    """The selection an operator asks for; empty fields select everything.

    Time bounds apply to the record's own Kafka timestamp (when the dead letter was written),
    which is also what Kafka's time index answers, so ``--since`` can seek instead of scan.
    """

    reasons: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    prompt: str | None = None
    version: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    request_ids: frozenset[str] = frozenset()
    grep: str | None = None
    # The options as the operator typed them: what a resumed run must repeat (see replay).
    spelled: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def matches(self, facts: Facts) -> bool:
        if self.reasons and (facts.reason or "") not in self.reasons:
            return False
        if self.stages and (facts.stage or "") not in self.stages:
            return False
        if self.request_ids and (facts.request_id or "") not in self.request_ids:
            return False
        ts = facts.timestamp_ms
        if self.since_ms is not None and (ts is None or ts < self.since_ms):
            return False
        if self.until_ms is not None and (ts is None or ts >= self.until_ms):
            return False
        if self.grep and self.grep.lower() not in facts.text.lower():
            return False
        if self.prompt is not None and facts.prompt != self.prompt:
            return False
        return self.version is None or facts.version == self.version

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.spelled) or "(everything)"


def build_filter(
    *,
    reasons: Iterable[str] = (),
    stages: Iterable[str] = (),
    prompt: str | None = None,
    version: int | None = None,
    since: str | None = None,
    until: str | None = None,
    request_ids: Iterable[str] = (),
    grep: str | None = None,
    now: datetime | None = None,
) -> Filter:
    """Parse CLI-style values; raises ValueError with a message fit for the operator."""
    now = now or datetime.now(UTC)
    since_ms = to_ms(parse_time(since, now)) if since else None
    until_ms = to_ms(parse_time(until, now)) if until else None
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ValueError(f"--since {since} is not before --until {until}")
    spelled: list[tuple[str, str]] = []
    for name, values in (
        ("reason", sorted(set(reasons))),
        ("stage", sorted(set(stages))),
        ("request-id", sorted(set(request_ids))),
    ):
        if values:
            spelled.append((name, ",".join(values)))
    for name, value in (
        ("prompt", prompt),
        ("version", version),
        ("since", since),
        ("until", until),
        ("grep", grep),
    ):
        if value is not None:
            spelled.append((name, str(value)))
    return Filter(
        reasons=frozenset(reasons),
        stages=frozenset(stages),
        prompt=prompt,
        version=version,
        since_ms=since_ms,
        until_ms=until_ms,
        request_ids=frozenset(request_ids),
        grep=grep,
        spelled=tuple(spelled),
    )


def parse_time(text: str, now: datetime) -> datetime:
    """ISO 8601 (naive means UTC) or a relative age such as ``90s``, ``15m``, ``2h``, ``3d``.

    Relative ages are resolved once per command, against ``now``.
    """
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
        return now - timedelta(seconds=seconds)
    parsed = _parse_iso(text.strip())
    if parsed is None:
        raise ValueError(
            f"cannot read time {text!r}: use ISO 8601 (2025-01-31T10:00:00Z) or an age (2h, 30m)"
        )
    return parsed


def _parse_iso(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    if ms is None or ms < 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC)


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86_400:.1f}d"


def headers_dict(headers: RawHeaders) -> Mapping[str, str]:
    return {k: (v.decode("utf-8", "replace") if v is not None else "") for k, v in headers}
