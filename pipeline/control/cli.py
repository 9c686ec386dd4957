"""``llmpipe flags``: kill switches and feature flags, live on every worker via llm.control."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.console import Commands, fail, out
from pipeline.cli.names import check_flag_scope
from pipeline.config import Settings
from pipeline.control.state import FLAG_DEFAULTS, KNOWN_FLAGS, flag_key
from pipeline.control.topic import current_state, publish

flags_app = Commands(
    help="Kill switches and flags, applied by every worker within seconds.", no_args_is_help=True
)

Scope = Annotated[
    str | None, typer.Option(help="Prompt name or model endpoint the flag applies to.")
]


def _key(name: str, scope: str | None) -> str:
    try:
        return flag_key(name, scope)
    except ValueError as exc:
        fail(str(exc))


@flags_app.command("list")
def list_flags(
    history: Annotated[
        bool,
        typer.Option(
            "--history",
            help="Every flag event still on the topic, oldest first, including the ones "
            "cleared with `default` (who switched what, when and why).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per flag.")] = False,
) -> None:
    """Every flag set on the control topic, with who set it, when and why."""
    from pipeline.control.topic import read_history

    settings = Settings()
    if history:
        events = [e for e in read_history(settings) if e.key.startswith("flag:")]
    else:
        events = [e for e in current_state(settings).events() if e.key.startswith("flag:")]
    if as_json:
        for event in events:
            row = {"flag": event.key[5:], "value": event.value, "actor": event.actor}
            row |= {"at": event.at.isoformat(), "reason": event.reason}
            typer.echo(json.dumps(row))
        return
    title = "flag events (oldest first)" if history else "flags (unset flags have their defaults)"
    table = Table(title=title)
    for column in ("flag", "value", "set by", "at", "reason"):
        table.add_column(column)
    for event in events:
        value = "default (cleared)" if event.value is None else str(event.value).lower()
        table.add_row(event.key[5:], value, event.actor, event.at.isoformat(), event.reason)
    out.print(table)
    defaults = ", ".join(f"{name}={str(value).lower()}" for name, value in FLAG_DEFAULTS.items())
    out.print(f"defaults: {defaults}")


@flags_app.command("get")
def get_flag(
    name: Annotated[str, typer.Argument(help=f"One of {', '.join(KNOWN_FLAGS)}.")],
    scope: Scope = None,
) -> None:
    """The value every worker applies now."""
    _key(name, scope)
    settings = Settings()
    check_flag_scope(settings, name, scope)
    value = current_state(settings).flag(name, scope)
    out.print(str(value).lower())


@flags_app.command("set")
def set_flag(
    name: Annotated[str, typer.Argument(help=f"One of {', '.join(KNOWN_FLAGS)}.")],
    value: Annotated[str, typer.Argument(help="on/off, true/false, or 'default' to clear.")],
    reason: Annotated[str, typer.Option(help="Why: recorded in the event (required).")],
    scope: Scope = None,
    actor: Annotated[str | None, typer.Option(help="Who (default: the OS user).")] = None,
) -> None:
    """Set a flag; `default` removes the setting so the default applies again."""
    key = _key(name, scope)
    lowered = value.lower()
    parsed: bool | None
    if lowered in ("on", "true", "1", "yes"):
        parsed = True
    elif lowered in ("off", "false", "0", "no"):
        parsed = False
    elif lowered == "default":
        parsed = None
    else:
        fail(f"value must be on/off/true/false/default, not {value!r}")
    if not reason.strip():
        fail("--reason must say why")
    settings = Settings()
    if parsed is not None:  # clearing a setting is always allowed, even for a removed name
        check_flag_scope(settings, name, scope)
    event, written = publish(settings, key, parsed, actor, reason)
    out.print(
        f"{event.key} = {str(event.value).lower()} (by {event.actor} at "
        f"{event.at.isoformat()}; written to {written})",
        soft_wrap=True,
    )
