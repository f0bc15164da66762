"""Processes and measurements shared by the benchmark scripts.

Every server binds 127.0.0.1 on a free port and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.trust.policy import TRUST_FILE

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far, in seconds; 0 where /proc has none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, in MiB; 0 where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Child:
    """A child process with its output in a log file, stopped by PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(os.devnull, "rb") as devnull, log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.proc.args[0]} did not say {text!r}; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def peer_home(home: Path, identity: Identity, trusted: Iterable[str] = ()) -> Path:
    """A MESHJOBS_HOME holding *identity*, trusting the *trusted* submitter keys."""
    save_identity(identity, home / IDENTITY_FILE)
    if trusted:
        (home / TRUST_FILE).write_text("".join(f'[[peer]]\nkey = "{key}"\n' for key in trusted))
    return home


def demo_worker(url: str, home: Path, log: Path) -> Child:
    """`meshjobs worker workers.demo:app` as the identity in *home*."""
    env = {**os.environ, "MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": url}
    return Child([python(), "-m", "meshjobs", "worker", "workers.demo:app"], log, env)


def start_redis(workdir: Path) -> tuple[Child, str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed; run scripts/ensure-redis")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    child = Child(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        workdir / "redis.log",
    )
    child.wait_for("Ready to accept connections")
    return child, f"redis://127.0.0.1:{port}/0"


@dataclass
class Sample:
    system: str
    in_flight: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    worker_rss_mib: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "system": self.system,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "throughput_per_s": round(self.throughput, 1),
            "p50_ms": round(statistics.median(self.latencies_ms), 4),
            "p99_ms": round(self.percentile(0.99), 4),
            "worker_peak_rss_mib": round(self.worker_rss_mib, 1),
        }


async def drive_async(
    system: str,
    call: Callable[[], Awaitable[object]],
    requests: int,
    in_flight: int,
    warmup: int = 200,
    until: float | None = None,
) -> Sample:
    """Run *requests* calls with *in_flight* at a time; time each one.

    *until* (a ``time.perf_counter()`` reading) ends the run early: no call
    starts after it, and the sample holds the calls made by then.
    """
    for _ in range(min(warmup, requests)):
        await call()
    latencies: list[float] = []
    remaining = requests

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0 and (until is None or time.perf_counter() < until):
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return Sample(system, in_flight, len(latencies), time.perf_counter() - started, latencies)


def drive_threads(system: str, call: Callable[[], object], requests: int, in_flight: int, warmup: int = 50) -> Sample:
    """The same for blocking clients (Celery): *in_flight* threads."""
    for _ in range(min(warmup, requests)):
        call()
    latencies: list[float] = []

    def one(_: int) -> None:
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(one, range(requests)))
    return Sample(system, in_flight, requests, time.perf_counter() - started, latencies)


def python() -> str:
    return sys.executable


def publish_report(report: dict[str, Any], out: Path, as_json: bool, text: str) -> None:
    """Write *report* as JSON to *out*; print it (``--json``) or the *text* table, and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
        print(f"\nwrote {out}")
