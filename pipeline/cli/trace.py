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

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import (
    Completion,
    Correction,
    Envelope,
    Escalation,
    Result,
    ReviewDecision,
    ValidatedRequest,
)
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
    if spec.envelope is None:  # a dead letter: the value is the refused input, as it came
        base["reason"] = h.text(headers, h.DLQ_REASON)
        stage = h.text(headers, h.DLQ_STAGE)
        error = h.text(headers, h.DLQ_ERROR_MESSAGE)
        base["detail"] = f"stage={stage}: {error}" if error else f"stage={stage}"
        attempts = h.text(headers, h.DLQ_ATTEMPTS)
        base["attempts"] = int(attempts) if attempts and attempts.isdigit() else None
        return Stop(**base)
    try:
        envelope = codec.decode(record.value or b"", spec.envelope, h.text(headers, h.CONTENT_TYPE))
    except DecodeError as exc:
        return Stop(**base, detail=f"undecodable: {exc.reason}")
    return Stop(**base, **_envelope_fields(envelope))


def _envelope_fields(envelope: Envelope) -> dict[str, Any]:
    """Model, attempts and latency where the envelope has them, plus a short detail."""
    if isinstance(envelope, Completion):
        return {
            "model": envelope.model,
            "attempts": envelope.attempts,
            "latency_ms": envelope.latency_ms,
            "cost_usd": envelope.usage.cost_usd,
            "detail": f"finish={envelope.finish_reason} tokens={envelope.usage.total_tokens}",
        }
    if isinstance(envelope, Result):
        detail = f"source={envelope.source} status={envelope.status}"
        if envelope.reviewer:
            detail += f" reviewer={envelope.reviewer}"
        return {
            "model": envelope.model,
            "attempts": envelope.attempts,
            "latency_ms": envelope.latency_ms,
            "cost_usd": envelope.usage.cost_usd,
            "detail": detail,
        }
    if isinstance(envelope, Escalation):
        return {
            "model": envelope.model,
            "attempts": envelope.attempts,
            "cost_usd": envelope.usage.cost_usd,
            "detail": envelope.detail[:120] or None,
        }
    if isinstance(envelope, ReviewDecision):
        return {"detail": f"action={envelope.action} reviewer={envelope.reviewer}"}
    if isinstance(envelope, Correction):
        return {"detail": f"reviewer={envelope.reviewer}"}
    if isinstance(envelope, ValidatedRequest):
        flags = ",".join(envelope.flags)
        return {"detail": f"flags={flags}" if flags else None}
    return {}


def format_cost(cost_usd: float | None) -> str:
    """Dollars to the tenth of a micro-dollar (small models cost fractions of a cent)."""
    return "" if cost_usd is None else f"{cost_usd:.7f}"


def render(stops: Sequence[Stop], request_id: str, console: Console) -> None:
    first = stops[0].timestamp_ms
    table = Table(title=f"journey of {request_id}", title_justify="left")
    for column in (
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
    ):
        table.add_column(column, overflow="fold")
    for stop in stops:
        table.add_row(
            datetime.fromtimestamp(stop.timestamp_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3],
            str(stop.timestamp_ms - first),
            stop.topic,
            stop.step,
            stop.route or "",
            stop.reason or "",
            stop.prompt or "",
            stop.model or "",
            "" if stop.attempts is None else str(stop.attempts),
            "" if stop.latency_ms is None else f"{stop.latency_ms:.1f}",
            format_cost(stop.cost_usd),
            stop.trace_id or "",
            stop.detail or "",
        )
    console.print(table)
    traces = sorted({s.trace_id for s in stops if s.trace_id})
    summary = f"{len(stops)} messages over {stops[-1].timestamp_ms - first} ms"
    if len(traces) == 1:
        summary += f"; trace {traces[0]}"
    elif traces:
        summary += f"; {len(traces)} traces (the trace was broken or replayed): " + ", ".join(
            traces
        )
    console.print(summary)


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
        Console(stderr=True).print(f"error: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 220)
    if not stops:
        Console(stderr=True).print(f"no messages found for request {request_id}")
        raise typer.Exit(1)
    if as_json:
        for stop in stops:
            typer.echo(json.dumps(asdict(stop), sort_keys=True))
        return
    render(stops, request_id, console)
