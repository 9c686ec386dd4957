"""Usage errors in one line: ``error: Missing argument 'PROMPT'. (llmpipe send --help)``.

Typer draws click's usage errors as a five-line box (or three lines without rich); the
README promises one line for every mistake, so the root app runs click in non-standalone
mode and prints the error itself. Help requested by running a group without arguments is
still shown as help.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
import typer.main
from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

# Typer runs its own copy of click; its exceptions are the ones raised.
from typer._click import exceptions as click

from pipeline.cli.console import Commands
from pipeline.errors import LlmpipeError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def settings_error(exc: ValidationError) -> str:
    """One line for bad ``LLMPIPE_*`` variables: which ones, and what is wrong."""
    if exc.title != "Settings":
        return str(exc).replace("\n", " ")
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"LLMPIPE_{where.upper()}: {message}" if where else message)
    return "; ".join(parts)


def kafka_cause(exc: KafkaException) -> str:
    """One line for a failed Kafka call, naming the settings that decide where it went."""
    from pipeline.config import Settings

    settings = Settings()
    error = exc.args[0] if exc.args else None
    text = error.str() if isinstance(error, KafkaError) else str(exc)
    return (
        f"Kafka: {text} (LLMPIPE_BOOTSTRAP_SERVERS={settings.bootstrap_servers}, "
        f"LLMPIPE_TOPIC_PREFIX={settings.topic_prefix!r})"
    )


def run(app: typer.Typer, args: list[str] | None = None) -> NoReturn:
    """Run ``app`` like its ``__call__`` would, with one-line usage errors."""
    command = typer.main.get_command(app)
    try:
        result: Any = command.main(args=args, prog_name="llmpipe", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else None
        hint = f" ({where} --help)" if where else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except LlmpipeError as exc:  # the one-line rule, for commands outside a friendly group
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ValidationError as exc:  # Settings() read a bad LLMPIPE_* variable
        print(f"error: {settings_error(exc)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KafkaException as exc:  # a client call the command did not expect to fail
        error = exc.args[0] if exc.args else None
        invalid = isinstance(error, KafkaError) and error.code() == KafkaError._INVALID_ARG
        print(f"error: {kafka_cause(exc)}", file=sys.stderr)
        # A client librdkafka refused to create (an unreadable key, a wrong key password).
        sys.exit(EXIT_USAGE if invalid else EXIT_FAILED)
    sys.exit(result if isinstance(result, int) else 0)


class Root(Commands):
    """The root ``llmpipe`` app: calling it runs :func:`run`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run(self)
