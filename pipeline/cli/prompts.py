"""``llmpipe prompts ...``: inspect, test, ship, pin, roll back and shadow prompt versions.

Every failure prints one line per problem to stderr and exits non-zero
without a traceback: 1 when the prompts (or the lock, a test case, Kafka)
are wrong, which is what CI gates on, 2 when the command was used wrongly
(unknown prompt, bad ``--vars``, an incoherent pin). The main CLI mounts
``prompts_app``.

The commands that need Kafka, the stages or a model client import them
inside the command, because the main CLI imports this module on every
start and ``llmpipe prompts list`` should stay instant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.console import EXIT_FAILED, EXIT_USAGE, Commands, fail, out
from pipeline.contract import topology
from pipeline.prompts.diff import canonical_yaml, diff_versions
from pipeline.prompts.errors import (
    LockFileError,
    PromptLoadError,
    TemplateRenderError,
    UnknownPromptError,
    UnknownPromptVersionError,
)
from pipeline.prompts.lock import LOCK_FILE_NAME, check, lock, read_lock
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import input_errors, render_messages

prompts_app = Commands(
    name="prompts",
    help="Versioned prompts: list, show, render, diff, test, lock, check, pin, roll back, shadow.",
    no_args_is_help=True,
    add_completion=False,
)

PromptsDir = Annotated[
    Path,
    typer.Option(
        "--prompts-dir",
        envvar="LLMPIPE_PROMPTS_DIR",
        help="Directory holding <name>/v<N>.yaml files and prompts.lock.",
    ),
]
VersionOption = Annotated[
    int | None, typer.Option("--version", help="Version number; default: the newest.")
]
LiveEndpoint = Annotated[
    str | None,
    typer.Option("--endpoint", help="OpenAI-compatible base URL for --live (ends in /v1)."),
]


@contextmanager
def _errors_as_exit_codes() -> Iterator[None]:
    """Map the typed errors to exit codes so no command can leak a traceback for them."""
    try:
        yield
    except PromptLoadError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except LockFileError as exc:
        fail(str(exc), EXIT_FAILED)
    except (UnknownPromptError, UnknownPromptVersionError, TemplateRenderError) as exc:
        fail(str(exc), EXIT_USAGE)


def _registry(prompts_dir: Path) -> PromptRegistry:
    if not prompts_dir.is_dir():
        fail(f"prompts directory {prompts_dir} does not exist (see --prompts-dir)", EXIT_USAGE)
    return PromptRegistry.load(prompts_dir)


@prompts_app.command("list")
def list_command(prompts_dir: PromptsDir = Path("prompts")) -> None:
    """List every prompt version with its model, lock status and hash."""
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        locked = read_lock(prompts_dir / LOCK_FILE_NAME)
    rows = [("PROMPT", "MODEL", "LOCK", "HASH", "DESCRIPTION")]
    for prompt in registry:
        released = locked.get(prompt.ref)
        status = "new" if released is None else "CHANGED"
        if released == prompt.content_hash:
            status = "released"
        hash_prefix = prompt.content_hash[:19]
        rows.append((prompt.ref, prompt.model.model, status, hash_prefix, prompt.description))
    # Plain aligned columns rather than a boxed table: greppable, and never wrapped.
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]))


@prompts_app.command("show")
def show_command(
    name: str, version: VersionOption = None, prompts_dir: PromptsDir = Path("prompts")
) -> None:
    """Print a version in canonical form with its hash and source file."""
    with _errors_as_exit_codes():
        prompt = _registry(prompts_dir).get(name, version)
    typer.echo(f"# {prompt.ref}  {prompt.content_hash}  {prompt.source_path}")
    typer.echo(canonical_yaml(prompt), nl=False)


@prompts_app.command("render")
def render_command(
    name: str,
    version: VersionOption = None,
    variables: Annotated[
        str, typer.Option("--vars", help="Template variables as a JSON object.")
    ] = "{}",
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Print the chat messages a version produces for the given variables, as JSON."""
    try:
        parsed: Any = json.loads(variables)
    except json.JSONDecodeError as exc:
        fail(f"--vars is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(parsed, dict):
        fail("--vars must be a JSON object", EXIT_USAGE)
    with _errors_as_exit_codes():
        prompt = _registry(prompts_dir).get(name, version)
        problems = input_errors(prompt, parsed)
        if problems:
            fail(f"{prompt.ref}: {'; '.join(problems)}", EXIT_USAGE)
        messages = render_messages(prompt, parsed)
    typer.echo(json.dumps(messages, indent=2, ensure_ascii=False))


@prompts_app.command("diff")
def diff_command(name: str, old: int, new: int, prompts_dir: PromptsDir = Path("prompts")) -> None:
    """Show what changes between two versions of a prompt."""
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        text = diff_versions(registry.get(name, old), registry.get(name, new))
    typer.echo(text or f"{name}@{old} and {name}@{new} do not differ", nl=not text)


@prompts_app.command("lock")
def lock_command(prompts_dir: PromptsDir = Path("prompts")) -> None:
    """Record the hash of every version not yet in prompts.lock (existing entries never change)."""
    with _errors_as_exit_codes():
        added = lock(_registry(prompts_dir), prompts_dir / LOCK_FILE_NAME)
    if not added:
        typer.echo("prompts.lock is up to date; nothing to add")
    for ref in added:
        typer.echo(f"locked {ref}")


@prompts_app.command("check")
def check_command(prompts_dir: PromptsDir = Path("prompts")) -> None:
    """Verify every prompt loads and no released version changed; exits 1 on failure."""
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        violations = check(registry, prompts_dir / LOCK_FILE_NAME)
    for violation in violations:
        typer.echo(str(violation), err=True)
    errors = [v for v in violations if v.severity == "error"]
    if errors:
        raise typer.Exit(EXIT_FAILED)
    count = sum(1 for _ in registry)
    typer.echo(f"ok: {count} prompt versions load; no released version changed")
    for prompt in registry:
        typer.echo(f"{prompt.ref}: {_structured_output_note(prompt)}")


def _structured_output_note(prompt: PromptVersion) -> str:
    """How ``json_schema`` mode will send this version's schema, and why (one line)."""
    override = prompt.model.structured_output
    mode = (
        f"structured_output {override} (prompt)" if override else "structured_output per endpoint"
    )
    return f"{mode}; json_schema would be {prompt.strict_output.explain()}"


@prompts_app.command("test")
def test_command(
    name: Annotated[str | None, typer.Argument(help="Prompt name; default: every prompt.")] = None,
    version: VersionOption = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Call a real model instead of replaying recorded answers: --endpoint, else "
            "LLMPIPE_MODEL_BASE_URL when set, else the local SmolLM2 (make model-server).",
        ),
    ] = False,
    endpoint: LiveEndpoint = None,
    repeat: Annotated[
        int, typer.Option("--repeat", min=1, help="Live runs per case (models are not stable).")
    ] = 1,
    min_rate: Annotated[
        float,
        typer.Option(
            "--min-rate",
            min=0.0,
            max=1.0,
            help="Live: exit 1 when a case passes in fewer than this share of its runs.",
        ),
    ] = 1.0,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Also write a JUnit XML report here.")
    ] = None,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Run every test case through the pipeline's stage code; exits 1 on any failure.

    Offline by default: each case's recorded model_answer is the model's reply
    (to re-asks too), so the run is deterministic and needs no server. With
    --live each case's variables go to a real model --repeat times, and the report
    says per version how often each case ended on its expected route, so two
    versions can be compared on the same model before one ships.
    """
    import asyncio

    from pipeline.evaluation.prompt_tests import (
        CaseResult,
        case_rates,
        rates_table,
        results_table,
        run_tests,
        selected_versions,
        summary_line,
        version_rates,
        write_junit,
    )

    if version is not None and name is None:
        fail("--version needs a prompt NAME", EXIT_USAGE)
    if not live and (endpoint is not None or repeat > 1):
        fail("--endpoint and --repeat need --live", EXIT_USAGE)
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        versions = selected_versions(registry, name, version)
    if not any(prompt.tests for prompt in versions):
        fail(f"no test cases in {', '.join(p.ref for p in versions)}", EXIT_FAILED)
    console = out
    if not live:
        results = asyncio.run(run_tests(registry, versions))
        console.print(results_table(results, "prompt tests (recorded answers)"))
        _finish(results, junit, summary_line, write_junit)
        return

    async def run_live(settings: Any) -> list[list[CaseResult]]:
        from pipeline.evaluation.harness import live_client

        client = live_client(settings)
        try:
            return [
                await run_tests(registry, versions, client, settings.model_timeout_s)
                for _ in range(repeat)
            ]
        finally:
            await client.aclose()

    with _live_settings(endpoint) as (settings, where):
        runs = asyncio.run(run_live(settings))
    rates = case_rates(runs, versions)
    console.print(rates_table(rates, f"prompt tests (live: {where}, {repeat} runs per case)"))
    for ref, (on_route, passed) in version_rates(rates).items():
        typer.echo(f"{ref}: on expected route {on_route:.0%}, passed {passed:.0%}")
    if junit is not None:
        write_junit(junit, [r for run in runs for r in run])
    below = [r for r in rates if r.pass_rate < min_rate]
    for rate in below:
        typer.echo(
            f"FAIL {rate.prompt} {rate.case!r}: passed {rate.passed}/{rate.runs}, "
            f"below --min-rate {min_rate:g}",
            err=True,
        )
    if below:
        raise typer.Exit(EXIT_FAILED)


def _finish(results: Any, junit: Path | None, summary_line: Any, write_junit: Any) -> None:
    if junit is not None:
        write_junit(junit, results)
    for result in results:
        if not result.passed:
            typer.echo(f"FAIL {result.prompt} {result.case!r}: {result.reason}", err=True)
    typer.echo(summary_line(results))
    if any(not r.passed for r in results):
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def _live_settings(endpoint: str | None) -> Iterator[tuple[Any, str]]:
    """Settings for a live run and a name for where it runs; starts (and stops) the
    local model server when nothing else was named."""
    import os

    from pipeline.config import Settings
    from pipeline.llm.local_server import (
        STRUCTURED_OUTPUT_MODE,
        LocalModelUnavailable,
        running_local_model,
    )

    if endpoint is not None:
        yield Settings(model_base_url=endpoint), endpoint
        return
    if os.environ.get("LLMPIPE_MODEL_BASE_URL"):
        settings = Settings()
        yield settings, settings.model_base_url
        return
    with ExitStack() as stack:
        try:
            local = stack.enter_context(running_local_model())
        except LocalModelUnavailable as exc:
            fail(f"no live endpoint: pass --endpoint URL or {exc}", EXIT_USAGE)
        overrides: dict[str, Any] = {"model_base_url": local.url, "model_timeout_s": 120.0}
        if not os.environ.get("LLMPIPE_MODEL_STRUCTURED_OUTPUT"):
            overrides["model_structured_output"] = STRUCTURED_OUTPUT_MODE
        yield Settings(**overrides), f"local {local.model} at {local.url}"


@prompts_app.command("stats")
def stats_command(
    name: Annotated[str | None, typer.Argument(help="Prompt name; default: every prompt.")] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only results since, e.g. 1h, 30m, 2d or an ISO time."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version.")] = False,
) -> None:
    """Cost, latency, fallback and review rates per prompt version, from llm.results.

    Reads the results topic under LLMPIPE_TOPIC_PREFIX up to its current end, without
    committing anything.
    """

    from pipeline.cli.names import check_prompt_filter
    from pipeline.cli.trace import parse_since
    from pipeline.config import Settings
    from pipeline.evaluation.stats import prompt_stats, read_results, stats_json, stats_table
    from pipeline.transport.reader import ScanError

    check_prompt_filter(Settings(), name, None)
    since_ms = None
    if since is not None:
        try:
            since_ms = int(parse_since(since).timestamp() * 1000)
        except ValueError as exc:
            fail(f"--since: {exc}", EXIT_USAGE)
    with _kafka_errors():
        try:
            results, undecodable = read_results(Settings(), since_ms)
        except ScanError as exc:
            fail(str(exc), EXIT_FAILED)
    table = prompt_stats(results, name)
    if as_json:
        for row in table:
            typer.echo(json.dumps(stats_json(row)))
    else:
        out.print(stats_table(table))
    if undecodable:
        typer.echo(f"warning: {undecodable} records on llm.results are not results", err=True)
    if not table:
        typer.echo("no results" + (f" for {name}" if name else ""), err=True)


@prompts_app.command("eval")
def eval_command(
    name: Annotated[str, typer.Argument(help="Prompt name.")],
    dataset: Annotated[
        Path, typer.Option("--dataset", help="Labelled JSONL: variables + expected fields.")
    ],
    version: VersionOption = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Call a real model (--endpoint, else LLMPIPE_MODEL_BASE_URL, else the local "
            "SmolLM2 server); without it, replay each case's recorded model_answer.",
        ),
    ] = False,
    endpoint: LiveEndpoint = None,
    target: Annotated[
        float, typer.Option("--target", help="Delivered error the suggestion must meet.")
    ] = 0.1,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write eval.md, eval.json and curve.png."),
    ] = None,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Coverage, accepted and delivered error, review share and each confidence component's
    contribution per version and accept threshold, on a labelled dataset; suggests the
    threshold and weights that meet --target. Each version also runs with its components
    switched off (the baseline), replaying the same model answers."""
    import asyncio

    from pipeline.evaluation.evaluate import (
        DatasetError,
        evaluate,
        load_dataset,
        markdown,
        report,
        write_report,
    )
    from pipeline.evaluation.prompt_tests import selected_versions

    if not 0.0 <= target <= 1.0:
        fail("--target is a share between 0 and 1", EXIT_USAGE)
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        versions = selected_versions(registry, name, version)
    try:
        cases = load_dataset(dataset)
    except DatasetError as exc:
        fail(str(exc), EXIT_USAGE)

    if not live and endpoint is not None:
        fail("--endpoint needs --live", EXIT_USAGE)

    async def run_live(settings: Any) -> dict[str, Any]:
        from pipeline.evaluation.harness import live_client

        client = live_client(settings)
        try:
            evaluation = await evaluate(registry, versions, cases, client, settings.model_timeout_s)
        finally:
            await client.aclose()
        return report(evaluation, target)

    try:
        if live:
            with _live_settings(endpoint) as (settings, where):
                typer.echo(f"evaluating against {where}", err=True)
                data = asyncio.run(run_live(settings))
        else:
            data = report(asyncio.run(evaluate(registry, versions, cases, None)), target)
    except DatasetError as exc:
        fail(str(exc), EXIT_USAGE)
    typer.echo(markdown(data))
    try:
        written = write_report(data, out or Path(".llmpipe") / "eval" / name)
    except ImportError as exc:
        fail(f"the curve needs matplotlib (pip install 'llmpipe[dev]'): {exc}", EXIT_FAILED)
    typer.echo("wrote " + ", ".join(str(p) for p in written))


