"""Queue groups, failover and draining with real worker processes."""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from meshjobs import Client
from meshjobs.identity import IDENTITY_FILE, Identity, load_identity, save_identity
from meshjobs.infra.broker import NatsServer, embedded
from tests.conftest import WorkerProcess, cli_env, meshjobs, wait_for_instances

pytestmark = pytest.mark.integration


def second_peer(tmp_path: Path, submitter: Identity) -> tuple[Path, str]:
    """Another worker identity that trusts *submitter*."""
    home = tmp_path / "peer-b"
    other = Identity.generate()
    save_identity(other, home / IDENTITY_FILE)
    (home / "trust.toml").write_text(f'[[peer]]\nkey = "{submitter.public_key}"\n')
    return home, other.public_key


async def test_two_workers_share_the_queue_group(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, identity: Identity, tmp_path: Path
) -> None:
    home_b, key_b = second_peer(tmp_path, identity)
    start_worker()
    start_worker(worker_home=home_b)
    await wait_for_instances(broker.url, identity, 2, "demo.add")
    async with await Client.connect(broker.url, identity) as client:
        outcomes = await asyncio.gather(*(client.submit("demo.add", {"a": i, "b": 1}) for i in range(200)))
    assert [o.value for o in outcomes] == [i + 1 for i in range(200)]
    by_worker = collections.Counter(o.worker for o in outcomes)
    assert set(by_worker) == {identity.public_key, key_b}
    assert min(by_worker.values()) >= 20, by_worker


async def test_killed_worker_fails_over(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, identity: Identity, tmp_path: Path
) -> None:
    home_b, key_b = second_peer(tmp_path, identity)
    victim = start_worker()
    start_worker(worker_home=home_b)
    await wait_for_instances(broker.url, identity, 2, "demo.sleep")
    async with await Client.connect(broker.url, identity, liveness=1.0) as client:
        # 20 jobs of 2 s on 32 free slots: every job is in flight when the victim dies.
        jobs = [asyncio.create_task(client.submit("demo.sleep", {"seconds": 2.0}, timeout=30)) for _ in range(20)]
        await asyncio.sleep(0.5)
        victim.kill()  # SIGKILL by PID, with jobs in flight on it
        outcomes = await asyncio.gather(*jobs)
        assert all(o.value == 2.0 for o in outcomes)
        after = [await client.submit("demo.add", {"a": 1, "b": 1}) for _ in range(10)]
    assert {o.worker for o in after} == {key_b}
    assert {o.worker for o in outcomes} == {key_b}  # the victim's jobs were lost and ran again on b
    assert any(o.attempts > 1 for o in outcomes)


async def test_sigterm_drains_in_flight_work(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, identity: Identity
) -> None:
    worker = start_worker()
    await wait_for_instances(broker.url, identity, 1, "demo.sleep")
    async with await Client.connect(broker.url, identity) as client:
        job = asyncio.create_task(client.submit("demo.sleep", {"seconds": 1.0}, timeout=20))
        await asyncio.sleep(0.3)
        worker.proc.send_signal(signal.SIGTERM)
        outcome = await job
        assert outcome.value == 1.0 and outcome.attempts == 1
        assert await asyncio.to_thread(worker.proc.wait, 20) == 0
    assert "draining: 1 job(s) in flight" in worker.output()


async def test_drain_timeout_hands_work_back(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, identity: Identity, tmp_path: Path
) -> None:
    first = start_worker("--drain-timeout", "0.3")
    await wait_for_instances(broker.url, identity, 1, "demo.sleep")
    async with await Client.connect(broker.url, identity) as client:
        job = asyncio.create_task(client.submit("demo.sleep", {"seconds": 2.0}, timeout=30))
        await asyncio.sleep(0.3)
        home_b, key_b = second_peer(tmp_path, identity)
        start_worker(worker_home=home_b)
        await wait_for_instances(broker.url, identity, 2, "demo.sleep")
        first.proc.send_signal(signal.SIGTERM)
        outcome = await job
    assert outcome.value == 2.0
    assert outcome.worker == key_b and outcome.attempts >= 2
    assert await asyncio.to_thread(first.proc.wait, 20) == 0
    assert "handing back 1 unfinished job(s)" in first.output()
    assert load_identity(tmp_path / "home" / IDENTITY_FILE).public_key == identity.public_key


async def test_worker_reconnects_after_the_broker_restarts(identity: Identity, tmp_path: Path) -> None:
    """A worker outlives its broker: it keeps reconnecting and serves again once the broker is back."""
    first = embedded(tmp_path / "own-broker").start()
    port = first.port
    url = first.url
    home = tmp_path / "home"
    log = tmp_path / "reconnect-worker.log"
    worker = WorkerProcess.launch("workers.demo:app", home, url, log)
    second = None
    try:
        await wait_for_instances(url, identity, 1, "demo.add")
        first.stop()
        await asyncio.sleep(3)
        assert worker.proc.poll() is None, worker.output()
        second = embedded(tmp_path / "own-broker", port=port).start()
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            out = await asyncio.to_thread(meshjobs, "submit", "demo.add", '{"a": 1, "b": 2}', env=cli_env(home, url))
            if out.returncode == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        assert out.returncode == 0, out.stderr + worker.output()
        assert out.stdout == "3\n"
        assert "reconnected to NATS" in worker.output()
    finally:
        worker.terminate(timeout=20)
        if second is not None:
            second.stop()
