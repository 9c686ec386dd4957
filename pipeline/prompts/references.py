"""Function references written in prompt files, and turning them into callables.

A prompt names behaviour it needs (output checks, a rule-based fallback) as
``rules.py:func`` (a file next to the prompt) or ``package.module:func`` (code
shipped with the pipeline). Local files are executed from the exact bytes that
were hashed into the prompt's content hash, not re-read by the import system,
so the code that runs is provably the code that was locked, and no
``__pycache__`` is written into the prompts tree. Local files must be
self-contained (stdlib and installed packages only): sibling imports would be
code the hash does not cover, so they are simply not importable.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*"
_REFERENCE = re.compile(rf"(?P<target>[^:\s]+):(?P<attribute>{_DOTTED})")

CheckFn = Callable[[dict[str, Any], dict[str, Any]], list[str]]
"""``(output, variables) -> errors``; an empty list means the output passes."""

FallbackFn = Callable[[dict[str, Any]], dict[str, Any] | None]
"""``(variables) -> output``; ``None`` means "cannot answer", i.e. human review."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed ``target:attribute``; ``target`` is normalised so equal refs compare equal."""

    target: str
    attribute: str

    @property
    def is_local(self) -> bool:
        return self.target.endswith(".py")


def parse_reference(text: str) -> Reference:
    """Parse and sanity-check a reference; raises ValueError with a message fit for a load error."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a function reference; "
            "expected 'rules.py:function' or 'package.module:function'"
        )
    target = match["target"]
    if target.endswith(".py"):
        posix = PurePosixPath(target)
        if posix.is_absolute() or ".." in posix.parts or "\\" in target:
            raise ValueError(
                f"{text!r}: a local file must be a relative path inside the prompt's directory"
            )
        target = posix.as_posix()
    elif re.fullmatch(_DOTTED, target) is None:
        raise ValueError(f"{text!r}: {target!r} is neither a .py file nor a dotted module path")
    return Reference(target=target, attribute=match["attribute"])


def load_local_module(path: Path, source: bytes) -> types.ModuleType:
    """Execute ``source`` as a module, once per (path, content).

    The module is registered in ``sys.modules`` under a content-derived name
    because dataclasses, pickling and typing introspection look modules up
    there; the same bytes loaded by two registries share one module.
    """
    key = hashlib.sha256(str(path.resolve()).encode() + b"\0" + source).hexdigest()[:24]
    name = f"_llmpipe_prompt_code_{key}"
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    module = types.ModuleType(name)
    module.__file__ = str(path)
    code = compile(source, str(path), "exec", dont_inherit=True)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_reference(
    reference: Reference, base_dir: Path, code: Mapping[Path, bytes]
) -> Callable[..., Any]:
    """Import the reference's target and return the callable it names.

    ``code`` holds the bytes of local files as read for hashing. Any exception
    (syntax error, failing import, missing attribute) propagates: the registry
    turns it into a load error for the referencing field.
    """
    module: types.ModuleType
    if reference.is_local:
        path = base_dir / reference.target
        module = load_local_module(path, code[path])
    else:
        module = importlib.import_module(reference.target)
    target: Any = module
    for part in reference.attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{reference.target}:{reference.attribute} is not callable")
    return cast("Callable[..., Any]", target)
