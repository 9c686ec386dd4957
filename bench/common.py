"""Shared machinery for the benchmarks and chaos runs: topics, processes, clocks, reports.

Design choices that every benchmark relies on:

- **Everything under test runs as its own OS process** (workers, the relay baseline, the
  fake model), the way an operator runs it, so CPU can be attributed per process with
  psutil and a SIGKILL is a real crash. The harness itself only produces and reads.
- **Throughput is read from Kafka's own timestamps** on the output topic, over the middle
  80 % of the messages (10th to 90th percentile), so start-up, group joins and the tail
  are excluded the same way for the pipeline and for its baseline.
- **Each run gets a fresh topic prefix and deletes its topics afterwards**: the broker on
  9092 is shared with other engineers, and a 100,000-message backlog left behind would
  cost them disk and start-up time.
- **No sleeps to synchronise**: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psutil  # type: ignore[import-untyped, unused-ignore]
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.harness.environment import create_topics, stop_process, worker_environment
from pipeline.transport.clients import KafkaClients
from pipeline.transport.topics import load_specs

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
LOG_DIR = OUT_DIR / "logs"
KAFKA_SCRIPT = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
PYTHON = sys.executable


# -- clocks and waits -------------------------------------------------------------------


class DeadlineExceeded(TimeoutError):
    """A condition did not hold in time; the message says which one."""


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; raise :class:`DeadlineExceeded` naming ``what``.

    Polling with a deadline (not a fixed sleep) is what keeps the chaos tests both fast on
    an idle machine and correct on a loaded one.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def steady_rate(timestamps_ms: Sequence[int]) -> float:
    """Messages per second between the 10th and 90th percentile of output timestamps.

    The middle 80 % excludes the pipeline filling up (group join, first fetches) and
    draining (the last few stragglers), which would otherwise dominate short runs.
    """
    if len(timestamps_ms) < 10:
        return float("nan")
    ordered = sorted(timestamps_ms)
    lo = len(ordered) // 10
    hi = len(ordered) * 9 // 10 - 1
    span_s = (ordered[hi] - ordered[lo]) / 1000
    return (hi - lo) / span_s if span_s > 0 else float("inf")


# -- machine ------------------------------------------------------------------------------


def kafka_version(port: int) -> str:
    """The broker version kafka.sh recorded, read from its status line."""
    env = {**os.environ, "LLMPIPE_KAFKA_PORT": str(port)}
    out = subprocess.run(
        ["bash", str(KAFKA_SCRIPT), "status"], capture_output=True, text=True, env=env
    ).stdout
    for part in out.split():
        if part.startswith("version="):
            return part.removeprefix("version=")
    return "unknown"


def machine_info(bootstrap: str | None = None) -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, CPU model, RAM, versions, load."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import confluent_kafka
    import httpx

    port = int((bootstrap or Settings().bootstrap_servers).rsplit(":", 1)[1])
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kafka": kafka_version(port),
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "httpx": httpx.__version__,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


# -- topics -------------------------------------------------------------------------------


def new_settings(bootstrap: str, **overrides: Any) -> Settings:
    """Settings with a unique topic prefix, so concurrent runs never share a topic."""
    prefix = f"b{uuid.uuid4().hex[:10]}."
    return Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, **overrides)


def delete_topics(settings: Settings) -> None:
    """Delete every topic with this run's prefix (best effort: never fail a report on it)."""
    if not settings.topic_prefix:
        return
    admin = KafkaClients(settings).admin()
    with contextlib.suppress(Exception):
        names = [
            t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)
        ]
        if names:
            for future in admin.delete_topics(names, operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    future.result(30)


@contextlib.contextmanager
def topics_of(settings: Settings, keep: bool = False) -> Iterator[Settings]:
    """Create all declared topics under the settings' prefix; delete them afterwards."""
    create_topics(settings)
    try:
        yield settings
    finally:
        if not keep:
            delete_topics(settings)


@contextlib.contextmanager
def fresh_topics(bootstrap: str, keep: bool = False, **overrides: Any) -> Iterator[Settings]:
    """Create all declared topics under a new prefix; delete them afterwards."""
    with topics_of(new_settings(bootstrap, **overrides), keep) as settings:
        yield settings


def end_offsets(consumer: Consumer, topic: str) -> int:
    """Sum of the high watermarks of ``topic``: messages ever written to it."""
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    total = 0
    for p in metadata.partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        total += max(high, 0)
    return total


class TopicCounter:
    """Counts messages on output topics from watermarks, without reading them.

    Reading 100,000 messages while a benchmark runs would steal CPU from the process under
    test on a 2-core machine; watermarks cost one small request per partition.
    """

    def __init__(self, settings: Settings, logical: Iterable[str]) -> None:
        self._topics = [settings.topic(t) for t in logical]
        self._consumer = KafkaClients(settings).consumer(None)

    def count(self) -> int:
        return sum(end_offsets(self._consumer, t) for t in self._topics)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Record:
    topic: str
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_all(
    settings: Settings, logical: Iterable[str], expected: int, timeout_s: float = 60.0
) -> list[Record]:
    """Read the topics from the beginning until ``expected`` messages arrived (or timeout)."""
    names = [settings.topic(t) for t in logical]
    consumer = KafkaClients(settings).consumer(None)
    out: list[Record] = []
    try:
        metadata = consumer.list_topics(timeout=10)
        consumer.assign(
            [
                TopicPartition(t, p, OFFSET_BEGINNING)
                for t in names
                for p in metadata.topics[t].partitions
            ]
        )
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=5000, timeout=0.2):
                if message.error():
                    continue
                raw_headers = cast("list[tuple[str, Any]]", message.headers() or [])
                headers = {k.lower(): v for k, v in raw_headers if isinstance(v, bytes)}
                out.append(
                    Record(
                        str(message.topic()),
                        int(message.timestamp()[1]),
                        message.key(),
                        message.value(),
                        headers,
                    )
                )
    finally:
        consumer.close()
    return out


