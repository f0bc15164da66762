"""Durable jobs with real worker processes: crashes, a node kill, draining, poison, a full queue."""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshjobs._nats import connect
from meshjobs.durable import JOURNAL_FILE, STREAM, Durable, Journal, consumer_name
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer, embedded
from meshjobs.infra.mesh import LocalMesh
from meshjobs.infra.topology import Topology
from tests.closed_mesh import free_ports
from tests.conftest import WorkerProcess, cli_env, meshjobs

pytestmark = pytest.mark.integration


class Crew:
    """Worker processes of one identity, started and restarted by PID."""

    def __init__(self, home: Path, root: Path, exec_log: Path) -> None:
        self.home, self.root, self.exec_log = home, root, exec_log
        self.workers: list[WorkerProcess] = []

    def start(self, url: str, *extra: str, app: str = "tests.apps:chaos") -> WorkerProcess:
        log = self.root / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess.launch(app, self.home, url, log, *extra, MESHJOBS_TEST_EXEC_LOG=str(self.exec_log))
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture
def crew(tmp_path: Path, identity: Identity, home: Path) -> Iterator[Crew]:
    team = Crew(home, tmp_path, tmp_path / "executions.log")
    yield team
    team.stop_all()


def check(job_ids: list[str], results: dict[str, object], exec_log: Path) -> dict[str, int]:
    """The checker: lost, duplicate-result and unexpected counts, and repeated executions."""
    runs = collections.Counter(exec_log.read_text().split()) if exec_log.exists() else collections.Counter()
    counts = {
        "jobs": len(job_ids),
        "lost": sum(1 for j in job_ids if j not in results),
        "duplicate_result": 0,  # results are created once per job id: a second create fails
        "unexpected": sum(1 for j, v in results.items() if v != job_ids.index(j)),
        "repeated_executions": sum(n - 1 for j, n in runs.items() if j in set(job_ids) and n > 1),
    }
    print("checker:", counts)
    return counts


async def collect(durable: Durable, job_ids: list[str], timeout: float) -> tuple[dict[str, object], float]:
    """Wait for every result; returns {job id: value} and the longest stall between two results."""
    results: dict[str, object] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, stall = loop.time(), 0.0
    while len(results) < len(job_ids) and loop.time() < deadline:
        for job_id in job_ids:
            if job_id not in results:
                found = await durable.result(job_id)
                if found is not None:
                    results[job_id] = found[0].value
                    stall, last = max(stall, loop.time() - last), loop.time()
        await asyncio.sleep(0.05)
    return results, stall


async def test_worker_crashes_lose_nothing_and_store_one_result_each(
    broker: NatsServer, identity: Identity, crew: Crew
) -> None:
    for _ in range(3):
        crew.start(broker.url, "--concurrency", "2")
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc)
        job_ids = [await durable.submit(identity, "chaos.work", {"n": i, "ms": 100}) for i in range(240)]

        async def chaos() -> None:
            while True:  # bounded by the collect() deadline below
                await asyncio.sleep(1.0)
                alive = [w for w in crew.workers if w.proc.poll() is None]
                random.choice(alive).kill()  # SIGKILL by PID, mid-job
                crew.start(broker.url, "--concurrency", "2")

        monkey = asyncio.create_task(chaos())
        results, _ = await collect(durable, job_ids, timeout=90)
        monkey.cancel()
        counts = check(job_ids, results, crew.exec_log)
        assert counts["lost"] == 0 and counts["duplicate_result"] == 0 and counts["unexpected"] == 0
        assert sum(1 for w in crew.workers if w.proc.returncode == -signal.SIGKILL) >= 3
    finally:
        await nc.close()


async def test_sigterm_mid_load_loses_nothing_and_redelivers_nothing(
    broker: NatsServer, identity: Identity, crew: Crew
) -> None:
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc)
        job_ids = [await durable.submit(identity, "chaos.work", {"n": i, "ms": 100}) for i in range(60)]
        first = crew.start(broker.url, "--concurrency", "4")
        crew.start(broker.url, "--concurrency", "4")
        deadline = time.monotonic() + 30  # a loaded machine may take a while to start a worker
        while "serving" not in first.output() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        first.proc.send_signal(signal.SIGTERM)
        results, _ = await collect(durable, job_ids, timeout=60)
        assert await asyncio.to_thread(first.proc.wait, 30) == 0
        counts = check(job_ids, results, crew.exec_log)
        assert counts["lost"] == 0 and counts["repeated_executions"] == 0
        info = await durable.js.consumer_info(STREAM, consumer_name("chaos.work"))
        assert info.num_redelivered == 0
    finally:
        await nc.close()


