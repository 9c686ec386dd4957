"""What tests, benchmarks and the demo need to stand up a pipeline on a broker: its
topics, and the environment a worker process gets. One copy, so ``tests/`` and ``bench/``
cannot drift apart on, say, which settings a worker subprocess inherits."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Settings
from pipeline.transport.clients import KafkaClients
from pipeline.transport.topics import apply, load_specs


def create_topics(settings: Settings, topics_dir: Path | None = None) -> None:
    """Every topic of ``topics/*.yaml`` (or ``topics_dir``) under the settings' prefix."""
    admin = KafkaClients(settings).admin()
    apply(admin, load_specs(topics_dir or settings.topics_dir), settings.topic_prefix)


def worker_environment(settings: Settings) -> dict[str, str]:
    """The ``LLMPIPE_*`` variables an operator would give ``llmpipe worker`` for these
    settings (callers add ``os.environ`` and anything else the process needs)."""
    return {
        "LLMPIPE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
        "LLMPIPE_MODEL_BASE_URL": settings.model_base_url,
        "LLMPIPE_MODEL_TIMEOUT_S": str(settings.model_timeout_s),
        "LLMPIPE_MODEL_MAX_ATTEMPTS": str(settings.model_max_attempts),
        "LLMPIPE_MAX_IN_FLIGHT": str(settings.max_in_flight),
        "LLMPIPE_PII_POLICY": settings.pii_policy,
        "LLMPIPE_OUTPUT_FORMAT": settings.output_format,
        "LLMPIPE_DELIVERY": settings.delivery,
        "LLMPIPE_COMMIT_INTERVAL_MS": str(settings.commit_interval_ms),
        # One process per worker a test or benchmark starts, unless its settings ask for
        # more: a SIGKILL must be one worker's crash, and CPU is measured per process.
        "LLMPIPE_WORKER_PROCESSES": str(settings.worker_processes or 1),
    }
