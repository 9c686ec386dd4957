"""The crash scenario's one excuse, without a broker: a request whose model work a freeze
caught half done may change its reason on its expected outcome; nothing else may."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from bench import chaos
from pipeline.harness.fakellm.server import CallTally
from pipeline.harness.ledger import Ledger, Sighting
from pipeline.harness.scenarios import PlannedRequest


def _planned(rid: str, fault: str) -> PlannedRequest:
    return PlannedRequest(rid, rid.encode(), b"", [], fault)


def _review(reason: str) -> Sighting:
    return Sighting("llm.review", "review", reason, b"", {})


def _calls(started: int) -> dict[str, CallTally]:
    return {"chat": CallTally(started=started, ended=started)}


def test_half_done_is_in_flight_or_some_but_not_all_of_the_epochs_calls() -> None:
    baseline = {"retrying": _calls(3), "done": _calls(3), "redone": _calls(1), "idle": _calls(1)}
    at_freeze = {"retrying": _calls(2), "done": _calls(3), "redone": _calls(2), "idle": _calls(1)}
    epoch_start = {"redone": _calls(1), "idle": _calls(1)}  # "idle" made no call this epoch
    in_flight = {"hanging": 1, "answered": 0}

    assert chaos.half_done(in_flight, at_freeze, epoch_start, baseline) == {"retrying", "hanging"}
    assert chaos.half_done(in_flight, at_freeze, epoch_start, None) == {"hanging"}


def test_only_a_changed_reason_on_the_expected_outcome_of_a_half_done_request_is_excused() -> None:
    planned = [_planned(rid, "hedge") for rid in ("half", "moved", "other", "fine")]
    ledger = Ledger({p.request_id for p in planned})
    ledger.seen = {
        "half": [_review("invalid_output")],  # reason changed, half done: excused
        "moved": [Sighting("llm.dlq", "dead_letter", "low_confidence", b"", {})],  # outcome
        "other": [_review("invalid_output")],  # reason changed, not half done
        "fine": [_review("low_confidence")],
    }

    outcome = chaos.ChaosOutcome.from_ledger(
        "kill_run", "at_least_once", planned, ledger, [], under_way_at_freeze={"half", "moved"}
    )

    assert outcome.wrong_route == 2
    assert outcome.details["wrong_route_by_fault"] == {
        "hedge->dead_letter/low_confidence": 1,
        "hedge->review/invalid_output": 1,
    }
    assert outcome.details["reasons_changed_by_freeze"] == 1


def test_a_supervised_worker_that_exits_is_restarted_and_its_exit_recorded() -> None:
    """The fault scenarios' stand-in for a supervisor: an exit (a fenced replacement's
    one ``error:`` line and code 1) is recorded and a new process started."""
    import os
    import sys

    from bench.common import Proc, wait_until

    scripts = iter(
        [
            "import sys; print('error: fenced by a newer instance', flush=True); sys.exit(1)",
            "import time; time.sleep(60)",
        ]
    )

    def start() -> Proc:
        return Proc("supervised", [sys.executable, "-c", next(scripts)], dict(os.environ))

    supervised = chaos.Supervised(start, chaos.Clock(), "replacement")
    try:
        wait_until(lambda: supervised.exits != [], 10, "the first process to exit")
        assert supervised.exits == [(1, ["error: fenced by a newer instance"])]
        assert supervised.proc.alive(), "restarted"
    finally:
        supervised.stop()
    assert not supervised.proc.alive()


def _line(level: str, seconds_ago: float, **extra: object) -> str:
    stamp = datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat(
        timespec="milliseconds"
    )
    return json.dumps({"ts": stamp, "level": level, "msg": "m", **extra})


def test_a_worker_is_settled_once_its_newest_warning_is_older_than_the_quiet_period(
    tmp_path: Path,
) -> None:
    """After an outage the next fault waits for the worker's log to go quiet: only warnings
    and errors count, and the newest one decides."""
    log = tmp_path / "worker.log"
    worker = SimpleNamespace(log_path=log)

    def warned(*lines: str) -> bool:
        log.write_text("\n".join(lines) + "\n")
        return chaos._warned_within(worker, 10.0)  # type: ignore[arg-type]

    assert not warned(_line("info", 1), _line("info", 0.1, stage="model"))
    assert warned(_line("warning", 30), _line("warning", 2), _line("info", 1))
    assert not warned(_line("error", 40), _line("warning", 12), _line("info", 0.5))
    assert warned("Traceback (most recent call last):")
    assert not warned("")
