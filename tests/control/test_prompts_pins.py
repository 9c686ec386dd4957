"""Pins and rollbacks: validated before they are written, undone step by step, refused when moot."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
from confluent_kafka import KafkaException
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.envelopes import ControlEvent
from pipeline.control.pins import (
    ROLLBACK_REASON_PREFIX,
    PinError,
    check_rollback,
    fold,
    pin_value,
    plan_rollback,
)
from pipeline.control.state import pin_key
from pipeline.control.topic import publish, read_history
from pipeline.prompts import PromptRegistry, UnknownPromptVersionError

EXAMPLES = REPO_ROOT / "prompts"
REGISTRY = PromptRegistry.load(EXAMPLES)
NAME = "ticket_triage"
AT = datetime(2024, 5, 1, tzinfo=UTC)
_clock = count()
runner = CliRunner()


def value(version: int, candidate: int | None = None, percent: float = 0.0) -> dict[str, Any]:
    return {"version": version, "candidate": candidate, "canary_percent": percent}


def event(val: Any, reason: str = "because", key: str = pin_key(NAME)) -> ControlEvent:
    return ControlEvent(
        key=key, value=val, actor="ops", reason=reason, at=AT + timedelta(seconds=next(_clock))
    )


def rollback_event(val: Any) -> ControlEvent:
    return event(val, ROLLBACK_REASON_PREFIX + "bad")


def build(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "registry": REGISTRY,
        "name": NAME,
        "version": 1,
        "candidate": None,
        "percent": None,
        "actor": "ops",
        "reason": "v2 over-escalates",
        "at": AT,
    }
    args.update(overrides)
    return pin_value(**args)


def test_pin_value_is_what_workers_read() -> None:
    assert build() == value(1)
    assert build(candidate=2, percent=12.5) == value(1, 2, 12.5)
    assert build(version=2, candidate=1, percent=0) == value(2, 1, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"candidate": 2}, "--candidate needs --percent"),
        ({"percent": 5}, "--percent needs --candidate"),
        ({"candidate": 1, "percent": 5}, "candidate must differ from the pinned version"),
        ({"candidate": 2, "percent": 101}, "canary_percent"),
        ({"reason": "  "}, "--reason must say why"),
        ({"reason": "rollback: sneaky"}, "may not start with 'rollback: '"),
    ],
)
def test_incoherent_pins_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PinError, match=message):
        build(**overrides)


@pytest.mark.parametrize("overrides", [{"version": 9}, {"candidate": 9, "percent": 10}])
def test_pins_of_unknown_versions_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(UnknownPromptVersionError):
        build(**overrides)


def test_rollback_restores_the_previous_pin() -> None:
    history = [event(value(1)), event(value(1, 2, 10)), event(None, key=pin_key("other"))]
    plan = plan_rollback(history, NAME)
    assert (plan.current, plan.value, plan.restores) == (value(1, 2, 10), value(1), history[0])


def test_rollback_without_an_earlier_pin_unpins() -> None:
    plan = plan_rollback([event(value(1))], NAME)
    assert (plan.value, plan.restores) == (None, None)
    before, after = check_rollback(REGISTRY, plan)
    assert before.describe(NAME) == "ticket_triage@1"
    assert after.describe(NAME) == "ticket_triage@3 (newest, unpinned)"


def test_repeated_rollbacks_keep_going_back_never_forward() -> None:
    history = [event(value(1)), event(value(2)), event(value(1, 2, 50))]
    assert plan_rollback(history, NAME).value == value(2)
    history.append(rollback_event(value(2)))
    assert plan_rollback(history, NAME).value == value(1)
    history.append(rollback_event(value(1)))
    assert plan_rollback(history, NAME).value is None
    history.append(rollback_event(None))
    with pytest.raises(PinError, match=r"not pinned .* nothing to roll back"):
        plan_rollback(history, NAME)


def test_a_new_pin_after_a_rollback_is_undone_to_the_restored_value() -> None:
    history = [event(value(1)), event(value(2)), rollback_event(value(1)), event(value(1, 2, 5))]
    assert plan_rollback(history, NAME).value == value(1)


def test_re_pinning_the_same_value_is_not_a_step_back() -> None:
    history = [event(value(2)), event(value(1)), event(value(1), "still bad")]
    assert plan_rollback(history, NAME).value == value(2)


def test_a_rollback_that_restores_a_compacted_entry_is_the_new_base() -> None:
    history = [rollback_event(value(1)), event(value(1, 2, 30))]
    assert plan_rollback(history, NAME).value == value(1)


def test_unreadable_pin_events_are_skipped() -> None:
    history = [event(value(1)), event({"oops": True}), event("garbage"), event(value(2))]
    assert plan_rollback(history, NAME).value == value(1)


def test_nothing_to_roll_back() -> None:
    for history in ([], [event(None)], [event(value(1), key=pin_key("other"))]):
        with pytest.raises(PinError, match="nothing to roll back"):
            plan_rollback(history, NAME)


def test_rollback_that_would_serve_the_same_is_refused() -> None:
    plan = plan_rollback([event(value(3))], NAME)  # unpinning serves @3 too
    with pytest.raises(PinError, match="would still serve ticket_triage@3"):
        check_rollback(REGISTRY, plan)


def test_rollback_to_a_deleted_version_is_refused() -> None:
    plan = plan_rollback([event(value(7)), event(value(1))], NAME)
    with pytest.raises(PinError, match="cannot restore the previous pin: unknown version"):
        check_rollback(REGISTRY, plan)


def test_fold_reports_bad_pins_instead_of_crashing() -> None:
    state, rejected = fold([event(value(1)), event({"no": "version"}, key=pin_key("other"))])
    assert state.pins[NAME].version == 1
    assert [e.key for e in rejected] == ["pin:other"]


# -- the commands, against the real broker -------------------------------------------------


@pytest.fixture
def control(kafka_settings: Settings) -> Settings:
    """Settings whose control topic is readable: a new topic may still lack a leader."""
    deadline = time.monotonic() + 15
    while True:
        try:
            read_history(kafka_settings, timeout_s=2)
            return kafka_settings
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def env(settings: Settings) -> dict[str, str]:
    return {
        "LLMPIPE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
    }


def cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(prompts_app, [*args, "--prompts-dir", str(EXAMPLES)], env=env(settings))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def pins(settings: Settings) -> list[tuple[Any, str, str]]:
    return [(e.value, e.actor, e.reason) for e in read_history(settings) if e.key == pin_key(NAME)]


@pytest.mark.kafka
def test_pin_pins_and_rollback_commands(control: Settings) -> None:
    s = control
    code, _, err = cli(s, "rollback", NAME, "--reason", "panic")
    assert code == 1 and "ticket_triage is not pinned" in err

    code, out, err = cli(s, "pin", NAME, "1", "--reason", "v2 over-escalates", "--actor", "ann")
    assert (code, err) == (0, "")
    assert out.startswith("pinned ticket_triage@1 by ann at ")
    code, out, _ = cli(
        s, "pin", NAME, "1", "--candidate", "2", "--percent", "10", "--reason", "retry v2"
    )
    assert code == 0 and "ticket_triage@1 + canary @2 at 10%" in out
    assert pins(s)[0] == (value(1), "ann", "v2 over-escalates")
    assert pins(s)[1][0] == value(1, 2, 10.0)

    code, out, _ = cli(s, "pins")
    assert code == 0
    assert "@1 (pinned)" in out and "@2 at 10%" in out and "retry v2" in out
    assert "@4 (newest, unpinned)" in out  # the other prompts (invoice_extract, cited_answer)
    code, out, _ = cli(s, "pins", "--history")
    assert code == 0 and out.count("pin:") == 0 and out.count("ticket_triage") == 2

    code, out, _ = cli(s, "rollback", NAME, "--reason", "canary errors", "--actor", "bob")
    assert code == 0
    assert out.startswith(
        "rolled back ticket_triage: ticket_triage@1 + canary @2 at 10% -> ticket_triage@1 "
        "(the pin set by ann at "
    )
    code, out, _ = cli(s, "rollback", NAME, "--reason", "v1 too")
    assert code == 0 and "-> ticket_triage@3 (newest, unpinned) by " in out
    assert [v for v, _, _ in pins(s)] == [value(1), value(1, 2, 10.0), value(1), None]
    assert pins(s)[2][1:] == ("bob", "rollback: canary errors")
    code, _, err = cli(s, "rollback", NAME, "--reason", "again")
    assert code == 1 and "nothing to roll back" in err


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pin", NAME, "9", "--reason", "x"], "unknown version ticket_triage@9"),
        (["pin", "nope", "1", "--reason", "x"], "unknown prompt 'nope'"),
        (["pin", NAME, "1", "--candidate", "2", "--reason", "x"], "--candidate needs --percent"),
        (["pin", NAME, "1", "--reason", ""], "--reason must say why"),
    ],
)
def test_refused_pins_write_nothing(control: Settings, args: list[str], message: str) -> None:
    code, _, err = cli(control, *args)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert read_history(control) == []


@pytest.mark.kafka
def test_pins_warns_about_pins_workers_ignore(control: Settings) -> None:
    publish(control, pin_key(NAME), {"version": "two"}, "ops", "hand-written")
    code, _, err = cli(control, "pins")
    assert code == 0 and "warning: workers ignore pin:ticket_triage" in err
