"""The one Jinja environment used for prompts, shared by load-time checks and rendering.

Templates are trusted repo content but variables are event data, and a
template author can still write something that reaches into Python internals;
the immutable sandbox blocks attribute escapes and in-place mutation of the
event's variables, and StrictUndefined turns a missing variable into an error
instead of silently sending an empty string to the model. Autoescape is off
because prompts are plain text, not HTML; block tags swallow their own line
(trim/lstrip blocks) so a ``{% for %}`` over sources does not leave stray
blank lines in what the model reads.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, Template, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
)


@lru_cache(maxsize=1024)
def template_variables(source: str) -> frozenset[str]:
    """Names a template reads from its context; raises TemplateSyntaxError on bad syntax.

    Used at load time so that a misspelt variable fails the registry load
    rather than the first event that reaches the prompt.
    """
    parsed = ENVIRONMENT.parse(source)
    return frozenset(meta.find_undeclared_variables(parsed) - ENVIRONMENT.globals.keys())


@lru_cache(maxsize=1024)
def compiled(source: str) -> Template:
    """Compile once per distinct template text; versions sharing text share the compiled form."""
    return ENVIRONMENT.from_string(source)
