"""``llmpipe prompts ...``: inspect, render, diff, lock and check prompt versions.

Every failure prints one line per problem to stderr and exits non-zero
without a traceback: 1 when the prompts (or the lock) are wrong, which is
what CI gates on, 2 when the command was used wrongly (unknown prompt, bad
``--vars``). The main CLI mounts ``prompts_app``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipeline.prompts.diff import canonical_yaml, diff_versions
from pipeline.prompts.errors import (
    LockFileError,
    PromptLoadError,
    TemplateRenderError,
    UnknownPromptError,
    UnknownPromptVersionError,
)
from pipeline.prompts.lock import LOCK_FILE_NAME, check, lock, read_lock
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import input_errors, render_messages

EXIT_FAILED = 1
EXIT_USAGE = 2

prompts_app = typer.Typer(
    name="prompts",
    help="Versioned prompts: list, show, render, diff, lock and check.",
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


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
        _fail(str(exc), EXIT_FAILED)
    except (UnknownPromptError, UnknownPromptVersionError, TemplateRenderError) as exc:
        _fail(str(exc), EXIT_USAGE)


def _registry(prompts_dir: Path) -> PromptRegistry:
    if not prompts_dir.is_dir():
        _fail(f"prompts directory {prompts_dir} does not exist (see --prompts-dir)", EXIT_USAGE)
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
        _fail(f"--vars is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(parsed, dict):
        _fail("--vars must be a JSON object", EXIT_USAGE)
    with _errors_as_exit_codes():
        prompt = _registry(prompts_dir).get(name, version)
        problems = input_errors(prompt, parsed)
        if problems:
            _fail(f"{prompt.ref}: {'; '.join(problems)}", EXIT_USAGE)
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
