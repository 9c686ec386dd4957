"""Tables and JSON for the dlq commands. Presentation only: no Kafka, no decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from pipeline.contract.envelopes import Request
from pipeline.dlq.engine import Plan, PlanItem, RunReport
from pipeline.dlq.model import DeadLetterView, from_ms, headers_dict, human_age, raw_preview
from pipeline.dlq.stats import AGE_BUCKETS, Stats
from pipeline.transport import headers as h

ERROR_WIDTH = 60


def _age(moment: datetime | None, now: datetime) -> str:
    return human_age((now - moment).total_seconds()) if moment else "-"


def _short(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def stats_tables(stats: Stats, now: datetime) -> list[Table]:
    groups = Table(title=f"Dead letters: {stats.total} (groups oldest first)")
    for column in ("reason", "stage", "prompt", "count", "replayed", "oldest", "newest"):
        groups.add_column(column, justify="right" if column == "count" else "left")
    for g in stats.groups:
        groups.add_row(
            g.reason,
            g.stage,
            g.prompt,
            str(g.count),
            f"{g.replayed} ({g.replays} times)" if g.replayed else "0",
            _age(g.oldest, now),
            _age(g.newest, now),
        )
    ages = Table(title="By age (since first failure)")
    ages.add_column("age")
    ages.add_column("count", justify="right")
    for label, _ in AGE_BUCKETS:
        ages.add_row(label, str(stats.by_age[label]))
    return [groups, ages]


def request_summary(view: DeadLetterView, redact: bool = True) -> str:
    """One cell: what the caller sent, as far as it can be read."""
    decoded = view.decoded
    envelope = decoded.envelope
    if isinstance(envelope, Request):
        version = envelope.prompt_version if envelope.prompt_version is not None else "latest"
        names = ", ".join(sorted(envelope.variables)) or "none"
        return f"{envelope.prompt}@{version} vars: {names}"
    if envelope is not None:
        return f"{type(envelope).__name__} for {view.prompt_label}"
    if decoded.fields is not None:
        return _short(f"fields {sorted(decoded.fields)} ({decoded.error})", 160)
    raw = raw_preview(view.record.value, redact)
    return _short(f"{raw['length']} bytes {raw['repr']}", 160)


def inspect_table(views: list[DeadLetterView], now: datetime, redact: bool = True) -> Table:
    """One row per dead letter: the why (reason, error) above the what (the request)."""
    table = Table(title=f"{len(views)} dead letters", show_lines=True)
    table.add_column("dlq", no_wrap=True)
    table.add_column("age", no_wrap=True)
    table.add_column("reason / stage")
    table.add_column("request id / prompt")
    table.add_column("replays", justify="right")
    table.add_column("error / request", overflow="fold", ratio=1)
    for view in views:
        record = view.record
        table.add_row(
            f"{record.partition}:{record.offset}",
            _age(record.time, now),
            f"{view.reason}\n[dim]{view.stage}[/dim]",
            f"{escape(record.request_id or '-')}\n[dim]{escape(view.prompt_label)}[/dim]",
            str(view.replay_count),
            f"{escape(_short(f'{view.error_class}: {view.error_message}', 160))}\n"
            f"[dim]{escape(request_summary(view, redact))}[/dim]",
        )
    return table


def inspect_json(view: DeadLetterView, redact: bool = True) -> dict[str, Any]:
    """Everything about one dead letter; the request decoded when possible, else escaped bytes."""
    record = view.record
    decoded = view.decoded
    first = view.first_failure_at
    out: dict[str, Any] = {
        "dlq": {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": _iso(record.timestamp_ms),
        },
        "request_id": record.request_id,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "reason": view.reason,
        "stage": view.stage,
        "error_class": view.error_class,
        "error_message": view.error_message,
        "attempts": view.attempts,
        "replay_count": view.replay_count,
        "first_failure_at": first.isoformat() if first else None,
        "consumer_group": view.consumer_group,
        "prompt": view.prompt_label,
        "original": {
            "topic": view.original_topic,
            "partition": view.original_partition,
            "offset": view.original_offset,
            "timestamp": _iso(view.original_timestamp_ms),
        },
        "headers": {
            k: v for k, v in headers_dict(record.headers).items() if not k.startswith(h.DLQ_PREFIX)
        },
        "decoded": decoded.as_json(redact),
        "decode_error": decoded.error,
    }
    if decoded.envelope is None:
        out["raw"] = raw_preview(record.value, redact)
    return out


def _iso(ms: int | None) -> str | None:
    moment = from_ms(ms)
    return moment.isoformat(timespec="milliseconds") if moment else None


def plan_table(the_plan: Plan, now: datetime, title: str, prefix: str = "") -> Table:
    """What a run will do, one row per selected record (topics shown without the prefix)."""
    table = Table(title=title)
    for column in ("source", "age", "action", "request id", "reason", "prompt", "to"):
        table.add_column(column, no_wrap=column in ("source", "request id", "action"))
    table.add_column("note", overflow="fold")
    for item in the_plan.items:
        table.add_row(*plan_row(the_plan, item, now, prefix))
    return table


def _logical(topic: str | None, prefix: str) -> str:
    if topic is None:
        return "-"
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


def plan_row(the_plan: Plan, item: PlanItem, now: datetime, prefix: str = "") -> list[str]:
    action = item.action if the_plan.within_limit(item) else "later (--limit)"
    return [
        f"{_logical(item.ref[0], prefix)}[{item.ref[1]}]@{item.ref[2]}",
        _age(from_ms(item.timestamp_ms), now),
        action,
        str(item.summary.get("request_id", "-")),
        str(item.summary.get("reason", "-")),
        str(item.summary.get("prompt", "-")),
        _logical(item.destination, prefix),
        _short(item.note, 80),
    ]


def plan_json(the_plan: Plan, item: PlanItem) -> dict[str, Any]:
    return {
        "source": {"topic": item.ref[0], "partition": item.ref[1], "offset": item.ref[2]},
        "action": item.action if the_plan.within_limit(item) else "later",
        "destination": item.destination,
        "note": item.note,
        **{k: v for k, v in item.summary.items() if k != "at"},
        "at": _iso(item.timestamp_ms),
    }


def plan_summary(the_plan: Plan, verb: str) -> str:
    later = sum(1 for i in the_plan.items if i.action == "send" and not the_plan.within_limit(i))
    parts = [
        f"{the_plan.to_send} to {verb}",
        f"{the_plan.count('refuse')} refused",
        f"{the_plan.count('recovered')} already sent by an interrupted run",
    ]
    if later:
        parts.append(f"{later} left for a later run (--limit)")
    return (
        f"group {the_plan.group}: scanned {the_plan.scanned} records, "
        f"{len(the_plan.items)} selected: " + ", ".join(parts)
    )


def report_summary(report: RunReport, verb: str) -> str:
    where = ", ".join(f"{t}: {n}" for t, n in sorted(report.by_destination.items())) or "-"
    state = "interrupted" if report.interrupted else "done"
    return (
        f"{state}: {verb} {report.sent} ({where}); refused {report.refused}; "
        f"already sent {report.recovered}; not selected {report.skipped}; "
        f"{report.commits} commits in {report.elapsed_s:.1f}s"
    )
