"""``llmpipe dlq ...``: stats, inspect, replay and reparse dead letters.

The main CLI mounts :data:`dlq_app` as ``llmpipe dlq``; ``python -m pipeline.dlq`` runs it
standalone. Connection settings come from the usual ``LLMPIPE_*`` environment variables,
so these commands act on exactly the topics the workers use. Exit codes: 0 done,
1 a broker or delivery problem (safe to run again: the run resumes), 2 a usage problem
(bad option, changed selection for an existing group), 130 interrupted (resumable).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.cli.console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Commands,
    err,
    fail,
    out,
)
from pipeline.config import Settings
from pipeline.contract.topology import DLQ, STAGES
from pipeline.dlq import engine
from pipeline.dlq.model import DeadLetterView, Filter, build_filter
from pipeline.dlq.render import (
    inspect_json,
    inspect_table,
    plan_json,
    plan_summary,
    plan_table,
    report_summary,
    stats_tables,
)
from pipeline.dlq.replay import DEFAULT_MAX_REPLAYS, REPLAY_SOURCE
from pipeline.dlq.stats import collect
from pipeline.transport.reader import ScanError, scan

dlq_app = Commands(
    name="dlq",
    help="Dead letters: see why requests failed, then replay or re-parse them safely.",
    no_args_is_help=True,
    add_completion=False,
)

Reasons = Annotated[
    list[str] | None,
    typer.Option("--reason", help="Only this reason (x-dlq-reason); repeatable."),
]
Stages = Annotated[
    list[str] | None,
    typer.Option("--stage", help="Only dead letters of this stage; repeatable."),
]
PromptName = Annotated[str | None, typer.Option("--prompt", help="Only this prompt name.")]
PromptVersion = Annotated[
    int | None,
    typer.Option("--version", help="Only this prompt version."),
]
Since = Annotated[
    str | None,
    typer.Option(
        "--since", help="Dead-lettered at or after: ISO 8601 (UTC if no zone) or an age (2h)."
    ),
]
Until = Annotated[
    str | None, typer.Option("--until", help="Dead-lettered before: ISO 8601 or an age.")
]
RequestIds = Annotated[
    list[str] | None,
    typer.Option("--request-id", help="Only this request id (header, else key); repeatable."),
]
Grep = Annotated[
    str | None,
    typer.Option("--grep", help="Case-insensitive text in the error class or message."),
]
AsJson = Annotated[bool, typer.Option("--json", help="JSON lines instead of tables.")]


def _group_option(default: str) -> Any:
    return typer.Option(
        "--group",
        help=f"Consumer group that remembers how far runs got (default: {default}, after "
        "LLMPIPE_TOPIC_PREFIX). Name it after the incident; a new selection needs a new group.",
    )


ReplayGroup = Annotated[str | None, _group_option("llmpipe.dlq-replay")]
ReparseGroup = Annotated[str | None, _group_option("llmpipe.dlq-reparse")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="List what would be sent; produce and commit nothing.")
]
Rate = Annotated[
    float | None, typer.Option("--rate", help="At most this many messages per second.")
]
Limit = Annotated[
    int | None, typer.Option("--limit", min=1, help="At most this many in this run (oldest first).")
]
FromBeginning = Annotated[
    bool,
    typer.Option(
        "--from-beginning",
        help="Forget the group's position and rescan from the start (selected messages that "
        "this group already sent are sent again).",
    ),
]


def _settings() -> Settings:
    return Settings()


def _filter(
    reason: list[str] | None,
    stage: list[str] | None,
    prompt: str | None,
    version: int | None,
    since: str | None,
    until: str | None,
    request_id: list[str] | None,
    grep: str | None,
) -> Filter:
    from pipeline.cli.names import check_prompt_filter, check_reasons, check_stages

    check_reasons(reason or ())
    check_stages(stage or ())
    check_prompt_filter(_settings(), prompt, version, reason or ())
    try:
        return build_filter(
            reasons=reason or (),
            stages=stage or (),
            prompt=prompt,
            version=version,
            since=since,
            until=until,
            request_ids=request_id or (),
            grep=grep,
        )
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


@contextmanager
def _errors() -> Iterator[None]:
    """Known failures become one line and an exit code, never a traceback."""
    try:
        yield
    except engine.SelectionChanged as exc:
        fail(str(exc), EXIT_USAGE)
    except (engine.EngineError, ScanError) as exc:
        fail(str(exc), EXIT_FAILED)


@contextmanager
def _stoppable() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM finish the current message, flush, commit and exit: a clean resume point."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _views(settings: Settings, selection: Filter) -> Iterator[DeadLetterView]:
    for record in scan(settings, [settings.topic(DLQ)], selection.since_ms):
        view = DeadLetterView(record)
        if selection.matches(view.facts()):
            yield view


def replay_records(settings: Settings, since_ms: int) -> Counter[tuple[str, int, int]]:
    """Per dead letter (topic, partition, offset): the messages replays sent from it, found
    by their markers on the stages' input topics (where a replay sends by default)."""
    topics = sorted({settings.topic(stage.input_topic) for stage in STAGES.values()})
    found = engine.count_markers(settings, topics, REPLAY_SOURCE, since_ms)
    counts: Counter[tuple[str, int, int]] = Counter()
    for (_, topic, partition, offset), n in found.items():
        counts[(topic, partition, offset)] += n
    return counts