async def test_poison_job_is_dead_lettered_while_healthy_jobs_flow(
    broker: NatsServer, identity: Identity, crew: Crew, home: Path
) -> None:
    crew.start(broker.url, "--max-attempts", "3", "--retry-delay", "0.1", app="workers.demo:app")
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc, journal=Journal(home / JOURNAL_FILE))  # the CLI's journal: it checks too
        poison = await durable.submit(identity, "demo.fail", {"message": "poison"})
        healthy = [await durable.submit(identity, "demo.add", {"a": i, "b": 1}) for i in range(20)]
        for i, job_id in enumerate(healthy):
            result, _ = await durable.wait(job_id, 30)
            assert result.value == i + 1
        result, _ = await durable.wait(poison, 30)
        assert result.status == "error" and "failed 3 time(s)" in (result.error.message if result.error else "")
        state = await durable.state(poison)
        assert state is not None and state.state == "dead" and state.attempts == 3
        dead = [d for d in await durable.dead_letters() if d["job_id"] == poison]
        assert len(dead) == 1 and "poison" in dead[0]["reason"] and dead[0]["attempts"] == 3
        out = await asyncio.to_thread(meshjobs, "jobs", "result", poison, env=cli_env(home, broker.url))
        assert out.returncode == 1 and "DeadLetter" in out.stderr
        listed = await asyncio.to_thread(meshjobs, "jobs", "dlq", env=cli_env(home, broker.url))
        assert poison in listed.stdout
    finally:
        await nc.close()


async def test_invalid_envelope_is_terminated_on_first_delivery(
    broker: NatsServer, identity: Identity, crew: Crew
) -> None:
    crew.start(broker.url, app="workers.demo:app")
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc)
        await durable.submit(identity, "demo.add", {"a": 0, "b": 0})  # let the worker create its consumer
        await asyncio.sleep(1.0)
        stranger = Identity.generate()
        forged = await durable.submit(stranger, "demo.add", {"a": 1, "b": 1})  # untrusted submitter
        await durable.js.publish("mesh.jobs.demo.add", b"garbage", headers={"Nats-Msg-Id": "garbage-1"})
        deadline = time.monotonic() + 10
        while True:
            info = await durable.js.consumer_info(STREAM, consumer_name("demo.add"))
            if info.num_pending == 0 and info.num_ack_pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0
        assert await durable.result(forged) is None  # terminated, never run
    finally:
        await nc.close()


async def test_full_queue_refuses_new_jobs_and_keeps_the_queued_ones(
    tmp_path: Path, identity: Identity, home: Path
) -> None:
    server = embedded(tmp_path / "small").start()
    try:
        nc = await connect(server.url, identity)
        try:
            durable = await Durable.open(nc, max_jobs=5)
            queued = [await durable.submit(identity, "demo.add", {"a": i, "b": 0}) for i in range(5)]
            with pytest.raises(Rejected) as info:
                await durable.submit(identity, "demo.add", {"a": 9, "b": 9})
            assert info.value.reason == Reason.QUEUE_FULL
            out = await asyncio.to_thread(
                meshjobs, "submit", "--durable", "demo.add", '{"a": 1, "b": 1}', env=cli_env(home, server.url)
            )
            assert out.returncode == 5 and "queue is full" in out.stderr and "[queue_full]" in out.stderr
            stream = await durable.js.stream_info(STREAM)
            assert stream.state.messages == 5 and len(queued) == 5
        finally:
            await nc.close()
    finally:
        server.stop()


PORT_FIELDS = ("client_port", "cluster_port", "gateway_port", "leaf_port", "monitor_port")


def cluster_topology(peer: str) -> Topology:
    ports = free_ports(15)
    nodes = [
        {"name": f"c-{i}", **{k: next(ports) for k in PORT_FIELDS}}
        for i in (1, 2, 3)
    ]  # fmt: skip
    return Topology.model_validate(
        {
            # An operator too: here the clients themselves create the mesh state.
            "mesh": {"name": "trio", "peers": [peer], "operators": [peer]},
            "region": [{"name": "solo", "sync_interval": "always", "nodes": nodes}],
        }
    )


async def test_hub_node_kill_loses_no_job(tmp_path: Path, identity: Identity, crew: Crew) -> None:
    topology = cluster_topology(identity.public_key)
    mesh = LocalMesh(topology, tmp_path / "trio", detach=False)
    mesh.up(timeout=60)
    urls = ",".join(topology.client_url(n) for n in ("c-1", "c-2", "c-3"))
    try:
        crew.start(urls)
        crew.start(",".join(reversed(urls.split(","))))
        nc = await connect(urls.split(","), identity)
        try:
            durable = await Durable.open(nc)
            info = await durable.js.stream_info(STREAM)
            assert info.config.num_replicas == 3
            for bucket in ("KV_job_results", "KV_job_claims", "KV_jobs"):  # never under-replicated by a forming cluster
                assert (await durable.js.stream_info(bucket)).config.num_replicas == 3
            leader = info.cluster.leader if info.cluster else "c-2"
            job_ids = [await durable.submit(identity, "chaos.work", {"n": i, "ms": 20}) for i in range(40)]
            mesh.started[leader].kill()  # SIGKILL by PID: the stream leader
            job_ids += [await durable.submit(identity, "chaos.work", {"n": 40 + i, "ms": 20}) for i in range(40)]
            results, stall = await collect(durable, job_ids, timeout=90)
            counts = check(job_ids, results, crew.exec_log)
            print(f"longest stall between results: {stall:.2f} s")
            assert counts["lost"] == 0 and counts["unexpected"] == 0
        finally:
            await nc.close()
    finally:
        crew.stop_all()
        for server in mesh.started.values():
            server.stop()


