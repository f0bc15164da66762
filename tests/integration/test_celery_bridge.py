"""The Celery bridge, both ways, with real processes.

A real redis-server (random loopback port), a real Celery worker
(``celery -A tests.celery_tasks worker --pool solo``), the bridge as its CLI
(``meshjobs celery-bridge tests.celery_tasks:app``) and the demo worker, all
started once for this module and stopped by PID. Identities: alice submits
(trusted by the bridge), the bridge answers, the Celery worker calls the mesh
as itself (trusted by the demo worker), a stranger is trusted by nobody.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshjobs import Client, Identity
from meshjobs.errors import HandlerError, JobTimeout, NoPeerError, Reason, Rejected, UsageError
from meshjobs.identity import IDENTITY_FILE, save_identity

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A child process with its output in a log file, stopped by PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(os.devnull, "rb") as devnull, log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.proc.args!r} did not say {text!r}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass(frozen=True)
class Peer:
    identity: Identity
    home: Path


def make_peer(home: Path, trusts: Peer | None = None) -> Peer:
    identity = Identity.generate()
    save_identity(identity, home / IDENTITY_FILE)
    if trusts is not None:
        (home / "trust.toml").write_text(f'[[peer]]\nkey = "{trusts.identity.public_key}"\n')
    return Peer(identity, home)


@dataclass(frozen=True)
class Setup:
    url: str
    redis_url: str
    marks: Path
    alice: Peer
    bridge: Peer
    work: Path

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHJOBS_", "CELERY_"))}
        env.update(
            MESHJOBS_HOME=str(home),
            MESHJOBS_SERVER=self.url,
            MESHJOBS_TEST_MARKS=str(self.marks),
            CELERY_BROKER_URL=self.redis_url,
            CELERY_RESULT_BACKEND=self.redis_url,
        )
        return env


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if not binary:
        message = "redis-server is not installed; run scripts/ensure-redis"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("redis")
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)]
    redis = Child(args, work / "redis.log", dict(os.environ))
    try:
        redis.wait_for("Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def setup(broker: Any, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Celery worker, demo worker and the bridge, up for the whole module."""
    work = tmp_path_factory.mktemp("celery-bridge")
    alice = make_peer(work / "alice")
    celery_peer = make_peer(work / "celery")
    s = Setup(
        url=broker.url,
        redis_url=redis_url,
        marks=work / "marks",
        alice=alice,
        bridge=make_peer(work / "bridge", trusts=alice),
        work=work,
    )
    s.marks.mkdir()
    demo_home = make_peer(work / "demo", trusts=celery_peer).home
    children: list[Child] = []
    try:
        celery_args = ["-A", "tests.celery_tasks", "worker", "--pool", "solo", "--loglevel", "INFO",
                       "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        celery = Child([sys.executable, "-m", "celery", *celery_args], work / "celery.log", s.env(celery_peer.home))
        children.append(celery)
        demo = Child(
            [sys.executable, "-m", "meshjobs", "worker", "workers.demo:app"], work / "demo.log", s.env(demo_home)
        )
        children.append(demo)
        bridge_args = ["celery-bridge", "tests.celery_tasks:app", "--map", "Legacy.Div=legacy.divide"]
        bridge = Child([sys.executable, "-m", "meshjobs", *bridge_args], work / "bridge.log", s.env(s.bridge.home))
        children.append(bridge)
        celery.wait_for("ready.", timeout=60)
        demo.wait_for("serving")
        bridge.wait_for("serving")
        yield s
    finally:
        for child in reversed(children):
            child.stop()


@pytest.fixture
async def alice(setup: Setup) -> AsyncIterator[Client]:
    async with await Client.connect(setup.url, setup.alice.identity) as client:
        yield client


async def test_signed_submit_runs_the_task_and_the_bridge_signs_the_result(alice: Client, setup: Setup) -> None:
    outcome = await alice.submit("calc.add", {"x": 2, "y": 3})
    assert outcome.value == 5
    assert outcome.worker == setup.bridge.identity.public_key
    peers = [p for p in await alice.peers(capability="calc.add") if p.peer == setup.bridge.identity.public_key]
    assert len(peers) == 1 and peers[0].kind == "system"
    offered = set(peers[0].capabilities)
    assert {"calc.add", "calc.fail", "calc.flaky", "legacy.mul", "legacy.divide"} <= offered
    assert not any(c.startswith("celery.") for c in offered) and "legacy.div" not in offered


async def test_task_names_are_mapped_and_positional_args_pass(alice: Client) -> None:
    assert (await alice.submit("legacy.mul", {"args": [2, 3, 4]})).value == 24.0  # task "Legacy.Mul"
    assert (await alice.submit("legacy.divide", {"a": 6, "b": 3})).value == 2.0  # --map Legacy.Div=legacy.divide
    with pytest.raises(NoPeerError):
        await alice.submit("legacy.div", {"a": 6, "b": 3}, peer_wait=0.3, timeout=3)


async def test_a_task_error_is_a_handler_error(alice: Client) -> None:
    with pytest.raises(HandlerError) as info:
        await alice.submit("calc.fail", {"message": "no luck"})
    assert info.value.exit_code == 1
    assert "ValueError: no luck" in str(info.value)


async def test_bad_arguments_are_refused_before_sending(alice: Client, setup: Setup) -> None:
    cases: list[dict[str, Any]] = [
        {"x": 1},
        {"x": 1, "y": 2, "z": 3},
        {"args": [1, 2, 3]},
        {"args": "1, 2"},
        {"tag": "bad", "size": 1},
    ]
    for args in cases:
        capability = "calc.touch" if "tag" in args else "calc.add"
        with pytest.raises(UsageError) as info:
            await alice.submit(capability, args)
        assert info.value.exit_code == 2, args
    assert "missing a required argument: 'y'" in str(await _usage(alice, "calc.add", {"x": 1}))
    assert not (setup.marks / "bad").exists()


async def _usage(client: Client, capability: str, args: dict[str, object]) -> UsageError:
    try:
        await client.submit(capability, args)
    except UsageError as exc:
        return exc
    raise AssertionError("no UsageError")


async def test_a_retry_is_waited_through(alice: Client) -> None:
    started = time.monotonic()
    outcome = await alice.submit("calc.flaky", {"key": "k1"})
    assert outcome.value == {"key": "k1", "retries": 1}
    assert time.monotonic() - started >= 0.3


async def test_an_untrusted_submitter_is_rejected_at_the_bridge(alice: Client, setup: Setup) -> None:
    async with await Client.connect(setup.url, Identity.generate()) as stranger:
        with pytest.raises(Rejected) as info:
            await stranger.submit("calc.touch", {"tag": "stranger"})
    assert info.value.reason == Reason.UNTRUSTED
    # The solo Celery worker runs tasks in order: once alice's has run, a stranger's would have too.
    assert (await alice.submit("calc.touch", {"tag": "alice"})).value == "alice"
    assert (setup.marks / "alice").exists()
    assert not (setup.marks / "stranger").exists()
    assert "stranger" not in (setup.work / "celery.log").read_text()


async def test_mesh_to_celery_to_mesh(alice: Client) -> None:
    # alice -> bridge -> Celery task calc.mesh_add -> meshjobs.celery.submit -> demo.add
    assert (await alice.submit("calc.mesh_add", {"a": 4, "b": 5}, timeout=30)).value == 9


def test_a_celery_task_submits_to_the_mesh(setup: Setup) -> None:
    from tests.celery_tasks import app, mesh_add

    app.conf.update(broker_url=setup.redis_url, result_backend=setup.redis_url)
    assert mesh_add.delay(20, 22).get(timeout=30) == 42
    # meshjobs errors come back as themselves, so a task can autoretry_for them.
    with pytest.raises(UsageError, match="invalid arguments"):
        mesh_add.delay("x", 1).get(timeout=30)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--map", "calc.fail=calc.add"], "tasks 'calc.add' and 'calc.fail' would all be 'calc.add'"),
        (["--map", "Legacy.Mul=mesh.mul"], "--map Legacy.Mul=mesh.mul: invalid capability 'mesh.mul'"),
        (["--tasks", "nothing.*"], "no registered Celery task matches 'nothing.*'"),
    ],
)
def test_the_cli_refuses_what_cannot_be_bridged(setup: Setup, extra: list[str], expected: str) -> None:
    args = [sys.executable, "-m", "meshjobs", "celery-bridge", "tests.celery_tasks:app", *extra]
    done = subprocess.run(args, env=setup.env(setup.bridge.home), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_task_that_takes_too_long_is_a_timeout(alice: Client) -> None:
    started = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        await alice.submit("calc.sleep", {"seconds": 1.5}, timeout=0.6)
    assert info.value.exit_code == 4
    assert time.monotonic() - started < 1.5
    await asyncio.sleep(1.0)  # let the solo Celery worker finish the sleep before the module tears down
