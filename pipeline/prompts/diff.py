"""Readable differences between two prompt versions, for review and for ``show``.

Each version is rendered as canonical YAML (keys sorted, multi-line prompt
text as literal blocks), section by section, and the two are diffed line by
line. Canonical form means reformatting a file produces no diff, matching
the content hash. Test cases are left out: they describe behaviour, they do
not change it. Referenced rules files appear by digest so a code-only change
is visible too.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from pipeline.prompts.model import PromptVersion

_SECTIONS = (
    "description",
    "model",
    "messages",
    "input_schema",
    "output_schema",
    "rules",
    "confidence",
    "fallback",
    "reask",
)


class _BlockDumper(yaml.SafeDumper):
    """Dumps multi-line strings as ``|`` blocks so prompt text diffs line by line."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def canonical_yaml(prompt: PromptVersion) -> str:
    """The behaviour-defining sections of ``prompt`` as stable, human-readable YAML."""
    data = prompt.model_dump(mode="json", include=set(_SECTIONS))
    # Messages keep role before content: sorted keys would put the prompt text first.
    data["messages"] = [{"role": m.role, "content": m.content} for m in prompt.messages]
    sections = [
        (name, data[name] if name == "messages" else _sorted(data[name])) for name in _SECTIONS
    ]
    if prompt.code_files:
        sections.append(("code_files", _sorted(prompt.code_files)))
    return "".join(
        yaml.dump(
            {name: value},
            Dumper=_BlockDumper,
            sort_keys=False,
            allow_unicode=True,
            width=4096,  # never fold a line: a folded sentence diffs as several lines
            default_flow_style=False,
        )
        for name, value in sections
    )


def diff_versions(a: PromptVersion, b: PromptVersion) -> str:
    """A unified diff from ``a`` to ``b``; empty when they behave identically."""
    lines = difflib.unified_diff(
        canonical_yaml(a).splitlines(),
        canonical_yaml(b).splitlines(),
        fromfile=f"{a.ref} ({a.source_path})",
        tofile=f"{b.ref} ({b.source_path})",
        lineterm="",
    )
    text = "\n".join(lines)
    return f"{text}\n" if text else ""


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value
