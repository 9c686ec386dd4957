"""The command line: help everywhere, user mistakes as one clear line, compose in step."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.config import REPO_ROOT, Settings


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Typer may ship its own copy of click, so groups are recognised by shape."""
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found.append(path)
        if hasattr(command, "commands"):
            found.extend(_commands(command, path))
    return found


ALL = _commands(typer.main.get_command(app))  # type: ignore[arg-type]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_every_command_has_help() -> None:
    assert len(ALL) >= 15
    runner = CliRunner()
    for path in ALL:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output and "--help" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("send", "ticket_triage", "--vars", "{not json"), "--vars is not JSON"),
        (("worker", "--stages", "validate,bogus"), "unknown stages"),
        (("flags", "set", "force_review", "on", "--reason", "x"), "needs a scope"),
        (("flags", "set", "nope", "on", "--reason", "x"), "unknown flag"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(args: tuple[str, ...], fragment: str) -> None:
    result = _run(*args)
    assert result.returncode == 2, result
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_compose_uses_real_settings_and_commands() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    env = compose["x-llmpipe-env"]
    known = {f"LLMPIPE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("LLMPIPE_")} <= known
    top_level = {path[0] for path in ALL}
    for name, service in compose["services"].items():
        if service.get("build") and service.get("command"):
            entry = service.get("entrypoint", ["llmpipe"])[1:]
            assert (*entry, *service["command"])[0] in top_level, f"{name}: unknown command"


def test_compose_examples_run_real_commands() -> None:
    """Each `docker compose run --rm SERVICE ARGS` example in the compose file, with that
    service's entrypoint (the image's is `llmpipe`), is a command the CLI has."""
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    examples = re.findall(r"docker compose run --rm (\S+) ([^#\n]*)", text)
    assert any(service == "review" for service, _ in examples)
    runner = CliRunner()
    for service, rest in examples:
        entry = services[service].get("entrypoint", ["llmpipe"])
        assert entry[0] == "llmpipe", service
        words = [*entry[1:], *rest.split()]
        path = [w for w in words if not w.startswith("-")]
        while path and tuple(path) not in ALL:
            path.pop()
        assert path, f"{service} {rest}: no llmpipe command"
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (service, rest, result.output)


def test_every_table_goes_through_the_console_that_folds() -> None:
    """Tables are printed by `pipeline.cli.console.out`/`err`, which fold every column
    instead of cutting identifiers (issue #19); a command building its own Rich console
    would cut them again."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in sorted((REPO_ROOT / "pipeline").rglob("*.py"))
        if path != REPO_ROOT / "pipeline" / "cli" / "console.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bConsole\(", line)
    ]
    assert not offenders, offenders


def test_the_console_folds_a_long_identifier_in_a_narrow_table() -> None:
    import io

    from rich.table import Table

    from pipeline.cli.console import UnclippedConsole

    console = UnclippedConsole()
    console.file = io.StringIO()
    console.width = 30
    table = Table()
    table.add_column("request id", no_wrap=True)
    table.add_column("prompt")
    table.add_row("demo-5471-000043-0123456789abcdef", "ticket_triage@3")
    console.print(table)
    text = console.file.getvalue()
    assert "…" not in text, text
    joined = "".join(line.split("│")[1].strip() for line in text.splitlines() if "│" in line)
    assert joined == "demo-5471-000043-0123456789abcdef", text
