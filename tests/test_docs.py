"""The README's configuration table is the one generated from the settings class."""

from __future__ import annotations

from pipeline.config import REPO_ROOT, settings_table

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def test_readme_config_table_matches_settings() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == settings_table(), "regenerate with: python -m pipeline.config"


def test_readme_lists_exactly_the_reason_codes_the_cli_accepts() -> None:
    """`dlq --reason` checks names against pipeline.contract.reasons; the README is the list
    operators read, so the two must be the same."""
    import re

    from pipeline.contract.reasons import DEAD_LETTER_REASONS, ESCALATION_REASONS

    readme = (REPO_ROOT / "README.md").read_text()
    dead = readme.split("Dead-letter reasons:", 1)[1].split("Fallback and review reasons:", 1)
    listed_dead = set(re.findall(r"`([a-z_]+)`", dead[0]))
    escalation = dead[1].split("A risk rule that raises", 1)
    listed_escalation = set(re.findall(r"`([a-z_]+)`", escalation[0]))
    assert listed_dead | {"risk_rule_failed"} == set(DEAD_LETTER_REASONS)
    assert "`risk_rule_failed`" in escalation[1][:200]
    assert listed_escalation == set(ESCALATION_REASONS)


def test_fake_model_docs_cover_every_behaviour_and_route() -> None:
    """docs/fake-model.md is the only description of the fake server's knobs."""
    from pipeline.harness.fakellm.behaviors import BEHAVIORS

    doc = (REPO_ROOT / "docs" / "fake-model.md").read_text()
    table = doc.split("## Behaviours", 1)[1].split("##", 1)[0]
    import re

    documented = {m.split(":")[0].strip("[") for m in re.findall(r"^\| `([^`]+)`", table, re.M)}
    assert documented == set(BEHAVIORS)
    server = (REPO_ROOT / "pipeline" / "harness" / "fakellm" / "server.py").read_text()
    for route in re.findall(r"`(?:GET|POST|GET` / `POST) (/[a-z/_]+)`", doc):
        assert f'"{route}"' in server, route
    for directive in ("[[fake:NAME]]", "[[answer:JSON]]", "x-fake-behavior", "times=N"):
        assert directive in doc


DOCS = [
    "README.md",
    *sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs").glob("*.md")),
]


SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "&"}


def documented_commands() -> list[tuple[str, int, list[str]]]:
    """Every ``llmpipe ...`` command line in the code blocks of the README and docs/*.md:
    (file, line, arguments after ``llmpipe``), continuation lines joined, comments and what
    follows a shell operator dropped."""
    import shlex

    found = []
    for name in DOCS:
        lines = (REPO_ROOT / name).read_text().split("\n")
        fenced = False
        index = 0
        while index < len(lines):
            line, number = lines[index], index + 1
            index += 1
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            command = line.strip().removeprefix("$ ")
            if not fenced or not command.startswith("llmpipe "):
                continue
            while command.endswith("\\") and index < len(lines):
                command = command[:-1] + " " + lines[index].strip()
                index += 1
            words = shlex.split(command, comments=True)
            ends = [i for i, w in enumerate(words) if w in SHELL_OPERATORS]
            found.append((name, number, words[1 : ends[0]] if ends else words[1:]))
    return found


def test_every_documented_command_is_a_valid_invocation() -> None:
    """Each example parses against the real CLI: the command exists, every option and
    argument is accepted and has the right type (nothing runs; the commands that need a
    broker or a model are exercised by their own tests)."""
    import typer.main
    from typer._click import exceptions as click

    from pipeline.cli.main import app

    commands = documented_commands()
    assert len(commands) >= 40, "the docs lost their examples, or the parser broke"
    root = typer.main.get_command(app)
    wrong = []
    for name, line, args in commands:
        command, rest, path = root, list(args), ["llmpipe"]
        while rest and hasattr(command, "commands") and rest[0] in command.commands:
            path.append(rest[0])
            command = command.commands[rest.pop(0)]
        try:
            if hasattr(command, "commands"):
                raise click.UsageError(f"no command after {' '.join(path)}")
            command.make_context(" ".join(path), rest)
        except click.ClickException as exc:
            wrong.append(f"{name}:{line}: llmpipe {' '.join(args)}: {exc.format_message()}")
    assert not wrong, "\n".join(wrong)
