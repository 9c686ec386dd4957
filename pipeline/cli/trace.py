"""``llmpipe trace REQUEST_ID``: one request's journey through every topic, as a timeline.

Why read Kafka instead of asking the tracing backend: the topics are the system of record.
They hold every hop whether or not a collector was running, sampling dropped the trace,
or the request never reached a stage that creates spans (a hostile payload dead-lettered
on arrival). Each message carries ``x-request-id`` and ``traceparent``, so the timeline
also names the trace id to open in Jaeger for the span-level view.

The scan uses an assigned consumer without a group (nothing is committed, no rebalance),
reads each partition from the beginning, or from ``--since``, up to the end offset seen
when the scan started, and keeps the messages whose ``x-request-id`` header (or, failing
that, key) is the request id.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast

import typer
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
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
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"llmpipe-trace-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    codec = Codec()
    wanted = request_id.encode()
    names = {settings.topic(t): t for t in topics or topology.journey_topics()}
    stops: list[Stop] = []
    try:
        pending = _assign(consumer, list(names), since, timeout_s)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                tp = (str(message.topic()), int(message.partition() or 0))
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.pop(tp, None)
                    continue
                offset = int(message.offset() or 0)
                if offset + 1 >= pending.get(tp, 0):
                    pending.pop(tp, None)
                headers = h.as_map(cast("list[tuple[str, bytes | None]]", message.headers()))
                rid = headers.get(h.REQUEST_ID)
                if rid != wanted and (rid is not None or message.key() != wanted):
                    continue
                stops.append(_stop(codec, names[tp[0]], tp[1], offset, message, headers))
    finally:
        consumer.close()
    return sorted(stops, key=lambda s: s.order)


def _assign(
    consumer: Consumer, topics: list[str], since: datetime | None, timeout_s: float
) -> dict[tuple[str, int], int]:
    """Assign every partition with something to read; returns the end offset of each."""
    metadata = consumer.list_topics(timeout=timeout_s)
    partitions = [
        TopicPartition(topic, p)
        for topic in topics
        if topic in metadata.topics
        for p in sorted(metadata.topics[topic].partitions)
    ]
    ends: dict[tuple[str, int], int] = {}
    starts: dict[tuple[str, int], int] = {}
    for tp in partitions:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
        if high > low:
            ends[(tp.topic, tp.partition)] = high
            starts[(tp.topic, tp.partition)] = OFFSET_BEGINNING
    if since is not None and ends:
        at_ms = int(since.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(t, p, at_ms) for t, p in ends], timeout=timeout_s
        )
        for tp in found:
            key = (tp.topic, tp.partition)
            if tp.offset < 0:  # nothing at or after --since in this partition
                ends.pop(key, None)
            else:
                starts[key] = tp.offset
    consumer.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in ends])
    return ends


def _stop(
    codec: Codec, topic: str, partition: int, offset: int, message: Any, headers: dict[str, bytes]
) -> Stop:
    _, timestamp = message.timestamp()
    spec = topology.TOPICS[topic]
    base: dict[str, Any] = {
        "timestamp_ms": int(timestamp),
        "topic": topic,
        "partition": partition,
        "offset": offset,
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
        envelope = codec.decode(
            message.value() or b"", spec.envelope, h.text(headers, h.CONTENT_TYPE)
        )
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
    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    stops = find_journey(Settings(), request_id, since=start, timeout_s=timeout)
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
