"""What tests, benchmarks and the demo need to stand up a pipeline on a broker: its
topics, the environment a worker process gets, and how such a process is stopped. One
copy, so ``tests/`` and ``bench/`` cannot drift apart on, say, which settings a worker
subprocess inherits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.transport.clients import KafkaClients
from pipeline.transport.topics import apply, load_specs


def create_topics(settings: Settings, topics_dir: Path | None = None) -> None:
    """Every topic of ``topics/*.yaml`` (or ``topics_dir``) under the settings' prefix."""
    admin = KafkaClients(settings).admin()
    apply(admin, load_specs(topics_dir or settings.topics_dir), settings.topic_prefix)


def worker_environment(settings: Settings) -> dict[str, str]:
    """The ``LLMPIPE_*`` variables that give ``llmpipe worker`` exactly these settings
    (callers add ``os.environ`` and anything else the process needs).

    Every field of :class:`Settings` is passed, read from the class itself, so a setting
    added there reaches worker subprocesses without a second list to keep: the security
    settings (SSL, SASL, OAUTHBEARER) and the Schema Registry's included, secrets as their
    values. A field that is unset (None) is left out: an environment cannot say "unset"."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    environment: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            environment[f"{prefix}{name.upper()}"] = _environment_value(value)
    # One process per worker a test or benchmark starts, unless its settings ask for
    # more: a SIGKILL must be one worker's crash, and CPU is measured per process.
    environment[f"{prefix}WORKER_PROCESSES"] = str(settings.worker_processes or 1)
    return environment


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30.0) -> int:
    """SIGTERM and wait (a worker drains and commits), SIGKILL if it will not stop in
    ``timeout_s``; the exit code (negative: the signal that ended it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _environment_value(value: object) -> str:
    """A setting as pydantic-settings reads it back: lists as JSON, secrets revealed."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