def group_members(settings: Settings, groups: Sequence[str]) -> dict[str, tuple[str, int, int]]:
    """group -> (state, members, assigned partitions), from the broker's view."""
    admin = KafkaClients(settings).admin()
    out: dict[str, tuple[str, int, int]] = {}
    for group, future in admin.describe_consumer_groups(list(groups)).items():
        try:
            description = future.result(10)
        except Exception:
            out[group] = ("unknown", 0, 0)
            continue
        members = list(description.members)
        assigned = sum(
            len(m.assignment.topic_partitions) for m in members if m.assignment is not None
        )
        out[group] = (str(description.state).rsplit(".", 1)[-1], len(members), assigned)
    return out


def wait_groups_stable(
    settings: Settings, groups: Mapping[str, int], members: int, timeout_s: float
) -> None:
    """Wait until each group is STABLE with ``members`` members owning all its partitions.

    ``groups`` maps a group id to the partition count of its input topic. Benchmarks start
    their processes on empty topics and produce only after this holds, so no rebalance
    happens during the measured window (a rebalance pauses every stage).
    """

    def ok() -> bool:
        state = group_members(settings, list(groups))
        return all(
            s.upper() == "STABLE" and m == members and a == groups[g]
            for g, (s, m, a) in state.items()
        )

    wait_until(ok, timeout_s, f"groups {list(groups)} stable with {members} members", 0.25)


def partitions_of(settings: Settings, logical: str) -> int:
    """Partition count declared in topics/*.yaml (what create_topics made)."""
    return {s.name: s.partitions for s in load_specs(settings.topics_dir)}[logical]


