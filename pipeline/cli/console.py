"""Console and exit-code helpers shared by every ``llmpipe`` command.

One rule for errors across all command groups: an :class:`~pipeline.errors.LlmpipeError`
that escapes a command is printed as one ``error:`` line on stderr and ends the process
with its ``exit_code``. :class:`Commands` applies the rule to every command it registers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import LlmpipeError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


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
