"""Which way the fake model misbehaves for a given request, and how to predict it.

Everything here is a pure function of its inputs so that a test (or the pipeline's own
tests) can compute, before sending a request, exactly what the server will do with it.
The random profile is therefore not random at all: the draw is a hash of the seed and the
last user message, so replaying the same conversation reproduces the same failure, and a
repair prompt (which appends a new user message) gets a fresh, but equally predictable, draw.

Directive syntax (in any message's text, the last one found wins)::

    [[fake:NAME]]  [[fake:NAME:ARG]]  [[fake:NAME:ARG:times=N]]

Header syntax (``x-fake-behavior``)::

    NAME  NAME:ARG  NAME;PARAM=VALUE[;times=N]

``ARG``/``PARAM`` is ``seconds`` for ``slow`` and ``retry_after`` for ``rate_limit``.
``times=N`` limits the directive to the first N requests of a conversation; afterwards the
server behaves as if the directive were absent (so retries can be seen to recover).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BEHAVIORS",
    "Answer",
    "BehaviorSpec",
    "Profile",
    "choose_behavior",
    "draw_fraction",
    "draw_text",
    "find_answer",
    "find_directive",
    "find_output_schema",
    "identity_text",
    "message_text",
    "parse_behavior",
    "parse_profile",
]

BEHAVIORS: frozenset[str] = frozenset(
    {
        "valid",
        "invalid_json",
        "wrong_schema",
        "refusal",
        "hedge",
        "empty",
        "fenced",
        "slow",
        "hang",
        "rate_limit",
        "server_error",
        "reset",
        "garbage",
        "ignore_schema",
    }
)

# The one parameter a behaviour takes, and its default when the caller gives none.
_PARAMS: dict[str, tuple[str, float]] = {
    "slow": ("seconds", 1.0),
    "rate_limit": ("retry_after", 1.0),
}
_MAX_ARG = 86_400.0
_DIRECTIVE = re.compile(r"\[\[fake:([^\]]*)\]\]")
_ANSWER_MARK = "[[answer:"
_SCHEMA_MARK = "OUTPUT_SCHEMA:"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class BehaviorSpec:
    """A parsed behaviour; ``str()`` gives the canonical form used in counters and headers."""

    name: str
    arg: float | None = None
    times: int | None = None

    def __str__(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:{_fmt(self.arg)}"

    @property
    def param(self) -> float:
        """The behaviour's parameter with its default applied (0 for behaviours without one)."""
        if self.arg is not None:
            return self.arg
        return _PARAMS[self.name][1] if self.name in _PARAMS else 0.0


@dataclass(frozen=True)
class Answer:
    """An explicit answer from an ``[[answer:...]]`` block (wrapped so ``null`` is possible)."""

    value: Any


@dataclass(frozen=True)
class Profile:
    """Weighted behaviours; weights are normalised so they need not sum to one."""

    entries: tuple[tuple[BehaviorSpec, float], ...]

    def __str__(self) -> str:
        return ",".join(f"{spec}={_fmt(weight)}" for spec, weight in self.entries)

    def draw(self, fraction: float) -> BehaviorSpec:
        """Map a number in [0, 1) onto a behaviour by cumulative weight."""
        total = sum(weight for _, weight in self.entries)
        point = fraction * total
        acc = 0.0
        for spec, weight in self.entries:
            acc += weight
            if point < acc:
                return spec
        return self.entries[-1][0]

    def weights(self) -> dict[str, float]:
        """Normalised probability of each canonical behaviour, for tests of the distribution."""
        total = sum(weight for _, weight in self.entries)
        return {str(spec): weight / total for spec, weight in self.entries}


ProfileLike = str | Mapping[str, float] | Profile | None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_behavior(text: str) -> BehaviorSpec:
    """Parse ``name``, ``name:arg``, ``name;param=value`` (and ``times=N``); raise ValueError."""
    parts = [p.strip() for p in re.split(r"[:;]", text.strip())]
    name = parts[0].lower()
    if name not in BEHAVIORS:
        raise ValueError(f"unknown fake behaviour {name!r}; known: {', '.join(sorted(BEHAVIORS))}")
    arg: float | None = None
    times: int | None = None
    for part in parts[1:]:
        if not part:
            continue
        key, eq, raw = part.partition("=")
        if not eq:
            key, raw = "", part
        key = key.strip().lower()
        if key == "times":
            try:
                times = int(raw)
            except ValueError:
                raise ValueError(f"times must be an integer, got {raw!r}") from None
            if times < 1:
                raise ValueError("times must be >= 1")
            continue
        if name not in _PARAMS:
            raise ValueError(f"behaviour {name!r} takes no argument, got {part!r}")
        if key and key != _PARAMS[name][0]:
            raise ValueError(f"behaviour {name!r} takes {_PARAMS[name][0]!r}, not {key!r}")
        if arg is not None:
            raise ValueError(f"behaviour {name!r} given more than one argument")
        try:
            arg = float(raw)
        except ValueError:
            raise ValueError(f"argument of {name!r} must be a number, got {raw!r}") from None
        if not math.isfinite(arg) or arg < 0 or arg > _MAX_ARG:
            raise ValueError(f"argument of {name!r} must be within 0..{_MAX_ARG:g}")
    return BehaviorSpec(name, arg, times)


