"""Which prompt version serves a given event: requested, pinned, canary or latest.

Pure logic: pins arrive on a control topic (wired elsewhere) and are passed
in as a mapping, so the decision is reproducible from (registry, pins, key)
alone, which is what lets an audit record explain why an event got the
version it got.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.prompts.model import PROMPT_NAME_PATTERN, PromptVersion
from pipeline.prompts.registry import PromptRegistry

Arm = Literal["requested", "pinned", "latest", "canary", "control"]

_BUCKETS = 10_000


class Pin(BaseModel):
    """An operator decision to serve ``version`` (optionally canarying ``candidate``).

    ``actor``, ``reason`` and ``at`` are required because a pin changes what
    production answers; it must always be possible to say who did it and why.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PROMPT_NAME_PATTERN)
    version: int = Field(ge=1)
    candidate: int | None = Field(default=None, ge=1)
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    actor: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    at: datetime

    @model_validator(mode="after")
    def _canary_is_coherent(self) -> Pin:
        if self.candidate == self.version:
            raise ValueError("candidate must differ from the pinned version")
        if self.canary_percent > 0 and self.candidate is None:
            raise ValueError("canary_percent needs a candidate")
        return self


@dataclass(frozen=True, slots=True)
class Selection:
    prompt: PromptVersion
    arm: Arm


def canary_bucket(name: str, key: bytes | str) -> int:
    """A stable bucket in [0, 10000) for ``key``.

    Hashing the key (not drawing randomly) keeps every event of one entity
    on the same arm, so a customer never flip-flops between versions and the
    two arms can be compared fairly. The prompt name is mixed in so canaries
    of different prompts do not hit the same customers.
    """
    raw_key = key.encode("utf-8") if isinstance(key, str) else key
    digest = hashlib.sha256(name.encode("utf-8") + raw_key).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def select(
    registry: PromptRegistry,
    pins: Mapping[str, Pin],
    name: str,
    key: bytes | str,
    requested_version: int | None,
) -> Selection:
    """Choose the version for one event.

    An explicit request wins (it is how a caller reproduces an old result),
    and an unknown requested version is an error rather than a silent
    substitution. Otherwise a pin decides; a pin with a candidate splits keys
    into "canary" and "control"; with no pin the newest version serves.
    """
    if requested_version is not None:
        return Selection(registry.get(name, requested_version), "requested")
    pin = pins.get(name)
    if pin is None:
        return Selection(registry.get(name), "latest")
    if pin.candidate is None:
        return Selection(registry.get(name, pin.version), "pinned")
    if canary_bucket(name, key) < pin.canary_percent * 100:
        return Selection(registry.get(name, pin.candidate), "canary")
    return Selection(registry.get(name, pin.version), "control")