def test_durable_cli(broker: NatsServer, crew: Crew, home: Path) -> None:
    crew.start(broker.url, app="workers.demo:app")
    env = cli_env(home, broker.url)
    done = meshjobs("submit", "--durable", "demo.add", '{"a": 20, "b": 22}', "--wait", "30", env=env)
    assert done.returncode == 0 and done.stdout == "42\n", done.stderr
    queued = meshjobs("submit", "--durable", "demo.echo", '{"x": 1}', env=env)
    job_id = queued.stdout.strip()
    waited = meshjobs("jobs", "wait", job_id, "--timeout", "30", env=env)
    assert waited.returncode == 0, waited.stderr
    assert meshjobs("jobs", "result", job_id, env=env).stdout == '{"x": 1}\n'
    assert " done " in meshjobs("jobs", "status", job_id, env=env).stdout
    assert job_id in meshjobs("jobs", "list", "--state", "done", env=env).stdout
    assert meshjobs("jobs", "status", "nope-00000000", env=env).returncode == 2


async def test_a_dead_job_can_be_redriven_by_its_submitter(
    broker: NatsServer, identity: Identity, crew: Crew, home: Path, tmp_path: Path
) -> None:
    """Dead-lettered because no attempt succeeded; re-driven once the cause is fixed, it runs again."""
    flag = tmp_path / "fixed"
    crew.start(broker.url, "--max-attempts", "2", "--retry-delay", "0.05", app="tests.apps:fixable")
    env = cli_env(home, broker.url)
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc, journal=Journal(home / JOURNAL_FILE))
        job_id = await durable.submit(identity, "fix.me", {"flag": str(flag)})
        result, _ = await durable.wait(job_id, 30)
        assert result.status == "error"
        flag.write_text("ok")
        stranger = cli_env(tmp_path / "stranger", broker.url)
        refused = await asyncio.to_thread(meshjobs, "jobs", "dlq", "--redrive", job_id, env=stranger)
        assert refused.returncode == 2 and "only its submitter" in refused.stderr
        redriven = await asyncio.to_thread(meshjobs, "jobs", "dlq", "--redrive", job_id, env=env)
        assert redriven.returncode == 0, redriven.stderr
        out = await asyncio.to_thread(meshjobs, "jobs", "result", job_id, "--wait", "30", env=env)
        assert out.returncode == 0 and out.stdout == '"fixed"\n', out.stderr
    finally:
        await nc.close()


async def test_a_job_that_crashes_its_worker_is_contained(broker: NatsServer, identity: Identity, crew: Crew) -> None:
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc)
        job_id = await durable.submit(identity, "crash.me", {})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await durable.result(job_id) is None and loop.time() < deadline:
            if not crew.workers or crew.workers[-1].proc.poll() is not None:
                crew.start(broker.url, "--max-attempts", "2", app="tests.apps:crasher")  # restart after each crash
            await asyncio.sleep(0.2)
        result, _ = await durable.wait(job_id, 1)
        assert result.status == "error" and "without finishing" in (result.error.message if result.error else "")
        assert [w.proc.returncode for w in crew.workers[:2]] == [70, 70]  # it crashed twice, then was contained
        assert crew.workers[-1].proc.poll() is None
    finally:
        await nc.close()


async def test_a_replayed_frame_is_terminated_and_runs_once(broker: NatsServer, identity: Identity, crew: Crew) -> None:
    """Another copy of a job's signed frame in the queue (a new message id) finds its first delivery claimed."""
    crew.start(broker.url, "--concurrency", "2")
    nc = await connect(broker.url, identity)
    try:
        durable = await Durable.open(nc)
        job_id = await durable.submit(identity, "chaos.work", {"n": 0, "ms": 10})
        result, _ = await durable.wait(job_id, 30)
        assert result.value == 0
        entry = durable.journal.get(job_id)
        assert entry is not None
        for copy in range(2):
            await durable.js.publish("mesh.jobs.chaos.work", entry.frame, headers={"Nats-Msg-Id": f"replay-{copy}"})
        deadline = time.monotonic() + 15
        while True:
            info = await durable.js.consumer_info(STREAM, consumer_name("chaos.work"))
            if info.num_pending == 0 and info.num_ack_pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0
        assert crew.exec_log.read_text().split().count(job_id) == 1
        assert (await durable.wait(job_id, 1))[0].value == 0  # the one result stands
    finally:
        await nc.close()
