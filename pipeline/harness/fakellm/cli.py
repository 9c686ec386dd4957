"""Typer command for ``llmpipe fake-llm``; registered by the main CLI, not here.

Kept separate from :mod:`server` so importing the server (tests, benchmarks) never pulls in
typer, and so the main CLI can register it with ``app.command("fake-llm")(fake_llm)``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.harness.fakellm.behaviors import parse_behavior, parse_profile
from pipeline.harness.fakellm.server import DEFAULT_PORT, serve


def fake_llm(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0 picks a free one).")] = DEFAULT_PORT,
    profile: Annotated[
        str,
        typer.Option(help='Behaviour weights, e.g. "valid=0.7,invalid_json=0.2,slow:2=0.1".'),
    ] = "valid=1",
    seed: Annotated[int, typer.Option(help="Seed for the per-request behaviour draw.")] = 0,
    latency: Annotated[
        float, typer.Option(help="Mean seconds added to every answer (benchmarks).")
    ] = 0.0,
    jitter: Annotated[
        float, typer.Option(help="Latency spread as a fraction, e.g. 0.2 for ±20%.")
    ] = 0.0,
    default_behavior: Annotated[
        str | None, typer.Option(help="Behaviour for every request without a directive.")
    ] = None,
) -> None:
    """Run a fake OpenAI-compatible model that misbehaves on purpose (tests, demo, bench).

    Behaviours, the [[fake:NAME]] and [[answer:JSON]] directives, the x-fake-behavior
    header, profiles and the /counters and /control endpoints: docs/fake-model.md.
    """
    try:
        parse_profile(profile)
        if default_behavior:
            parse_behavior(default_behavior)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if latency < 0 or not 0 <= jitter <= 1:
        raise typer.BadParameter("latency must be >= 0 and jitter within 0..1")
    serve(
        host,
        port,
        profile=profile,
        seed=seed,
        latency=latency,
        jitter=jitter,
        default_behavior=default_behavior,
    )
