"""The Dockerfile and compose file, checked without a Docker engine (none runs here).

What can be checked is: the instructions themselves (non-root user, a non-editable install
from the lock file, a multi-stage build whose final stage installs nothing, a HEALTHCHECK on
/healthz, settings that exist), and the health check command, run for real against the
worker's endpoint server: it passes on 200 and fails on 503 and on no answer.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bench.common import free_port
from pipeline.config import REPO_ROOT, Settings
from pipeline.observability import endpoints
from pipeline.observability.endpoints import EndpointServer, Verdict

DOCKERFILE = REPO_ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            found.append(Stage(parts[0], parts[2] if len(parts) > 2 else None))
        else:
            found[-1].instructions.append((keyword, args.strip()))
    return found


def test_multi_stage_build_with_an_unprivileged_final_stage() -> None:
    build, final = stages()[0], stages()[-1]
    assert len(stages()) >= 2, "one stage builds, the last one only runs"
    users = final.all("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert any(user in run and "useradd" in run for run in final.all("RUN")), "user not created"
    # Nothing is installed in the final stage: it copies the build stage's virtualenv.
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|uv)\b", run), f"the final stage installs: {run}"
    assert any(f"--from={build.name}" in copy for copy in final.all("COPY"))
    assert final.base == build.base, "the virtualenv's interpreter must be the same"


def test_install_is_from_the_lock_file_and_not_editable() -> None:
    runs = [run for stage in stages() for run in stage.all("RUN")]
    installs = [run for run in runs if re.search(r"\b(pip|uv pip) install\b", run)]
    assert installs
    for run in installs:
        words = shlex.split(run)
        assert "-e" not in words and "--editable" not in words, run
    project = [run for run in installs if '".[' in run or " . " in f"{run} "]
    assert project, "llmpipe itself is not installed"
    assert all("--constraints requirements.lock" in run for run in project), project


def test_entrypoint_command_and_settings_are_real() -> None:
    final = stages()[-1]
    assert final.all("ENTRYPOINT") == ['["llmpipe"]']
    assert final.all("CMD") == ['["worker"]']
    env = " ".join(final.all("ENV"))
    names = set(re.findall(r"\b(LLMPIPE_[A-Z_]+)=", env))
    known = {f"LLMPIPE_{name.upper()}" for name in Settings.model_fields}
    assert {"LLMPIPE_HEALTH_PORT", "LLMPIPE_HEALTH_HOST"} <= names <= known
    assert "9464" in final.all("EXPOSE")


def healthcheck_command() -> str:
    (healthcheck,) = stages()[-1].all("HEALTHCHECK")
    command = healthcheck.split(" CMD ", 1)[1]
    assert "/healthz" in command and "LLMPIPE_HEALTH_PORT" in command
    return command


def run_healthcheck(port: int) -> int:
    """The HEALTHCHECK command as Docker runs it (``sh -c``), with this interpreter."""
    command = healthcheck_command().replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)
    env = {"LLMPIPE_HEALTH_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        ["sh", "-c", command], env=env, capture_output=True, timeout=30
    ).returncode


def test_the_healthcheck_passes_on_a_live_loop_and_fails_otherwise(
    endpoint_server: EndpointServer,
) -> None:
    endpoints.set_checks(liveness=lambda: Verdict(True))
    assert run_healthcheck(endpoint_server.port) == 0
    endpoints.set_checks(liveness=lambda: Verdict(False, {"reason": "wedged"}))
    assert run_healthcheck(endpoint_server.port) != 0
    assert run_healthcheck(free_port()) != 0  # nothing listens there


def test_compose_health_checks_match_each_service() -> None:
    """The image's check is the worker's: other long-running services point theirs at
    their own /healthz, one-shot tools switch it off."""
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    built = {name: s for name, s in services.items() if s.get("build")}
    for name, service in built.items():
        command = [*service.get("entrypoint", ["llmpipe"])[1:], *service.get("command", [])]
        check = service.get("healthcheck")
        if command[:1] == ["worker"]:
            assert check is None, f"{name}: keeps the image's worker check"
        elif "--port" in command:
            port = command[command.index("--port") + 1]
            assert f"127.0.0.1:{port}/healthz" in " ".join(check["test"]), name
        else:
            assert check == {"disable": True}, f"{name}: a one-shot tool has no /healthz"


def test_the_build_context_has_what_the_dockerfile_copies_and_not_the_virtualenvs() -> None:
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".venv-model", ".git"} <= ignored
    copied = {
        source
        for stage in stages()
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for source in copy.split()[:-1]
    }
    assert copied, "no COPY found"
    assert not copied & ignored, f"copied but excluded from the context: {copied & ignored}"
    assert all((REPO_ROOT / source).exists() for source in copied), copied


@pytest.mark.slow
def test_the_build_stage_installs_a_working_non_editable_llmpipe(tmp_path: Path) -> None:
    """The build stage's own RUN lines, run here with /opt/llmpipe in a temporary
    directory (no Docker engine): the virtualenv they make has llmpipe as a wheel, no test
    tools, its Avro schemas where the codec looks, and, with the final stage's ENV, serves
    the CLI from outside the repository. (Skipped: the RUN that installs uv itself, and
    UV_NO_CACHE, so the run uses uv's cache.)"""
    build, final = stages()[0], stages()[-1]
    src, venv, data = tmp_path / "src", tmp_path / "opt-llmpipe", tmp_path / "data"
    src.mkdir()
    data.mkdir()
    for copy in build.all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            target = src / source
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, target)
            else:
                shutil.copy(REPO_ROOT / source, target)
    shims = tmp_path / "bin"
    shims.mkdir()
    base_python = shutil.which("python3")  # the one `make install` runs uv with
    assert base_python
    for name, command in (("python", base_python), ("uv", f"{base_python} -m uv")):
        (shims / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    env.update(dict(re.findall(r"(\w+)=(\S+)", " ".join(build.all("ENV")))))
    env.pop("UV_NO_CACHE")
    for run in build.all("RUN"):
        if run.startswith("pip install"):
            continue
        command = run.replace("/opt/llmpipe", str(venv))
        done = subprocess.run(["sh", "-c", command], cwd=src, env=env, capture_output=True)
        assert done.returncode == 0, f"{command}\n{done.stderr.decode()[-3000:]}"

    python = venv / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import pipeline, pytest"], capture_output=True, text=True, cwd=data
    )
    assert "No module named 'pytest'" in where.stderr, "test tools in the image"
    editable = (
        "import importlib.metadata as m, json; "
        "info = json.loads(m.distribution('llmpipe').read_text('direct_url.json') or '{}'); "
        "print(info.get('dir_info', {}).get('editable', False))"
    )
    record = subprocess.run([python, "-c", editable], capture_output=True, text=True, cwd=data)
    assert record.stdout.strip() == "False", record.stdout + record.stderr
    run_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(final.all("ENV"))))
    run_env = {k: v.replace("/app", str(REPO_ROOT)) for k, v in run_env.items()}
    run_env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    checks = [
        [python, "-c", "import pipeline, sys; assert 'site-packages' in pipeline.__file__"],
        [python, "-c", "from pipeline.contract.codec import Codec; Codec()"],
        [venv / "bin" / "llmpipe", "prompts", "list"],
        [venv / "bin" / "llmpipe", "topics", "export", "--format", "strimzi"],
    ]
    for check in checks:
        done = subprocess.run(check, cwd=data, env=run_env, capture_output=True, text=True)
        assert done.returncode == 0, f"{check}: {done.stdout[-1000:]}{done.stderr[-2000:]}"