def stage_groups(settings: Settings) -> dict[str, int]:
    """The worker's consumer groups and the partition count each must own in total."""
    return {
        settings.group(s.name): partitions_of(settings, s.input_topic)
        for s in topology.STAGES.values()
    }


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an operator would give ``llmpipe worker`` for these settings."""
    env = {**os.environ, **worker_environment(settings), "PYTHONPATH": pythonpath()}
    env.update(extra or {})
    return env


def pythonpath() -> str:
    """The repo first, then whatever the caller had (e.g. a directory of bench-only tools)."""
    extra = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(REPO_ROOT), extra) if p)


class Proc:
    """A child process with its stderr in a log file and psutil handles for CPU and RSS.

    stderr goes to a file, never to an unread pipe: a worker that logs a lot (a broker
    outage makes it log every retry) would otherwise block on a full 64 KiB pipe buffer and
    look hung.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        discard_stdout: bool = False,
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        # discard_stdout: for console exporters, whose output is the cost being measured
        # and would otherwise fill the log directory.
        stdout: Any = subprocess.DEVNULL if discard_stdout else self._log
        stderr: Any = self._log if discard_stdout else subprocess.STDOUT
        self.popen = subprocess.Popen(
            list(argv), env=dict(env), stdout=stdout, stderr=stderr, cwd=REPO_ROOT
        )
        self.ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _family(self) -> list[psutil.Process]:
        """The process and its live children (``llmpipe worker --processes N`` runs its
        workers as children of a supervisor: their CPU and memory are the command's)."""
        with contextlib.suppress(psutil.Error):
            return [self.ps, *self.ps.children(recursive=True)]
        return [self.ps]

    def cpu_s(self) -> float:
        total = 0.0
        for i, p in enumerate(self._family()):
            try:
                t = p.cpu_times()
            except psutil.Error:
                if i == 0:
                    return float("nan")
                continue
            total += float(t.user + t.system)
        return total

    def rss_mib(self) -> float:
        total = 0.0
        for i, p in enumerate(self._family()):
            try:
                total += float(p.memory_info().rss) / 2**20
            except psutil.Error:
                if i == 0:
                    return float("nan")
        return total

    def rss_by_process_mib(self) -> list[float]:
        """Resident memory of the command itself, then of each live child (the workers of
        ``llmpipe worker --processes N``)."""
        out: list[float] = []
        for p in self._family():
            with contextlib.suppress(psutil.Error):
                out.append(float(p.memory_info().rss) / 2**20)
        return out

    def worker_pids(self) -> list[int]:
        """The worker processes: the children of a supervisor, else the command itself."""
        family = self._family()
        return [p.pid for p in (family[1:] if len(family) > 1 else family)]

    def kill(self) -> None:
        """SIGKILL: the crash the offset rule must survive."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait (the worker drains and commits), SIGKILL if it will not stop."""
        code = stop_process(self.popen, timeout_s)
        self._log.close()
        return code

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_worker(
    settings: Settings,
    name: str = "worker",
    extra_env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    discard_stdout: bool = False,
) -> Proc:
    """``llmpipe worker`` as an OS process (or ``argv``, e.g. under a profiler)."""
    command = list(argv or [PYTHON, "-m", "pipeline.cli", "worker"])
    return Proc(name, command, worker_env(settings, extra_env), discard_stdout)


