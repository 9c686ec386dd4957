"""The ``llmpipe`` command. User mistakes end in one clear line and a non-zero exit
(:mod:`pipeline.cli.console`)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from pipeline.cli.console import Commands, err, out
from pipeline.cli.usage import Root
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.errors import LlmpipeError

app = Root(help="llmpipe: make LLM output safe to use in production.", no_args_is_help=True)
kafka_app = Commands(
    help="Run a local Kafka broker (KRaft, single node, loopback).", no_args_is_help=True
)
topics_app = Commands(
    help="Topics as code: topics/*.yaml against the cluster.", no_args_is_help=True
)
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")

# A tool's failure is one line that names its cause; the Kafka client's own warnings
# (librdkafka's log, outage notices) go to the JSON logger a worker configures, never raw to
# a terminal (without any handler, Python would print them through its last-resort one).
logging.getLogger("llmpipe.kafka").addHandler(logging.NullHandler())
F = TypeVar("F", bound=Callable[..., Any])
KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"


def settings() -> Settings:
    return Settings()


def _kafka(command: str) -> None:
    result = subprocess.run(["bash", str(KAFKA_SCRIPT), command], check=False)
    raise typer.Exit(result.returncode)


@kafka_app.command("up")
def kafka_up() -> None:
    """Fetch the jars once, format storage, start the broker and wait until it answers."""
    _kafka("up")


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the broker started by `kafka up`."""
    _kafka("down")


@kafka_app.command("status")
def kafka_status() -> None:
    """Exit 0 when the broker is running."""
    _kafka("status")


def _admin() -> Any:
    from pipeline.transport.clients import KafkaClients
    from pipeline.transport.reader import require_broker

    admin = KafkaClients(settings()).admin()
    require_broker(admin, settings())
    return admin


def _specs(directory: Path | None) -> Any:
    from pipeline.transport.topics import load_specs

    return load_specs(directory or settings().topics_dir)


@topics_app.command("plan")
def topics_plan(
    topics_dir: Annotated[Path | None, typer.Option(help="Directory of topic files.")] = None,
) -> None:
    """Show what `topics apply` would change, without changing anything."""
    from pipeline.transport.topics import plan

    result = plan(_admin(), _specs(topics_dir), settings().topic_prefix)
    for change in result.changes:
        out.print(f"{change.action:15} {change.topic}: {change.detail}")
    for problem in result.errors:
        err.print(f"[red]refused[/red] {problem}")
    subjects, refused = _plan_subjects()
    for subject in subjects:
        out.print(f"{subject.action:15} {subject.subject}: {subject.detail}")
    for problem in refused:
        err.print(f"[red]refused[/red] {problem}")
    if result.empty and not subjects and not refused:
        out.print("no changes: the cluster matches the topic files")
    if result.errors or refused:
        raise typer.Exit(1)


@topics_app.command("apply")
def topics_apply(
    topics_dir: Annotated[Path | None, typer.Option(help="Directory of topic files.")] = None,
) -> None:
    """Create missing topics, add partitions and update configs. Idempotent."""
    from pipeline.transport.topics import apply

    result = apply(_admin(), _specs(topics_dir), settings().topic_prefix)
    for change in result.changes:
        out.print(f"{change.action:15} {change.topic}: {change.detail}")
    subjects = _apply_subjects()
    for subject in subjects:
        out.print(f"{subject.action:15} {subject.subject}: {subject.detail}")
    if result.empty and not subjects:
        out.print("no changes: the cluster matches the topic files")


@topics_app.command("export")
def topics_export(
    format: Annotated[
        str, typer.Option("--format", help="Output format: strimzi (KafkaTopic resources).")
    ] = "strimzi",
    cluster: Annotated[
        str, typer.Option(help="Strimzi cluster name (the strimzi.io/cluster label).")
    ] = "my-cluster",
    namespace: Annotated[
        str, typer.Option(help="Namespace of the resources (default: none).")
    ] = "",
    topics_dir: Annotated[Path | None, typer.Option(help="Directory of topic files.")] = None,
) -> None:
    """Print the topic files for another tool to apply (no broker needed), with
    LLMPIPE_TOPIC_PREFIX; e.g. `llmpipe topics export | kubectl apply -f -`."""
    from pipeline.transport.topics import strimzi_topics

    if format != "strimzi":
        raise LlmpipeError(f"unknown --format {format!r}; choose from: strimzi")
    text = strimzi_topics(_specs(topics_dir), settings().topic_prefix, cluster, namespace)
    sys.stdout.write(text)


