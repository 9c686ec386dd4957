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

# Typer runs its own copy of click; its exceptions are the ones raised.
from typer._click import exceptions as click

from pipeline.cli.console import Commands
from pipeline.errors import LlmpipeError

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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
    except KafkaException as exc:  # a client call the command did not expect to fail
        print(f"error: {kafka_cause(exc)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(result if isinstance(result, int) else 0)


class Root(Commands):
    """The root ``llmpipe`` app: calling it runs :func:`run`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run(self)