@dlq_app.command("stats")
def stats_command(
    reason: Reasons = None,
    stage: Stages = None,
    prompt: PromptName = None,
    version: PromptVersion = None,
    since: Since = None,
    until: Until = None,
    request_id: RequestIds = None,
    grep: Grep = None,
    as_json: AsJson = False,
) -> None:
    """Counts by reason, stage, prompt version and age, oldest first."""
    selection = _filter(reason, stage, prompt, version, since, until, request_id, grep)
    settings = _settings()
    now = datetime.now(UTC)
    with _errors():
        stats = collect(scan(settings, [settings.topic(DLQ)], selection.since_ms), selection, now)
        if stats.first_ms is not None:
            stats.count_replays(replay_records(settings, stats.first_ms))
    if as_json:
        out.print_json(json.dumps(stats.as_dict(now)))
        return
    for table in stats_tables(stats, now):
        out.print(table)


@dlq_app.command("inspect")
def inspect_command(
    reason: Reasons = None,
    stage: Stages = None,
    prompt: PromptName = None,
    version: PromptVersion = None,
    since: Since = None,
    until: Until = None,
    request_id: RequestIds = None,
    grep: Grep = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")] = 50,
    as_json: AsJson = False,
    redact: Annotated[
        bool,
        typer.Option(
            "--redact/--no-redact", help="Mask personal data and secrets in shown requests."
        ),
    ] = True,
) -> None:
    """Show dead letters: why each failed and what the caller sent (decoded, or escaped bytes)."""
    selection = _filter(reason, stage, prompt, version, since, until, request_id, grep)
    settings = _settings()
    shown: list[DeadLetterView] = []
    with _errors():
        for view in _views(settings, selection):
            if as_json:
                sys.stdout.write(json.dumps(inspect_json(view, redact), default=str) + "\n")
            else:
                shown.append(view)
            limit -= 1
            if limit <= 0:
                break
    if not as_json:
        if shown:
            out.print(inspect_table(shown, datetime.now(UTC), redact))
        else:
            err.print("no dead letters match", highlight=False)


def _progress_bar(total: int, verb: str) -> tuple[Progress, Callable[[engine.RunReport], None]]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
    )
    task = progress.add_task(verb, total=total, counts="")

    def update(report: engine.RunReport) -> None:
        progress.update(
            task,
            completed=report.sent + report.recovered,
            counts=f"sent {report.sent} refused {report.refused} skipped {report.skipped}",
        )

    return progress, update