def _plan_subjects() -> tuple[list[Any], list[str]]:
    """The Schema Registry half of `topics plan` (nothing without LLMPIPE_SCHEMA_REGISTRY_URL)."""
    from pipeline.contract.codec import Codec
    from pipeline.transport.schema_registry import plan_subjects, registry_client

    s = settings()
    if not s.schema_registry_url:
        return [], []
    return plan_subjects(registry_client(s), Codec(), s.topic_prefix)


def _apply_subjects() -> list[Any]:
    """Register each topic's `<topic>-value` subject once the registry says compatible."""
    from pipeline.contract.codec import Codec
    from pipeline.transport.schema_registry import apply_subjects, registry_client

    s = settings()
    if not s.schema_registry_url:
        return []
    return apply_subjects(registry_client(s), Codec(), s.topic_prefix)


@app.command()
def worker(
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run.")] = ",".join(
        topology.stage_names()
    ),
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes under one supervisor (default: LLMPIPE_WORKER_PROCESSES, "
            "else one per available core). 1 runs the worker in this process.",
        ),
    ] = None,
) -> None:
    """Run pipeline stages until SIGTERM/SIGINT."""
    from pipeline.observability.logs import configure_logging
    from pipeline.prompts.errors import PromptLoadError
    from pipeline.runtime.supervisor import available_cores, run_supervisor
    from pipeline.runtime.worker import check_stages, run_worker

    configure_logging()
    try:
        chosen = check_stages([s.strip() for s in stages.split(",") if s.strip()])
        count = processes or settings().worker_processes or available_cores()
        if count > 1:
            raise typer.Exit(run_supervisor(count, chosen))
        run_worker(settings(), chosen)
    except ValidationError:
        raise  # a bad LLMPIPE_* variable: the root app's one line names it
    except (PromptLoadError, ValueError) as exc:
        raise LlmpipeError(str(exc)) from None


@app.command()
def send(
    prompt: Annotated[str, typer.Argument(help="Prompt name.")],
    variables: Annotated[str, typer.Option("--vars", help="Variables as a JSON object.")] = "{}",
    request_id: Annotated[
        str | None, typer.Option(help="Request id (default: a new UUID).")
    ] = None,
    version: Annotated[int | None, typer.Option(help="Ask for this prompt version.")] = None,
) -> None:
    """Publish one JSON request to llm.requests (handy for trying things out)."""
    import uuid

    from pipeline.cli.names import check_prompt, parse_vars
    from pipeline.transport import headers as h
    from pipeline.transport.batch import produce_batch

    parsed = parse_vars(variables)
    check_prompt(settings(), prompt, version)
    rid = request_id or str(uuid.uuid4())
    body: dict[str, Any] = {"request_id": rid, "prompt": prompt, "variables": parsed}
    if version is not None:
        body["prompt_version"] = version
    headers = [(h.CONTENT_TYPE, b"application/json")]
    message = (rid.encode(), json.dumps(body).encode(), headers)
    (written,) = produce_batch(settings(), topology.REQUESTS, [message])
    out.print(rid)
    err.print(f"written to {written}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    count: Annotated[
        int | None,
        typer.Option(help="Number of requests to publish (default 200; 24 with --local-model)."),
    ] = None,
    keep: Annotated[bool, typer.Option(help="Leave what the demo started running.")] = False,
    local_model: Annotated[
        bool,
        typer.Option(
            "--local-model",
            help="A real model (SmolLM2-135M via llama.cpp, `make model-server`) instead of the "
            "fake one.",
        ),
    ] = False,
) -> None:
    """Start what is missing, publish a mix of requests, and show where each one ended."""
    from pipeline.harness.demo import run_demo
    from pipeline.llm.local_server import LocalModelUnavailable

    chosen = count if count is not None else (24 if local_model else 200)
    try:
        code = run_demo(settings(), count=chosen, keep=keep, console=out, local_model=local_model)
    except LocalModelUnavailable as exc:
        raise LlmpipeError(str(exc)) from None
    sys.exit(code)


def _register_optional() -> None:
    """Sub-apps owned by their own modules register here, so this file stays the index."""
    from pipeline.cli.prompts import prompts_app
    from pipeline.cli.trace import trace
    from pipeline.control.cli import flags_app
    from pipeline.dlq.cli import dlq_app
    from pipeline.harness.fakellm.cli import fake_llm
    from pipeline.review.cli import review_app

    app.add_typer(prompts_app, name="prompts")
    app.add_typer(review_app, name="review")
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(flags_app, name="flags")
    app.command("fake-llm")(fake_llm)
    app.command("trace")(trace)


_register_optional()
