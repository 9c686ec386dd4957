"""Reading one ``v<N>.yaml`` file into a ``PromptVersion``.

The YAML dialect is deliberately narrower than PyYAML's default: timestamps
stay strings (``due_date: 2024-03-01`` must compare equal to the model's JSON
string, not become a ``datetime.date``), mapping keys must be strings (YAML 1.1
reads ``on:``/``yes:`` as booleans), and duplicate keys are errors instead of
"last one wins", which would hide exactly the kind of edit mistakes the strict
models exist to catch.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError

from pipeline.prompts.errors import LoadProblem, PromptLoadError
from pipeline.prompts.hashing import canonical_json, content_hash, file_digest
from pipeline.prompts.model import FileIdentity, PromptSpec, PromptVersion

VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.yaml")


class _PromptYamlLoader(yaml.SafeLoader):
    """SafeLoader minus timestamps, plus duplicate/non-string key errors."""


_PromptYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _PromptYamlLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key: Hashable = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise ConstructorError(
                None, None, f"mapping key {key!r} is not a string", key_node.start_mark
            )
        if key in mapping:
            raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node)
    return mapping


_PromptYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def parse_yaml(path: Path) -> Any:
    """Parse one prompt file; raises PromptLoadError naming the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptLoadError([LoadProblem(path, "", f"cannot read file: {exc}")]) from exc
    try:
        return yaml.load(text, Loader=_PromptYamlLoader)
    except yaml.YAMLError as exc:
        raise PromptLoadError(
            [LoadProblem(path, "", f"invalid YAML: {_yaml_message(exc)}")]
        ) from exc


def load_prompt_file(path: Path, code_cache: dict[Path, bytes]) -> PromptVersion:
    """Parse, validate and hash one file; raises PromptLoadError listing all of its problems.

    ``code_cache`` is shared across a registry load so a rules file used by
    several versions is read once and every version hashes the same bytes
    that will later be executed.
    """
    match = VERSION_FILE.fullmatch(path.name)
    if match is None:
        raise PromptLoadError([LoadProblem(path, "", "prompt files must be named v<N>.yaml")])
    document = parse_yaml(path)
    if not isinstance(document, Mapping):
        found = "an empty file" if document is None else type(document).__name__
        raise PromptLoadError([LoadProblem(path, "", f"expected a mapping, found {found}")])
    try:
        canonical = canonical_json(document)
    except (TypeError, ValueError) as exc:
        raise PromptLoadError([LoadProblem(path, "", f"not representable as JSON: {exc}")]) from exc
    identity = FileIdentity(name=path.parent.name, version=int(match[1]))
    try:
        spec = PromptSpec.model_validate(document, context=identity)
    except ValidationError as exc:
        raise PromptLoadError([_problem(path, error) for error in exc.errors()]) from exc

    code: dict[str, bytes] = {}
    problems: list[LoadProblem] = []
    for field, reference in spec.references():
        if not reference.is_local:
            continue
        file = path.parent / reference.target
        if file not in code_cache:
            try:
                code_cache[file] = file.read_bytes()
            except OSError as exc:
                problems.append(
                    LoadProblem(path, field, f"cannot read {reference.target}: {exc.strerror}")
                )
                continue
        code[reference.target] = code_cache[file]
    if problems:
        raise PromptLoadError(problems)

    return PromptVersion.model_construct(
        _fields_set=spec.model_fields_set | {"source_path", "content_hash", "code_files"},
        **dict(spec),
        source_path=path,
        content_hash=content_hash(canonical, code),
        code_files={target: file_digest(data) for target, data in sorted(code.items())},
    )


def _problem(path: Path, error: Mapping[str, Any]) -> LoadProblem:
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (misspelt, or not part of the prompt format)"
    elif error["type"] not in ("missing", "value_error"):
        shown = repr(error["input"])
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return LoadProblem(path, field.removeprefix("."), message)


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem and exc.problem_mark:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc)
