"""``llmpipe trace REQUEST_ID``: one request's journey through every topic, as a timeline.

Why read Kafka instead of asking the tracing backend: the topics are the system of record.
They hold every hop whether or not a collector was running, sampling dropped the trace,
or the request never reached a stage that creates spans (a hostile payload dead-lettered
on arrival). Each message carries ``x-request-id`` and ``traceparent``, so the timeline
also names the trace id to open in Jaeger for the span-level view.

The scan is the bounded reader's (:mod:`pipeline.transport.reader`): nothing is committed,
each partition is read from the beginning, or from ``--since``, up to the end offset seen
when the scan started, and the messages whose ``x-request-id`` header (or, failing that,
key) is the request id are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.console import err, out
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import (
    Completion,
    Correction,
    Envelope,
    Escalation,
    ModelCall,
    Result,
    ReviewDecision,
    ValidatedRequest,
)
from pipeline.digits import ascii_int
from pipeline.transport import headers as h
from pipeline.transport.reader import ScanError, SourceRecord, scan

AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Stop:
    """One message of the journey."""

    timestamp_ms: int
    topic: str
    partition: int
    offset: int
    step: str
    route: str | None = None
    reason: str | None = None
    prompt: str | None = None
    model: str | None = None
    attempts: int | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None
    trace_id: str | None = None
    detail: str | None = None
    replay_count: int | None = None
    """On a message a ``dlq replay`` sent: how many times its dead letter had been replayed
    (1 for the first replay)."""
    replayed_from: str | None = None
    """The dead letter a replay (``topic[partition]@offset``, group) or re-parse came from."""
    calls: tuple[ModelCall, ...] = ()
    """The model calls and attempts the message records (cumulative along the journey)."""

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.timestamp_ms, list(topology.TOPICS).index(self.topic), self.offset)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``15m``/``2h``/``3d``/``90s`` ago, or an ISO 8601 time (naive means UTC)."""
    now = now or datetime.now(UTC)
    match = AGE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * AGE_UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither an age like 15m, 2h, 3d nor an ISO 8601 time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def find_journey(
    settings: Settings,
    request_id: str,
    *,
    since: datetime | None = None,
    timeout_s: float = 30.0,
    topics: Sequence[str] | None = None,
) -> list[Stop]:
    """Every message of ``request_id`` in ``topics`` (default: every topic of a request's
    journey), oldest first."""
    codec = Codec()
    names = {settings.topic(t): t for t in topics or topology.journey_topics()}
    since_ms = int(since.timestamp() * 1000) if since is not None else None
    stops: list[Stop] = []
    for record in scan(settings, names, since_ms, deadline_s=timeout_s, missing_ok=True):
        if record.request_id == request_id:
            stops.append(_stop(codec, names[record.topic], record))
    return sorted(stops, key=lambda s: s.order)


def _stop(codec: Codec, topic: str, record: SourceRecord) -> Stop:
    headers = record.headers_map
    spec = topology.TOPICS[topic]
    base: dict[str, Any] = {
        "timestamp_ms": record.timestamp_ms or 0,
        "topic": topic,
        "partition": record.partition,
        "offset": record.offset,
        "step": spec.step,
        "route": h.text(headers, h.ROUTE),
        "reason": h.text(headers, h.REASON),
        "prompt": h.text(headers, h.PROMPT),
        "trace_id": trace_id_of(h.text(headers, h.TRACEPARENT)),
    }
    base |= _replay_fields(headers, spec.envelope is None)
    if spec.envelope is None:  # a dead letter: the value is the refused input, as it came
        base["reason"] = h.text(headers, h.DLQ_REASON)
        stage = h.text(headers, h.DLQ_STAGE)
        error = h.text(headers, h.DLQ_ERROR_MESSAGE)
        base["detail"] = f"stage={stage}: {error}" if error else f"stage={stage}"
        attempts = h.text(headers, h.DLQ_ATTEMPTS)
        base["attempts"] = ascii_int(attempts)
        return Stop(**base)
    try:
        envelope = codec.decode(record.value or b"", spec.envelope, h.text(headers, h.CONTENT_TYPE))
    except DecodeError as exc:
        return Stop(**base, detail=f"undecodable: {exc.reason}")
    return Stop(**base, **_envelope_fields(envelope))


