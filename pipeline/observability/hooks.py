"""Process-wide metric hooks for layers that do not hold a metrics object.

Each records into whatever telemetry is current (:func:`pipeline.observability.setup.current`),
so tests that install their own telemetry see these too. They live apart from
:mod:`~pipeline.observability.metrics` so that the instruments do not import the setup
that builds them (no import loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.contract.envelopes import PromptRef
from pipeline.observability.metrics import ErrorRateSource, PipelineMetrics
from pipeline.observability.setup import current

log = logging.getLogger("llmpipe.breaker")


def _metrics() -> PipelineMetrics:
    return current().metrics


def record_breaker_change(name: str, old: Any, new: Any) -> None:
    """Pass as ``build_client(on_breaker_change=record_breaker_change)``.

    Also one log line per change: a breaker opening changes where requests go (held,
    failed over, or sent to review) for its whole open interval, which an operator
    reading the logs must see next to the requests it explains; changes are rare (at
    most one per open interval per breaker), so the line costs nothing."""
    _metrics().breaker_state_changed(name, old, new)
    opened = str(new) == "open"
    log.log(
        logging.WARNING if opened else logging.INFO,
        "circuit breaker %s: %s -> %s",
        name,
        old,
        new,
    )


def record_rate_limit_wait(model: str, waited_s: float) -> None:
    _metrics().rate_limit_waited(model, waited_s)


def record_rate_limit_rejection(model: str) -> None:
    _metrics().rate_limit_rejected(model)


def record_control_change(key: str) -> None:
    """Call with ``ControlEvent.key`` for every event the control listener applies."""
    _metrics().control_changed(key)


def record_distribution_shift(prompt_ref: str, signal: str) -> None:
    """Call once per shift a distribution monitor raises."""
    _metrics().distribution_shifted(prompt_ref, signal)


def record_audit_verdict(verdict: str, prompt: PromptRef | None = None) -> None:
    """Call once per reviewer decision on an audit item (correct, corrected, wrong, unclear)."""
    _metrics().audit_verdict(verdict, prompt)


def watch_accepted_error(source: ErrorRateSource) -> Callable[[], None]:
    """The review service's estimate (audit verdicts in its database), as a gauge."""
    return _metrics().watch_accepted_error(source)


def record_human_decision(action: str, prompt: PromptRef | None = None) -> None:
    """Call once per reviewer decision (approve, edit, reject, clarify)."""
    _metrics().human_decided(action, prompt)