Actor = Annotated[
    str | None,
    typer.Option("--actor", help="Who is making the change; default: the OS user name."),
]
Reason = Annotated[str, typer.Option("--reason", help="Why; recorded in the control event.")]


@contextmanager
def _kafka_errors() -> Iterator[None]:
    """Broker trouble is an environment failure (exit 1) with one line, not a traceback."""
    from confluent_kafka import KafkaException

    from pipeline.transport.reader import ScanError

    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: an exit already decided stays as is
        raise
    except ScanError as exc:  # its message names the cause and the setting already
        fail(str(exc), EXIT_FAILED)
    except (KafkaException, TimeoutError, RuntimeError, LookupError) as exc:
        fail(f"Kafka: {exc} (LLMPIPE_BOOTSTRAP_SERVERS, LLMPIPE_TOPIC_PREFIX)", EXIT_FAILED)


@prompts_app.command("pin")
def pin_command(
    name: str,
    version: int,
    reason: Reason,
    candidate: Annotated[
        int | None, typer.Option("--candidate", help="Canary this version next to VERSION.")
    ] = None,
    percent: Annotated[
        float | None,
        typer.Option("--percent", help="Share of keys (0-100) the candidate serves."),
    ] = None,
    actor: Actor = None,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Serve VERSION of NAME on every worker (optionally canarying --candidate), live."""
    from pipeline.config import Settings
    from pipeline.contract.envelopes import utc_now
    from pipeline.control.pins import PinError, pin_value, serving
    from pipeline.control.state import pin_key
    from pipeline.control.topic import default_actor, publish

    who = actor or default_actor()
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        try:
            value = pin_value(registry, name, version, candidate, percent, who, reason, utc_now())
        except PinError as exc:
            fail(str(exc), EXIT_USAGE)
        released = read_lock(prompts_dir / LOCK_FILE_NAME)
    for pinned in {version, candidate} - {None}:
        if f"{name}@{pinned}" not in released:
            typer.echo(
                f"warning: {name}@{pinned} is not in {LOCK_FILE_NAME} (not released)", err=True
            )
    with _kafka_errors():
        event, written = publish(Settings(), pin_key(name), value, who, reason)
    typer.echo(
        f"pinned {serving(registry, name, value).describe(name)} "
        f"by {event.actor} at {event.at.isoformat()}: {reason} (written to {written})"
    )


@prompts_app.command("rollback")
def rollback_command(
    name: str,
    reason: Reason,
    actor: Actor = None,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Undo NAME's last pin change, live: restore the pin before it, or unpin if none.

    Each rollback steps one pin further back, never forward; see
    ``pipeline.control.pins`` for why, and for what it refuses.
    """
    from pipeline.config import Settings
    from pipeline.control.pins import (
        ROLLBACK_REASON_PREFIX,
        PinError,
        check_rollback,
        plan_rollback,
    )
    from pipeline.control.state import pin_key
    from pipeline.control.topic import publish, read_history

    if not reason.strip():
        fail("--reason must say why (it is recorded with the rollback)", EXIT_USAGE)
    settings = Settings()
    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        registry.versions(name)
    with _kafka_errors():
        history = read_history(settings)
    try:
        plan = plan_rollback(history, name)
        before, after = check_rollback(registry, plan)
    except PinError as exc:
        fail(str(exc), EXIT_FAILED)
    with _kafka_errors():
        event, written = publish(
            settings, pin_key(name), plan.value, actor, ROLLBACK_REASON_PREFIX + reason
        )
    restored = ""
    if plan.restores is not None:
        restored = (
            f" (the pin set by {plan.restores.actor} at {plan.restores.at.isoformat()}: "
            f"{plan.restores.reason or '-'})"
        )
    typer.echo(
        f"rolled back {name}: {before.describe(name)} -> {after.describe(name)}{restored} "
        f"by {event.actor} at {event.at.isoformat()} (written to {written})"
    )


@prompts_app.command("pins")
def pins_command(
    history: Annotated[
        bool, typer.Option("--history", help="List every pin event still on the topic.")
    ] = False,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Show what each prompt serves now, read from the control topic like a worker does."""
    from rich.table import Table

    from pipeline.config import Settings
    from pipeline.control.pins import fold, pin_events
    from pipeline.control.topic import read_history

    with _kafka_errors():
        events = read_history(Settings())
    console = out
    if history:
        table = Table(title="pin events (oldest first)")
        for column in ("at", "prompt", "value", "actor", "reason"):
            table.add_column(column, overflow="fold")
        for event in pin_events(events):
            value = "unpin" if event.value is None else json.dumps(event.value)
            table.add_row(event.at.isoformat(), event.key[4:], value, event.actor, event.reason)
        console.print(table)
        return
    state, rejected = fold(events)
    pins = state.pins
    names = sorted(set(pins))
    newest: dict[str, int] = {}
    if prompts_dir.is_dir():
        with _errors_as_exit_codes():
            registry = PromptRegistry.load(prompts_dir)
        newest = {n: registry.get(n).version for n in registry.names()}
        names = sorted(set(names) | set(newest))
    table = Table(title="prompt serving")
    for column in ("prompt", "serves", "canary", "pinned by", "at", "reason"):
        table.add_column(column, overflow="fold")
    for prompt in names:
        pin = pins.get(prompt)
        if pin is None:
            table.add_row(prompt, f"@{newest[prompt]} (newest, unpinned)", "-", "-", "-", "-")
            continue
        canary = f"@{pin.candidate} at {pin.canary_percent:g}%" if pin.candidate else "-"
        table.add_row(
            prompt, f"@{pin.version} (pinned)", canary, pin.actor, pin.at.isoformat(), pin.reason
        )
    console.print(table)
    for event in rejected:
        typer.echo(
            f"warning: workers ignore {event.key} = {event.value!r} (not a valid pin)", err=True
        )


@prompts_app.command("shadow")
def shadow_command(
    name: str,
    candidate: Annotated[int, typer.Option("--candidate", help="Version to evaluate.")],
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Replay this many most recent requests.")
    ] = 50,
    scan: Annotated[
        int,
        typer.Option("--scan", min=1, help="Read at most this many messages back per partition."),
    ] = 5_000,
    samples: Annotated[
        int, typer.Option("--samples", min=0, help="Differing outputs to show.")
    ] = 5,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Model calls in flight.")
    ] = 8,
    prompts_dir: PromptsDir = Path("prompts"),
) -> None:
    """Replay recent requests of NAME on --candidate and compare with what served; writes nothing.

    Reads llm.stage.validated and the outcome topics without committing, calls
    the model at LLMPIPE_MODEL_BASE_URL, and produces no message anywhere.
    """
    import asyncio

    from pipeline.config import Settings
    from pipeline.control.pins import fold
    from pipeline.control.topic import read_history
    from pipeline.evaluation.harness import live_client
    from pipeline.evaluation.shadow import ShadowReport, report_renderable, shadow_run

    with _errors_as_exit_codes():
        registry = _registry(prompts_dir)
        registry.get(name, candidate)
    settings = Settings()
    with _kafka_errors():
        # Honour production's endpoint kill switches: a shadow run must not call a model
        # endpoint that operators switched off.
        control, _ = fold(read_history(settings))

    async def run() -> ShadowReport:
        client = live_client(settings, control)
        try:
            return await shadow_run(
                settings, registry, name, candidate, limit, client, scan, samples, concurrency
            )
        finally:
            await client.aclose()

    with _kafka_errors():
        report = asyncio.run(run())
    if report.serving.requests == 0:
        fail(f"no recent requests for {name} on {settings.topic(topology.VALIDATED)}", EXIT_FAILED)
    out.print(report_renderable(report))