def _replay_fields(headers: dict[str, bytes], dead_letter: bool) -> dict[str, Any]:
    """A replayed message carries its dead letter's marker and the bumped replay count; a
    dead letter keeps the count of replays before it failed again."""
    count = h.text(headers, h.DLQ_REPLAY_COUNT)
    fields: dict[str, Any] = {}
    replays = ascii_int(count)
    if replays:
        fields["replay_count"] = replays
    for name, verb in ((h.DLQ_REPLAY_SOURCE, "replay"), (h.REPARSE_SOURCE, "re-parse")):
        marker = _marker(h.text(headers, name))
        if marker and not dead_letter:
            fields["replayed_from"] = f"{verb} of {marker}"
    return fields


def _marker(raw: str | None) -> str | None:
    """``group|topic|partition|offset`` as ``topic[partition]@offset (group g)``."""
    parts = (raw or "").rsplit("|", 3)
    if len(parts) != 4:
        return raw
    group, topic, partition, offset = parts
    return f"{topic}[{partition}]@{offset} (group {group})"


def _envelope_fields(envelope: Envelope) -> dict[str, Any]:
    """Model, attempts and latency where the envelope has them, plus a short detail."""
    if isinstance(envelope, Completion):
        return {
            **_call_fields(envelope),
            "latency_ms": envelope.latency_ms,
            "detail": f"finish={envelope.finish_reason} tokens={envelope.usage.total_tokens}",
        }
    if isinstance(envelope, Result):
        detail = f"source={envelope.source} status={envelope.status}"
        if envelope.reviewer:
            detail += f" reviewer={envelope.reviewer}"
        return {**_call_fields(envelope), "latency_ms": envelope.latency_ms, "detail": detail}
    if isinstance(envelope, Escalation):
        return {**_call_fields(envelope), "detail": envelope.detail[:120] or None}
    if isinstance(envelope, ReviewDecision):
        return {"detail": f"action={envelope.action} reviewer={envelope.reviewer}"}
    if isinstance(envelope, Correction):
        return {"detail": f"reviewer={envelope.reviewer}"}
    if isinstance(envelope, ValidatedRequest):
        flags = ",".join(envelope.flags)
        return {"detail": f"flags={flags}" if flags else None}
    return {}


def _call_fields(envelope: Completion | Result | Escalation) -> dict[str, Any]:
    """What every envelope that carries model calls shows alike: calls, model, attempts, cost."""
    return {
        "calls": tuple(envelope.calls),
        "model": envelope.model,
        "attempts": envelope.attempts,
        "cost_usd": envelope.usage.cost_usd,
    }


def new_calls(stops: Sequence[Stop]) -> list[tuple[Stop, tuple[ModelCall, ...]]]:
    """Each stop with the calls first recorded there.

    The envelopes carry the calls cumulatively (a result repeats its completion's), so a
    stop shows only those past the previous stop's list; a list that does not continue the
    previous one (a replayed request starts over) is shown whole."""
    shown: tuple[ModelCall, ...] = ()
    rows = []
    for stop in stops:
        calls = stop.calls
        if calls[: len(shown)] == shown and shown:
            rows.append((stop, calls[len(shown) :]))
        else:
            rows.append((stop, calls))
        if calls:
            shown = calls
    return rows


def stop_json(stop: Stop, calls: Sequence[ModelCall]) -> dict[str, Any]:
    """One stop as JSON: its fields, with the calls first recorded there."""
    row = asdict(stop)
    row["calls"] = [call.model_dump() for call in calls]
    return row


def format_cost(cost_usd: float | None) -> str:
    """Dollars to the tenth of a micro-dollar (small models cost fractions of a cent)."""
    return "" if cost_usd is None else f"{cost_usd:.7f}"


COLUMNS = (
    "time (UTC)",
    "+ms",
    "topic",
    "step",
    "route",
    "reason",
    "prompt",
    "model",
    "attempts",
    "latency ms",
    "cost $",
    "trace id",
    "detail",
)
# Below this width thirteen columns fold into slivers: each message becomes a block of lines.
TABLE_MIN_WIDTH = 160


