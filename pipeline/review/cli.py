"""``llmpipe review ...``: serve the UI, manage reviewers, export training data, calibrate.

The lead registers this with ``app.add_typer(review_app, name="review")``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli.console import Commands, err, fail, out
from pipeline.config import Settings

review_app = Commands(
    help="Human review: the review UI, reviewers, corrections and calibration.",
    no_args_is_help=True,
)
users_app = Commands(help="Reviewer accounts (a users file of scrypt hashes).")
review_app.add_typer(users_app, name="users")

SECRET_ENV = "LLMPIPE_REVIEW_SESSION_SECRET"
USERS_ENV = "LLMPIPE_REVIEW_USERS"
DEFAULT_USERS = Path("review-users.txt")


def _secret(secret_file: Path | None) -> bytes:
    """The session key: a file, else the environment, else a random one for this process."""
    if secret_file is not None:
        data = secret_file.read_bytes().strip()
    elif os.environ.get(SECRET_ENV):
        data = os.environ[SECRET_ENV].encode()
    else:
        err.print(
            f"[yellow]warning:[/yellow] no --secret-file or {SECRET_ENV}: using a random "
            "session key, so sessions end when the server restarts"
        )
        return os.urandom(32)
    if len(data) < 32:
        fail("the session secret must be at least 32 bytes")
    return data


@review_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8090,
    db: Annotated[
        str | None, typer.Option(help="Database URL; default: LLMPIPE_REVIEW_DB / Settings.")
    ] = None,
    users: Annotated[
        Path, typer.Option(envvar=USERS_ENV, help="Users file (`review users add`).")
    ] = DEFAULT_USERS,
    lease_minutes: Annotated[float, typer.Option(help="How long a claim lasts.")] = 10.0,
    sla_minutes: Annotated[float, typer.Option(help="Age at which an item is overdue.")] = 60.0,
    secret_file: Annotated[
        Path | None, typer.Option(help=f"Session signing key (or {SECRET_ENV}).")
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(
            envvar="LLMPIPE_REVIEW_INSTANCE",
            help="Instance id, unique per running instance (its Kafka transactional id); "
            "default: generated per process. A configured one stays the same across restarts, "
            "so a restart fences its predecessor's transactions at once.",
        ),
    ] = None,
    cookie_secure: Annotated[
        bool,
        typer.Option(help="Always mark cookies Secure (they are anyway on HTTPS requests)."),
    ] = False,
    idle_minutes: Annotated[
        float, typer.Option(min=1, help="A session unused this long ends.")
    ] = 30.0,
    session_hours: Annotated[
        float, typer.Option(min=0.1, help="No session lasts longer than this.")
    ] = 12.0,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="Address or network of a reverse proxy whose X-Forwarded-For/-Proto "
            "are believed (repeatable). Without it they are ignored."
        ),
    ] = None,
) -> None:
    """Run the review UI: follows llm.review and llm.review.decisions, serves HTTP."""
    import uvicorn
    from starlette.concurrency import run_in_threadpool

    from pipeline.review.app import ReviewConfig, create_app
    from pipeline.review.auth import SessionPolicy, SessionSigner, UsersFile
    from pipeline.review.hardening import HttpLimits, parse_networks
    from pipeline.review.runtime import ReviewRuntime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    users_file = UsersFile(users)
    if not users_file.load():
        fail(f"no reviewers in {users}: add one with `llmpipe review users add NAME`")
    runtime = ReviewRuntime(
        settings,
        db or settings.review_db,
        lease_ms=int(lease_minutes * 60_000),
        sla_ms=int(sla_minutes * 60_000),
        instance=instance,
    )

    async def startup() -> None:
        ready = await run_in_threadpool(runtime.start, 60.0)
        if not ready:
            err.print("[yellow]warning:[/yellow] not caught up with Kafka yet; decisions wait")

    async def shutdown() -> None:
        await run_in_threadpool(runtime.stop)

    try:
        proxies = parse_networks(trusted_proxy or [])
    except ValueError as exc:
        fail(f"--trusted-proxy: {exc}")
    config = ReviewConfig(
        users_file,
        SessionSigner(_secret(secret_file)),
        cookie_secure=cookie_secure,
        sessions=SessionPolicy(
            idle_timeout_s=int(idle_minutes * 60), lifetime_s=int(session_hours * 3600)
        ),
        http=HttpLimits(trusted_proxies=proxies),
    )
    app = create_app(runtime.service, config, on_startup=startup, on_shutdown=shutdown)
    # Forwarding headers are the app's business (only from --trusted-proxy), not uvicorn's.
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Reviewer name (shown in the audit trail).")],
    file: Annotated[Path, typer.Option(envvar=USERS_ENV, help="Users file.")] = DEFAULT_USERS,
    role: Annotated[
        str | None,
        typer.Option(
            help="reviewer (decides) or admin (also manages users and sessions, releases "
            "others' claims, reads the whole audit log). Default: keep, or reviewer."
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input (for scripts).")
    ] = False,
) -> None:
    """Add a reviewer, or set a new password (which ends all their sessions)."""
    from pipeline.review.auth import ROLES, AuthError, UsersFile

    chosen = next((r for r in ROLES if r == role), None)  # typed as a Role, or None
    if role is not None and chosen is None:
        fail(f"--role must be one of {', '.join(ROLES)}")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        new = UsersFile(file).add(
            name,
            password,
            role=chosen,
        )
    except AuthError as exc:
        fail(str(exc))
    err.print(f"{'added' if new else 'updated'} {name} in {file}")


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="Reviewer to remove; their sessions end.")],
    file: Annotated[Path, typer.Option(envvar=USERS_ENV, help="Users file.")] = DEFAULT_USERS,
) -> None:
    """Remove a reviewer: every session of theirs ends on its next request."""
    from pipeline.review.auth import AuthError, UsersFile

    try:
        removed = UsersFile(file).remove(name)
    except AuthError as exc:
        fail(str(exc))
    if not removed:
        fail(f"no user {name!r} in {file}")
    err.print(f"removed {name} from {file}")


@users_app.command("list")
def users_list(
    file: Annotated[Path, typer.Option(envvar=USERS_ENV, help="Users file.")] = DEFAULT_USERS,
) -> None:
    """Reviewers and their roles."""
    from pipeline.review.auth import AuthError, UsersFile

    try:
        users = UsersFile(file).load()
    except AuthError as exc:
        fail(str(exc))
    for user in sorted(users.values(), key=lambda u: u.name):
        typer.echo(f"{user.name}\t{user.role}")


@review_app.command("migrate")
def migrate(
    db: Annotated[
        str | None, typer.Option(help="Database URL; default: LLMPIPE_REVIEW_DB / Settings.")
    ] = None,
) -> None:
    """Bring the review database's schema up to date and list its migrations.

    Every ``serve`` does this on start; run it first to upgrade before a rolling deploy,
    or to see which version a database is at.
    """
    from pipeline.review.store import StoreError, open_store

    try:
        store = open_store(db or Settings().review_db, wait_s=10)
    except StoreError as exc:
        fail(str(exc))
    try:
        for row in store.schema_versions():
            when = datetime.fromtimestamp(row.applied_at_ms / 1000, UTC)
            note = "  (applied now)" if row.version in store.migrated_now else ""
            typer.echo(f"{row.version:>3}  {when:%Y-%m-%d %H:%M:%S} UTC  {row.description}{note}")
    finally:
        store.close()


@review_app.command("export")
def export(
    since: Annotated[
        str | None, typer.Option(help="Only corrections decided at or after this ISO time.")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="Output format: jsonl.")] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Corrections from llm.corrections as chat training data (rendered prompt + fix)."""
    from pipeline.prompts.registry import PromptRegistry
    from pipeline.review.training import read_corrections, training_records

    if format != "jsonl":
        fail(f"unknown format {format!r}; supported: jsonl")
    cutoff = _parse_since(since)
    settings = Settings()
    registry = PromptRegistry.load(settings.prompts_dir)

    def skipped(message: str) -> None:
        err.print(f"[yellow]skipped[/yellow] {message}")

    records = training_records(read_corrections(settings, skipped), registry, cutoff, skipped)
    handle = output.open("w", encoding="utf-8") if output is not None else sys.stdout
    count = 0
    try:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    finally:
        if output is not None:
            handle.close()
    err.print(f"exported {count} correction(s)")


