"""Serving selection: requested beats pinned beats latest; canary shares are stable per key."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import REPO_ROOT
from pipeline.prompts import (
    Pin,
    PromptRegistry,
    UnknownPromptError,
    UnknownPromptVersionError,
    canary_bucket,
    select,
)

EXAMPLES = REPO_ROOT / "prompts"
REGISTRY = PromptRegistry.load(EXAMPLES)
NAME = "ticket_triage"


def pin(**overrides: Any) -> Pin:
    fields: dict[str, Any] = {
        "name": NAME,
        "version": 1,
        "actor": "oncall@example.com",
        "reason": "v2 over-escalates",
        "at": datetime(2024, 5, 1, tzinfo=UTC),
    }
    fields.update(overrides)
    return Pin(**fields)


def test_latest_serves_without_pin() -> None:
    selection = select(REGISTRY, {}, NAME, "customer-1", None)
    assert (selection.prompt.ref, selection.arm) == ("ticket_triage@3", "latest")


def test_pin_overrides_latest() -> None:
    selection = select(REGISTRY, {NAME: pin()}, NAME, "customer-1", None)
    assert (selection.prompt.ref, selection.arm) == ("ticket_triage@1", "pinned")


def test_pin_for_another_prompt_is_ignored() -> None:
    pins = {"cited_answer": pin(name="cited_answer")}
    assert select(REGISTRY, pins, NAME, "k", None).arm == "latest"


def test_requested_version_wins_over_pin_and_canary() -> None:
    pins = {NAME: pin(version=2, candidate=1, canary_percent=100)}
    selection = select(REGISTRY, pins, NAME, "customer-1", 2)
    assert (selection.prompt.ref, selection.arm) == ("ticket_triage@2", "requested")


def test_unknown_requested_version_is_an_error_not_a_substitution() -> None:
    with pytest.raises(UnknownPromptVersionError):
        select(REGISTRY, {}, NAME, "k", 9)
    with pytest.raises(UnknownPromptError):
        select(REGISTRY, {}, "nope", "k", None)


def test_stale_pin_is_an_error() -> None:
    with pytest.raises(UnknownPromptVersionError):
        select(REGISTRY, {NAME: pin(version=5)}, NAME, "k", None)


@pytest.mark.parametrize("percent", [10, 50, 90])
def test_canary_share_is_within_two_points(percent: float) -> None:
    pins = {NAME: pin(version=1, candidate=2, canary_percent=percent)}
    keys = [f"customer-{i}" for i in range(1000)]
    arms = [select(REGISTRY, pins, NAME, key, None) for key in keys]
    canary = [s for s in arms if s.arm == "canary"]
    assert abs(len(canary) / 10 - percent) <= 2
    assert {s.prompt.version for s in canary} == {2}
    assert {s.prompt.version for s in arms if s.arm == "control"} == {1}


@pytest.mark.parametrize(("percent", "arm"), [(0, "control"), (100, "canary")])
def test_canary_extremes(percent: float, arm: str) -> None:
    pins = {NAME: pin(candidate=2, canary_percent=percent)}
    assert {select(REGISTRY, pins, NAME, str(i), None).arm for i in range(200)} == {arm}


@given(key=st.one_of(st.binary(max_size=64), st.text(max_size=64)), percent=st.floats(0, 100))
def test_same_key_always_gets_the_same_arm(key: bytes | str, percent: float) -> None:
    pins = {NAME: pin(candidate=2, canary_percent=percent)}
    first = select(REGISTRY, pins, NAME, key, None)
    assert all(select(REGISTRY, pins, NAME, key, None) == first for _ in range(3))


@given(key=st.text(max_size=64), low=st.floats(0, 100), high=st.floats(0, 100))
def test_raising_the_share_only_moves_keys_into_the_canary(
    key: str, low: float, high: float
) -> None:
    low, high = sorted((low, high))
    low_arm = select(REGISTRY, {NAME: pin(candidate=2, canary_percent=low)}, NAME, key, None).arm
    high_arm = select(REGISTRY, {NAME: pin(candidate=2, canary_percent=high)}, NAME, key, None).arm
    assert not (low_arm == "canary" and high_arm == "control")


@given(key=st.text(max_size=64))
def test_bucket_is_in_range_and_str_equals_utf8_bytes(key: str) -> None:
    bucket = canary_bucket(NAME, key)
    assert 0 <= bucket < 10_000
    assert bucket == canary_bucket(NAME, key.encode("utf-8"))


def test_bucket_matches_the_documented_formula() -> None:
    digest = hashlib.sha256(b"ticket_triage" + b"order-42").digest()
    assert canary_bucket(NAME, b"order-42") == int.from_bytes(digest[:8], "big") % 10_000


@pytest.mark.parametrize(
    "overrides",
    [
        {"candidate": 1},
        {"canary_percent": 10},
        {"canary_percent": 101, "candidate": 2},
        {"actor": ""},
        {"version": 0},
        {"unexpected": True},
    ],
)
def test_incoherent_pins_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        pin(**overrides)


def test_pin_round_trips_through_json() -> None:
    original = pin(candidate=2, canary_percent=12.5)
    assert Pin.model_validate_json(original.model_dump_json()) == original