@contextlib.contextmanager
def workers(
    settings: Settings,
    count: int = 1,
    extra_env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    discard_stdout: bool = False,
) -> Iterator[list[Proc]]:
    procs = [
        start_worker(settings, f"worker{i}", extra_env, argv, discard_stdout) for i in range(count)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


class LoopDemand:
    """How much of the time each worker's event loop (its main thread) ran on a core and
    how much it was ready but waiting for one (``/proc/<pid>/schedstat``, Linux), from the
    first to the last progress check: a loop that is running or waiting all the time is
    CPU-bound, and the waiting share is what other processes on the machine took."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.first: dict[int, tuple[float, int, int]] = {}
        self.last: dict[int, tuple[float, int, int]] = {}

    def watch(self, procs: list[Proc]) -> None:
        self.procs.extend(procs)

    def sample(self, _seen: int) -> None:
        now = time.monotonic()
        for p in self.procs:
            for pid in p.worker_pids():
                try:
                    with open(f"/proc/{pid}/schedstat") as f:
                        ran_ns, waited_ns = (int(v) for v in f.read().split()[:2])
                except (OSError, ValueError):
                    continue
                self.first.setdefault(pid, (now, ran_ns, waited_ns))
                self.last[pid] = (now, ran_ns, waited_ns)

    def shares(self) -> tuple[float | None, float | None]:
        """(running, waiting for a core), each a mean fraction of wall time per loop."""
        ran: list[float] = []
        waited: list[float] = []
        for pid, (t0, r0, w0) in self.first.items():
            t1, r1, w1 = self.last[pid]
            if t1 - t0 < 1.0:
                continue
            ran.append((r1 - r0) / 1e9 / (t1 - t0))
            waited.append((w1 - w0) / 1e9 / (t1 - t0))
        if not ran:
            return None, None
        return round(sum(ran) / len(ran), 2), round(sum(waited) / len(waited), 2)


class FakeLLMProcess:
    """The fake model as its own process, so its CPU is not charged to the harness.

    The port is chosen up front (not 0) so that the same URL keeps working across a
    restart in the chaos runs.
    """

    def __init__(self, latency: float = 0.0, jitter: float = 0.0, port: int | None = None) -> None:
        self.port = port or free_port()
        self.latency = latency
        self.jitter = jitter
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeLLMProcess:
        argv = [
            PYTHON,
            "-m",
            "pipeline.harness.fakellm",
            "--port",
            str(self.port),
            "--latency",
            str(self.latency),
            "--jitter",
            str(self.jitter),
        ]
        self.proc = Proc("fakellm", argv, {**os.environ, "PYTHONPATH": pythonpath()})
        wait_until(self._healthy, 30, "the fake model to answer /healthz", 0.05)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise RuntimeError(f"fake model exited: {self.proc.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def counters(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/counters", timeout=5) as r:
            return cast("dict[str, Any]", json.loads(r.read()))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> FakeLLMProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_process(bootstrap: str) -> psutil.Process | None:
    """The JVM listening on the bootstrap port, for CPU attribution (None if not found)."""
    port = int(bootstrap.rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            address = conn.laddr
            if conn.status != psutil.CONN_LISTEN or not isinstance(address, tuple) or not address:
                continue
            if address[1] == port and conn.pid:
                return psutil.Process(conn.pid)
    return None


class CpuMeter:
    """CPU seconds used by each named process between start() and stop().

    On 2 cores the question "what limits throughput" is mostly "who is using the CPU":
    the worker's single event loop, the broker, the fake model or the harness.
    """

    def __init__(self, procs: Mapping[str, psutil.Process | Proc | None]) -> None:
        self._procs = {k: v for k, v in procs.items() if v is not None}
        self._start: dict[str, float] = {}
        self._wall0 = 0.0
        self.result: dict[str, float] = {}
        self.wall_s = 0.0

    @staticmethod
    def _cpu(p: psutil.Process | Proc) -> float:
        if isinstance(p, Proc):
            return p.cpu_s()
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return float(t.user + t.system)
        return float("nan")

    @staticmethod
    def _busy() -> float:
        """CPU seconds the whole machine has spent busy (all cores, all processes)."""
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def start(self) -> None:
        self._wall0 = time.monotonic()
        self._start = {k: self._cpu(p) for k, p in self._procs.items()}
        self._start["harness"] = time.process_time()
        self._start["machine"] = self._busy()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process, plus ``machine`` (everything) and ``others``.

        ``others`` is what the rest of the machine used meanwhile (other engineers' tests,
        the OS): on a shared 2-core box it is often why a run got less than it asked for.
        """
        self.wall_s = time.monotonic() - self._wall0
        now = {k: self._cpu(p) for k, p in self._procs.items()}
        now["harness"] = time.process_time()
        now["machine"] = self._busy()
        self.result = {k: round(now[k] - self._start[k], 2) for k in now}
        ours = sum(v for k, v in self.result.items() if k != "machine")
        self.result["others"] = round(max(0.0, self.result["machine"] - ours), 2)
        return self.result

    def utilisation(self) -> dict[str, float]:
        """Cores used on average (1.0 = one core busy the whole time)."""
        if self.wall_s <= 0:
            return {}
        return {k: round(v / self.wall_s, 2) for k, v in self.result.items()}


# -- reports ------------------------------------------------------------------------------


@dataclass
class Report:
    """One benchmark's findings; written as JSON (machine) and markdown (people)."""

    name: str
    title: str
    params: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    duration_s: float = 0.0

    def write(self) -> Path:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        data = {
            "name": self.name,
            "title": self.title,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 1),
            "machine": self.machine,
            "params": self.params,
            "results": self.results,
            "notes": self.notes,
            "plots": self.plots,
            "markdown": self.markdown,
        }
        path = OUT_DIR / f"{self.name}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        (OUT_DIR / f"{self.name}.md").write_text(self.to_markdown(level=1))
        return path

    @classmethod
    def load(cls, name: str) -> Report | None:
        """The last report written under ``name`` (None if there is none)."""
        path = OUT_DIR / f"{name}.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        report = cls(data["name"], data["title"], data["params"], data["results"])
        report.notes = data.get("notes", [])
        report.plots = data.get("plots", [])
        report.machine = data.get("machine", {})
        report.started_at = data.get("started_at", "")
        report.duration_s = float(data.get("duration_s", 0.0))
        if "markdown" in data:
            report.markdown = list(data["markdown"])
        elif (OUT_DIR / f"{name}.md").exists():
            # Written before the JSON kept the markdown: reuse the file minus its header;
            # notes and plots are already in that text.
            lines = (OUT_DIR / f"{name}.md").read_text().splitlines()
            report.markdown = lines[3:]
            report.notes, report.plots = [], []
        return report

    def to_markdown(self, level: int = 2) -> str:
        hashes = "#" * level
        lines = [f"{hashes} {self.title}", ""]
        cpu = self.machine.get("cpu_model")
        on = f", on {cpu} x {self.machine.get('cpu_count', '?')}" if cpu else ""
        lines.append(
            f"_{self.started_at}, {self.duration_s:.0f} s{on}, params: "
            + ", ".join(f"{k}={v}" for k, v in self.params.items())
            + "_"
        )
        lines.append("")
        lines.extend(self.markdown)
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        for plot in self.plots:
            lines += ["", f"![{Path(plot).stem}](out/{Path(plot).name})"]
        return "\n".join(lines) + "\n"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table; floats get two decimals (enough for ratios and rates)."""

    def cell(v: Any) -> str:
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def _pyplot() -> Any | None:
    """matplotlib is optional (not a dependency yet): no plots rather than no report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_bars(
    report: Report,
    suffix: str,
    labels: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    log: bool = False,
) -> None:
    plt = _pyplot()
    if plt is None:
        report.notes.append("plots skipped: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(labels, values, color="#4878a8")
    ax.bar_label(bars, fmt="%.0f")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(report.title, fontsize=10)
    fig.tight_layout()
    _save(report, fig, plt, suffix)


def plot_lines(
    report: Report,
    suffix: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
) -> None:
    plt = _pyplot()
    if plt is None:
        report.notes.append("plots skipped: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(report.title, fontsize=10)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    _save(report, fig, plt, suffix)


def _save(report: Report, fig: Any, plt: Any, suffix: str) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{report.name}-{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report.plots.append(str(path.relative_to(BENCH_DIR)))


def finish(report: Report, started: float, bootstrap: str) -> Report:
    report.duration_s = time.monotonic() - started
    report.machine = machine_info(bootstrap)
    path = report.write()
    print(report.to_markdown(level=1))
    print(f"wrote {path}")
    return report


def base_args(description: str) -> Any:
    """The flags every benchmark takes: --quick and --bootstrap."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for bench.all")
    parser.add_argument(
        "--bootstrap",
        default=Settings().bootstrap_servers,
        help="Kafka bootstrap servers (default: LLMPIPE_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    return parser


def run_main(doc: str | None, run: Callable[[bool, str], object]) -> None:
    """The entry point of a benchmark with no flags of its own: ``run(quick, bootstrap)``."""
    args = base_args((doc or "").splitlines()[0]).parse_args()
    run(args.quick, args.bootstrap)