def _rows(stops: Sequence[Stop]) -> list[tuple[str, ...]]:
    """One row per message, then one per model call first recorded there."""
    first = stops[0].timestamp_ms
    rows: list[tuple[str, ...]] = []
    for stop, calls in new_calls(stops):
        step = stop.step
        detail = stop.detail or ""
        if stop.replayed_from:
            step = f"{step} (replay #{stop.replay_count or '?'})"
            detail = f"{stop.replayed_from}; {detail}" if detail else stop.replayed_from
        rows.append(
            (
                datetime.fromtimestamp(stop.timestamp_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3],
                str(stop.timestamp_ms - first),
                stop.topic,
                step,
                stop.route or "",
                stop.reason or "",
                stop.prompt or "",
                stop.model or "",
                "" if stop.attempts is None else str(stop.attempts),
                "" if stop.latency_ms is None else f"{stop.latency_ms:.1f}",
                format_cost(stop.cost_usd),
                stop.trace_id or "",
                detail,
            )
        )
        for call in calls:
            rows.append(
                (
                    "",
                    "",
                    "",
                    f"  └ {call.purpose} call",
                    "",
                    "",
                    "",
                    call.model,
                    str(call.attempt),
                    f"{call.latency_ms:.1f}",
                    "",
                    "",
                    call.outcome,
                )
            )
    return rows


def render(stops: Sequence[Stop], request_id: str, console: Console) -> None:
    """A table when it fits; on a narrow terminal one block of ``name: value`` lines per
    message (a call as one line under it), which wraps but never cuts a value."""
    rows = _rows(stops)
    if console.width >= TABLE_MIN_WIDTH:
        table = Table(title=f"journey of {request_id}", title_justify="left")
        for column in COLUMNS:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print(f"journey of {request_id}", highlight=False, soft_wrap=True)
        for row in rows:
            if row[0]:
                head = f"+{row[1]} ms  {row[0]}  {row[2]}  {row[3]}"
                console.print(head, highlight=False, soft_wrap=True, markup=False)
                fields = [
                    f"{name}: {value}"
                    for name, value in zip(COLUMNS[4:], row[4:], strict=True)
                    if value
                ]
                for field in fields:
                    console.print(f"    {field}", highlight=False, soft_wrap=True, markup=False)
            else:
                call = f"    {row[3].strip()} {row[7]} attempt {row[8]}: {row[12]} ({row[9]} ms)"
                console.print(call, highlight=False, soft_wrap=True, markup=False)
    first = stops[0].timestamp_ms
    traces = sorted({s.trace_id for s in stops if s.trace_id})
    calls = sum(1 for row in rows if not row[0])
    summary = (
        f"{len(stops)} messages, {calls} model call{'' if calls == 1 else 's'} "
        f"over {stops[-1].timestamp_ms - first} ms"
    )
    if len(traces) == 1:
        summary += f"; trace {traces[0]}"
    elif traces:
        summary += f"; {len(traces)} traces (the trace was broken or replayed): " + ", ".join(
            traces
        )
    console.print(summary, highlight=False, soft_wrap=True)


def trace(
    request_id: Annotated[str, typer.Argument(help="The request id (x-request-id) to follow.")],
    since: Annotated[
        str | None,
        typer.Option(help="Scan only messages newer than this: an age (15m, 2h, 3d) or ISO time."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per message instead of a table.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Give up the scan after this many seconds.")
    ] = 30.0,
) -> None:
    """Show every message of one request across all topics, as a timeline."""
    if not request_id.strip():
        raise typer.BadParameter("must not be empty", param_hint="REQUEST_ID")
    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    try:
        stops = find_journey(Settings(), request_id, since=start, timeout_s=timeout)
    except ScanError as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if not stops:
        err.print(f"no messages found for request {request_id}", highlight=False)
        raise typer.Exit(1)
    if as_json:
        for stop, calls in new_calls(stops):
            typer.echo(json.dumps(stop_json(stop, calls), sort_keys=True))
        return
    render(stops, request_id, out)
