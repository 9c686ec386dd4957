"""Console and exit-code helpers shared by every ``llmpipe`` command.

One rule for errors across all command groups: an :class:`~pipeline.errors.LlmpipeError`
that escapes a command is printed as one ``error:`` line on stderr and ends the process
with its ``exit_code``. :class:`Commands` applies the rule to every command it registers.

One rule for tables: identifiers (request ids, topics, ``prompt@version``, models) are
never cut off. Rich shortens a word that does not fit its column with an ellipsis; every
table printed through :data:`out` or :data:`err` folds instead (the whole value, over
several lines), at any width. Off a terminal, with no ``COLUMNS`` set, the width is
:data:`PIPE_WIDTH` rather than Rich's 80, so rows stay whole in logs and pipes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from pipeline.errors import LlmpipeError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PIPE_WIDTH = 200
F = TypeVar("F", bound=Callable[..., Any])


def unclipped(renderable: Any) -> Any:
    """``renderable`` with every column of every table in it set to fold, not cut."""
    if isinstance(renderable, Table):
        for column in renderable.columns:
            column.overflow = "fold"
            column.no_wrap = False
            for cell in column.cells:
                unclipped(cell)
    elif isinstance(renderable, Group):
        for part in renderable.renderables:
            unclipped(part)
    return renderable


class UnclippedConsole(Console):
    """A Rich console that folds table cells (see the module docstring)."""

    def __init__(self, *, stderr: bool = False) -> None:
        stream = sys.stderr if stderr else sys.stdout
        wide = not stream.isatty() and "COLUMNS" not in os.environ
        super().__init__(stderr=stderr, width=PIPE_WIDTH if wide else None)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(unclipped(o) for o in objects), **kwargs)


out = UnclippedConsole()
err = UnclippedConsole(stderr=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, then exit ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly(func: F) -> F:
    """Turn an escaping :class:`LlmpipeError` into one line and its exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LlmpipeError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


class Commands(typer.Typer):
    """A Typer app whose every command follows the one-line error rule."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)

        def decorator(func: F) -> F:
            register(friendly(func))
            return func

        return decorator
