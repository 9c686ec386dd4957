"""A throwaway PostgreSQL server for tests: Debian's binaries, ``initdb`` in a temporary
directory, ``postgres`` on a loopback port, stopped and started again at will.

Needs Debian's ``postgresql`` package (``apt-get install -y postgresql``; ``.ci/run`` installs
it). Without it the tests that need it are skipped locally and fail in CI (``CI`` is set by
``.ci/run``), the same rule as the browser test's Chromium. PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port

BIN_ENV = "LLMPIPE_POSTGRES_BIN"
"""A directory with ``initdb`` and ``postgres``, instead of the newest /usr/lib/postgresql."""


def postgres_bin() -> Path:
    """Where ``initdb`` and ``postgres`` are; skips (fails in CI) when they are missing."""
    candidates = [Path(os.environ[BIN_ENV])] if os.environ.get(BIN_ENV) else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    reason = "PostgreSQL is not installed (apt-get install -y postgresql)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class PostgresServer:
    """One cluster in its own directory; :meth:`stop` and :meth:`start` keep the data and port."""

    def __init__(self, root: Path | None = None) -> None:
        self.bin = postgres_bin()
        self.root = Path(root or tempfile.mkdtemp(prefix="llmpipe-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root needs the 'postgres' user (Debian's package makes it)")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, check=False, **self._user)
        if done.returncode != 0:
            raise AssertionError(
                f"{command[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
            )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until it accepts connections (fail with its log otherwise)."""
        assert not self.running, "already running"
        log = self.log.open("ab")
        self._process = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                # Test speed: nothing is flushed to disk; a stopped (even killed) server
                # keeps every committed transaction, since the OS keeps the written files.
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=50",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            **self._user,
        )
        log.close()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        psycopg = pytest.importorskip("psycopg")
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise AssertionError(f"postgres exited:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"postgres not ready after {timeout_s}s ({exc}):\n{self.log_tail()}"
                    ) from exc
            time.sleep(0.1)  # polling interval of a deadline-bounded wait

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """``fast``: disconnect everyone and shut down cleanly; ``immediate``: like a crash
        (recovery from the write-ahead log on the next start)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(
                f"postgres did not stop in {timeout_s}s:\n{self.log_tail()}"
            ) from None
        self._process = None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        psycopg = pytest.importorskip("psycopg")
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