def _run(
    settings: Settings,
    selector: engine.Selector,
    *,
    sources: list[str],
    group: str,
    verb: str,
    dry_run: bool,
    rate: float | None,
    limit: int | None,
    since_ms: int | None,
    from_beginning: bool,
    as_json: bool,
) -> None:
    """The part replay and reparse share: plan, show, then execute with a progress bar."""
    if rate is not None and rate <= 0:
        fail("--rate must be positive", EXIT_USAGE)
    now = datetime.now(UTC)
    with _errors():
        the_plan = engine.plan(
            settings,
            selector,
            sources=sources,
            group=group,
            limit=limit,
            since_ms=since_ms,
            from_beginning=from_beginning,
            dry_run=dry_run,
        )
    for warning in the_plan.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if dry_run:
        if as_json:
            for item in the_plan.items:
                sys.stdout.write(json.dumps(plan_json(the_plan, item), default=str) + "\n")
        elif the_plan.items:
            out.print(plan_table(the_plan, now, f"dry run: {verb}", settings.topic_prefix))
        err.print(
            f"dry run, nothing produced: {plan_summary(the_plan, verb)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    err.print(plan_summary(the_plan, verb), highlight=False, soft_wrap=True)
    progress, update = _progress_bar(the_plan.to_send + the_plan.count("recovered"), verb)
    with _stoppable() as stop, _errors(), progress:
        report = engine.execute(
            settings, selector, the_plan, rate=rate, stop=stop, on_progress=update
        )
    if as_json:
        sys.stdout.write(json.dumps({"group": group, **report.as_dict()}) + "\n")
    err.print(report_summary(report, verb), highlight=False, soft_wrap=True)
    if report.interrupted:
        err.print(
            "interrupted: run the same command again to continue", highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_INTERRUPTED)


@dlq_app.command("replay")
def replay_command(
    reason: Reasons = None,
    stage: Stages = None,
    prompt: PromptName = None,
    version: PromptVersion = None,
    since: Since = None,
    until: Until = None,
    request_id: RequestIds = None,
    grep: Grep = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Send here (a topic name; the prefix is added) instead of the topic each "
            "dead letter came from.",
        ),
    ] = None,
    dry_run: DryRun = False,
    rate: Rate = None,
    limit: Limit = None,
    max_replays: Annotated[
        int,
        typer.Option(
            "--max-replays", min=1, help="Refuse dead letters already replayed this many times."
        ),
    ] = DEFAULT_MAX_REPLAYS,
    force: Annotated[bool, typer.Option("--force", help="Replay even past --max-replays.")] = False,
    group: ReplayGroup = None,
    from_beginning: FromBeginning = False,
    as_json: AsJson = False,
) -> None:
    """Send selected dead letters back to their stage: resumable, never twice, poison-guarded."""
    from pipeline.cli.names import check_topic
    from pipeline.dlq.replay import ReplaySelector

    if to is not None:
        check_topic(to)
    selection = _filter(reason, stage, prompt, version, since, until, request_id, grep)
    settings = _settings()
    group_name = group or settings.group("dlq-replay")
    selector = ReplaySelector(
        settings, selection, group=group_name, to=to, max_replays=max_replays, force=force
    )
    _run(
        settings,
        selector,
        sources=[settings.topic(DLQ)],
        group=group_name,
        verb="replay",
        dry_run=dry_run,
        rate=rate,
        limit=limit,
        since_ms=selection.since_ms,
        from_beginning=from_beginning,
        as_json=as_json,
    )


@dlq_app.command("reparse")
def reparse_command(
    reason: Annotated[
        list[str] | None,
        typer.Option(
            "--reason",
            help="Reasons to re-parse (default: invalid_output, refusal, low_confidence; "
            "settle-stage dead letters of any reason); repeatable.",
        ),
    ] = None,
    prompt: PromptName = None,
    version: PromptVersion = None,
    since: Since = None,
    until: Until = None,
    request_id: RequestIds = None,
    grep: Grep = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="dlq, results and/or review (default: all); repeatable."),
    ] = None,
    prompts_dir: Annotated[
        Path | None,
        typer.Option(
            "--prompts-dir",
            envvar="LLMPIPE_PROMPTS_DIR",
            help="Prompt files with the current rules (default: the configured directory).",
        ),
    ] = None,
    dry_run: DryRun = False,
    rate: Rate = None,
    limit: Limit = None,
    group: ReparseGroup = None,
    from_beginning: FromBeginning = False,
    as_json: AsJson = False,
) -> None:
    """Settle stored completions again with today's rules: no model call, ever."""
    from pipeline.control.topic import current_state
    from pipeline.dlq.reparse import REPARSE_REASONS, SOURCES, ReparseSelector
    from pipeline.prompts.errors import PromptLoadError
    from pipeline.prompts.registry import PromptRegistry

    sources = source or list(SOURCES)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        fail(f"unknown --source {', '.join(unknown)}; choose from dlq, results, review", 2)
    selection = _filter(reason, None, prompt, version, since, until, request_id, grep)
    settings = _settings()
    if prompts_dir is not None:
        settings = settings.model_copy(update={"prompts_dir": prompts_dir})
    try:
        registry = PromptRegistry.load(settings.prompts_dir)
    except PromptLoadError as exc:
        fail(f"cannot load prompts from {settings.prompts_dir}: {exc}", EXIT_USAGE)
    group_name = group or settings.group("dlq-reparse")
    with _errors():
        control = current_state(settings)
    selector = ReparseSelector(
        settings,
        selection,
        group=group_name,
        registry=registry,
        control=control,
        sources=sources,
        reasons=frozenset(reason) if reason else REPARSE_REASONS,
    )
    _run(
        settings,
        selector,
        sources=selector.source_topics,
        group=group_name,
        verb="re-parse",
        dry_run=dry_run,
        rate=rate,
        limit=limit,
        since_ms=selection.since_ms,
        from_beginning=from_beginning,
        as_json=as_json,
    )


def main(argv: list[str] | None = None) -> Any:
    return dlq_app(args=argv, prog_name="llmpipe dlq")
