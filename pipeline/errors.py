"""The root of every user-facing error.

Anything a user can fix or must know about (a broken prompt file, an unknown prompt, a bad
setting, a topic that does not exist) derives from :class:`LlmpipeError`, so the CLI has one
rule: print the message as one line and exit with ``exit_code``, never a traceback.
Programming errors and transient infrastructure failures are not LlmpipeErrors.
"""

from __future__ import annotations

from typing import ClassVar


class LlmpipeError(Exception):
    """A failure the user should read: one line, then exit ``exit_code``.

    2 (the default) means "the request was wrong" (misuse, unknown name, bad value); a
    subclass sets 1 for "what was checked or attempted failed" (a broken prompt file, a
    scan the broker cut short)."""

    exit_code: ClassVar[int] = 2
