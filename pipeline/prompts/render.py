"""Turning a prompt version plus an event's variables into chat messages.

The output schema is appended to the system message on a line of its own,
``OUTPUT_SCHEMA: <compact JSON>``, so the model sees the exact contract the
validator will enforce (one source of truth instead of a hand-copied schema in
prose), and so the fake model server can find it with a simple line match.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from jinja2.exceptions import SecurityError, UndefinedError
from jsonschema.exceptions import ValidationError as SchemaValidationError

from pipeline.prompts.errors import TemplateRenderError
from pipeline.prompts.fastcheck import certainly_valid
from pipeline.prompts.model import PromptSpec
from pipeline.prompts.templating import compiled

SCHEMA_INSTRUCTION = (
    "Reply with only a JSON object that matches the following JSON Schema, with no other text."
)
SCHEMA_LINE_PREFIX = "OUTPUT_SCHEMA: "


RENDER_CACHE_SIZE = 4096
_rendered: OrderedDict[tuple[int, bytes], tuple[PromptSpec, list[dict[str, str]]]] = OrderedDict()


def render_messages(prompt: PromptSpec, variables: Mapping[str, Any]) -> list[dict[str, str]]:
    """Render every message; raises TemplateRenderError (never a raw Jinja or Python error).

    Variables are not validated here; call ``input_errors`` first. The
    rendering is deterministic, which makes it safe to cache or to hash.

    A request is rendered by the validate stage, again by the model stage and again by
    settle for a re-ask or self-check, usually in the same process: the last
    ``RENDER_CACHE_SIZE`` renderings are kept (keyed by the prompt object and the
    variables' canonical JSON), and each caller gets its own copy of the messages.
    """
    try:
        text = orjson.dumps(variables, option=orjson.OPT_SORT_KEYS)
        if b"null" in text:  # orjson writes NaN and infinities as null too: tell them apart
            text = json.dumps(variables, sort_keys=True).encode()
    except (TypeError, ValueError):  # not JSON (a caller outside the pipeline): no caching
        return _render(prompt, variables)
    key = (id(prompt), text)
    hit = _rendered.get(key)
    if hit is not None and hit[0] is prompt:
        _rendered.move_to_end(key)
        return [dict(m) for m in hit[1]]
    messages = _render(prompt, variables)
    _rendered[key] = (prompt, [dict(m) for m in messages])
    if len(_rendered) > RENDER_CACHE_SIZE:
        _rendered.popitem(last=False)
    return messages


def _render(prompt: PromptSpec, variables: Mapping[str, Any]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for index, message in enumerate(prompt.messages):
        try:
            content = compiled(message.content).render(variables)
        except SecurityError as exc:
            raise TemplateRenderError(
                prompt.ref, f"messages[{index}]: blocked by the sandbox: {exc}"
            ) from exc
        except UndefinedError as exc:
            raise TemplateRenderError(prompt.ref, f"messages[{index}]: {exc}") from exc
        except Exception as exc:  # a template doing arithmetic on bad data, etc.
            raise TemplateRenderError(
                prompt.ref, f"messages[{index}]: {type(exc).__name__}: {exc}"
            ) from exc
        messages.append({"role": message.role, "content": content})

    schema_json = json.dumps(prompt.output_schema, separators=(",", ":"), ensure_ascii=False)
    schema_block = f"{SCHEMA_INSTRUCTION}\n{SCHEMA_LINE_PREFIX}{schema_json}"
    for rendered in messages:
        if rendered["role"] == "system":
            rendered["content"] = f"{rendered['content'].rstrip()}\n\n{schema_block}"
            break
    else:
        messages.insert(0, {"role": "system", "content": schema_block})
    return messages


def input_errors(prompt: PromptSpec, variables: Mapping[str, Any]) -> list[str]:
    """Every way ``variables`` violate the input schema, e.g. "variables.text: 'x' is too short".

    All errors rather than the first, sorted, so a dead-lettered event names
    every problem in a stable order.
    """
    if certainly_valid(prompt.input_schema, variables):
        return []
    errors: list[SchemaValidationError] = list(prompt.input_validator.iter_errors(variables))
    errors.sort(key=lambda e: (e.json_path, e.message))
    return [f"{_location(error.absolute_path)}: {error.message}" for error in errors]


def _location(path: Sequence[str | int]) -> str:
    return "variables" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
