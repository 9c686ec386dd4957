"""The root of every user-facing error.

Anything a user can fix or must know about (a broken prompt file, an unknown prompt, a bad
setting, a topic that does not exist) derives from :class:`LlmpipeError`, so the CLI has one
rule: print the message as one line and exit with ``exit_code``, never a traceback.
Programming errors and transient infrastructure failures are not LlmpipeErrors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar


class LlmpipeError(Exception):
    """A failure the user should read: one line, then exit ``exit_code``.

    2 (the default) means "the request was wrong" (misuse, unknown name, bad value); a
    subclass sets 1 for "what was checked or attempted failed" (a broken prompt file, a
    scan the broker cut short)."""

    exit_code: ClassVar[int] = 2


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, or ``""``.

    Every refusal of an unknown name (prompt, version, flag, stage, endpoint, reason,
    topic) ends with this, so an operator's typo is answered with the name they meant."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