def _parse_since(since: str | None) -> datetime | None:
    if since is None:
        return None
    try:
        value = datetime.fromisoformat(since)
    except ValueError:
        fail(f"--since {since!r} is not an ISO 8601 date or time")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@review_app.command("calibration")
def calibration(
    prompt: Annotated[str, typer.Argument(help="Prompt name.")],
    target: Annotated[
        float, typer.Option(min=0.0001, max=0.5, help="Error rate accepted answers may have.")
    ] = 0.02,
    plots: Annotated[
        Path, typer.Option(help="Directory for the reliability diagram and threshold curve.")
    ] = Path("calibration"),
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Only the table.")] = False,
    db: Annotated[
        str | None, typer.Option(help="Read a review database instead of the topics.")
    ] = None,
    bins: Annotated[int, typer.Option(min=2, max=50, help="Reliability diagram bins.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """How often accepted answers are wrong, per version, from audit and burn-in verdicts."""
    from pipeline.cli.names import check
    from pipeline.prompts.registry import PromptRegistry
    from pipeline.review.calibration import (
        calibrate,
        samples_from_kafka,
        samples_from_rows,
        write_plots,
    )
    from pipeline.review.store import open_store

    settings = Settings()
    registry = PromptRegistry.load(settings.prompts_dir)
    check("prompt", prompt, registry.names())
    if db is not None:
        store = open_store(db)
        try:
            samples = samples_from_rows(store.calibration_rows(prompt))
        finally:
            store.close()
    else:
        samples = samples_from_kafka(settings, prompt)
    report = calibrate(prompt, samples, registry, target=target, bins=bins)
    written = {} if no_plots or as_json else {r.version: write_plots(r, plots) for r in report}
    if as_json:
        typer.echo(json.dumps([calibration_json(r) for r in report], indent=2))
        return
    console = out
    if not report:
        console.print(
            f"no audit or burn-in verdicts for {prompt}: set review.audit.share in its prompt "
            "file, then review some audit items"
        )
        return
    for part in report:
        console.print(calibration_table(part))
        console.print(part.message)
        for path in written.get(part.version, ()):
            console.print(f"  wrote {path}")


def calibration_table(part: Any) -> Table:
    """The same numbers the review UI shows on a prompt's calibration page."""
    from pipeline.review.calibration import shown_rows

    share = f", audit share {part.audit_share:.0%}" if part.audit_share is not None else ""
    title = f"{part.prompt}@{part.version}: accepted answers by threshold{share}"
    table = Table(title=title)
    for column in ("threshold", "accepted", "wrong", "error rate", "95% CI", "kept", ""):
        table.add_column(column, justify="right")
    for row in shown_rows(part):
        low, high = row.accepted.interval
        marks = [
            mark
            for mark, value in (
                ("current", part.current_accept),
                ("recommended", part.recommended),
                ("plausible from", part.plausible_from),
            )
            if value is not None and abs(value - row.threshold) < 1e-9
        ]
        table.add_row(
            f"{row.threshold:.2f}",
            str(row.accepted.n),
            str(row.accepted.errors),
            f"{row.accepted.value:.1%}" if row.accepted.value is not None else "-",
            f"{low:.1%}-{high:.1%}",
            f"{row.coverage:.0%}",
            ", ".join(marks),
        )
    return table


def calibration_json(part: Any) -> dict[str, Any]:
    low, high = part.overall.interval
    return {
        "prompt": part.prompt,
        "version": part.version,
        "target": part.target,
        "verdict": part.verdict,
        "message": part.message,
        "current_accept": part.current_accept,
        "audit_share": part.audit_share,
        "samples": part.overall.n,
        "errors": part.overall.errors,
        "accepted_error_rate": part.overall.value,
        "interval": [low, high],
        "recommended": part.recommended,
        "plausible_from": part.plausible_from,
        "point": part.point,
        "thresholds": [
            {
                "threshold": r.threshold,
                "accepted": r.accepted.n,
                "errors": r.accepted.errors,
                "rate": r.accepted.value,
                "interval": list(r.accepted.interval),
                "coverage": r.coverage,
            }
            for r in part.thresholds
            if r.accepted.n
        ],
    }


if __name__ == "__main__":  # `python -m pipeline.review.cli` before the lead wires it in
    review_app()