def parse_profile(profile: ProfileLike) -> Profile:
    """Accept ``"valid=0.7,invalid_json=0.3"``, a mapping, or a Profile; empty means all valid."""
    if isinstance(profile, Profile):
        return profile
    items: list[tuple[str, float]] = []
    if profile is None:
        items = []
    elif isinstance(profile, str):
        for chunk in profile.split(","):
            chunk = chunk.strip()
            if not chunk:
                continue
            spec_text, eq, raw_weight = chunk.rpartition("=")
            if not eq:
                spec_text, raw_weight = chunk, "1"
            try:
                items.append((spec_text, float(raw_weight)))
            except ValueError:
                raise ValueError(f"bad weight in profile entry {chunk!r}") from None
    else:
        items = [(str(k), float(v)) for k, v in profile.items()]
    if not items:
        return Profile(((BehaviorSpec("valid"), 1.0),))
    merged: dict[BehaviorSpec, float] = {}
    for spec_text, weight in items:
        spec = parse_behavior(spec_text)
        if spec.times is not None:
            raise ValueError("times=N is not allowed in a profile")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {spec_text!r} must be a finite number >= 0")
        merged[spec] = merged.get(spec, 0.0) + weight
    entries = tuple((spec, weight) for spec, weight in merged.items() if weight > 0)
    if not entries:
        raise ValueError("profile weights sum to zero")
    return Profile(entries)


def message_text(message: Any) -> str:
    """Text of one chat message, whether ``content`` is a string or a list of parts."""
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def _texts(messages: Sequence[Any]) -> list[str]:
    return [message_text(m) for m in messages]


def _role_texts(messages: Sequence[Any], role: str) -> list[str]:
    return [message_text(m) for m in messages if isinstance(m, Mapping) and m.get("role") == role]


def draw_text(messages: Sequence[Any]) -> str:
    """What the profile draw hashes: the last user message (all text if there is none)."""
    users = _role_texts(messages, "user")
    return users[-1] if users else "\n".join(_texts(messages))


def identity_text(messages: Sequence[Any]) -> str:
    """What ``times=N`` counts by: the first user message, which retries and repairs keep."""
    users = _role_texts(messages, "user")
    return users[0] if users else "\n".join(_texts(messages))


def draw_fraction(seed: int, text: str) -> float:
    """A stable number in [0, 1): sha256, not ``hash()``, so it survives process restarts."""
    digest = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "big") / 2.0**64


def find_directive(messages: Sequence[Any]) -> BehaviorSpec | None:
    """The last ``[[fake:...]]`` directive across all messages; ValueError if malformed."""
    found: str | None = None
    for text in _texts(messages):
        for match in _DIRECTIVE.finditer(text):
            found = match.group(1)
    return None if found is None else parse_behavior(found)


def _decode_after(text: str, mark: str, closer: str) -> list[Any]:
    values: list[Any] = []
    start = text.find(mark)
    while start >= 0:
        pos = start + len(mark)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed JSON after {mark!r}: {exc.msg}") from None
        if closer and not text[end:].lstrip().startswith(closer):
            raise ValueError(f"{mark!r} block is not closed with {closer!r}")
        values.append(value)
        start = text.find(mark, end)
    return values


def find_answer(messages: Sequence[Any]) -> Answer | None:
    """The last ``[[answer:JSON]]`` block across all messages; ValueError if malformed."""
    found: list[Any] = []
    for text in _texts(messages):
        if _ANSWER_MARK in text:
            found.extend(_decode_after(text, _ANSWER_MARK, "]]"))
    return Answer(found[-1]) if found else None


def find_output_schema(messages: Sequence[Any]) -> Any | None:
    """``OUTPUT_SCHEMA: {...}`` from system/developer messages first, then any message."""
    preferred = _role_texts(messages, "system") + _role_texts(messages, "developer")
    for pool in (preferred, _texts(messages)):
        found: list[Any] = []
        for text in pool:
            if _SCHEMA_MARK in text:
                found.extend(_decode_after(text, _SCHEMA_MARK, ""))
        if found:
            return found[-1]
    return None


def choose_behavior(profile: ProfileLike, seed: int, messages: Iterable[Any]) -> str:
    """Predict the server's behaviour for ``messages`` (canonical form, e.g. ``"slow:2.5"``).

    Mirrors the server's precedence minus what the messages cannot show: an
    ``x-fake-behavior`` header, a ``/control`` override, and ``times=N`` exhaustion.
    """
    items = list(messages)
    directive = find_directive(items)
    if directive is not None:
        return str(directive)
    return str(parse_profile(profile).draw(draw_fraction(seed, draw_text(items))))
