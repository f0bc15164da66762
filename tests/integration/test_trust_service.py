"""The trust service on a real broker: the one writer of reputation, fed real signed results.

Workers here are the real runtime in this process (the live path, real
signatures); the service is the real one. Every record is read back through a
:class:`ReputationBook` that accepts only the service's key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from meshjobs import App, Client, TrustPolicy, Worker
from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.client import Outcome
from meshjobs.discovery import PeerInfo
from meshjobs.envelope import EVIDENCE_MAGIC, TRUST_MAGIC, seal_statement
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer, embedded
from meshjobs.infra.topology import OPERATOR, PEER_ROLES, TRUST_SERVICE
from meshjobs.router import Constraints, Router
from meshjobs.state import open_bucket, provision
from meshjobs.submit import SubmitOptions, Submitter
from meshjobs.trust.evidence import Evidence
from meshjobs.trust.quarantine import QuarantineBoard
from meshjobs.trust.record import Record
from meshjobs.trust.reputation import BUCKET, SUBJECT, ReputationBook
from meshjobs.trust.service import TrustService
from tests.conftest import cli_env, meshjobs

pytestmark = pytest.mark.integration

honest = App("honest-sq")
cheating = App("cheating-sq")


@honest.capability("svc.square", deterministic=True)
async def square(x: int) -> int:
    return x * x


@cheating.capability("svc.square", deterministic=True)
async def wrong_square(x: int) -> int:
    return x * x + 1


@dataclass
class Mesh:
    url: str
    operator: Identity  # runs the trust service; a submitter with full standing
    anchor: Identity  # a pre-trusted worker
    nc: Any
    client: Client
    book: ReputationBook
    service: TrustService
    task: asyncio.Task[None]
    workers: dict[str, Identity]

    async def record(self, peer: str, until: Callable[[Record], bool], timeout: float = 3.0) -> Record:
        """The peer's record once *until* holds (read as a fresh reader would), failing after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.book.record(peer)
            if until(record):
                return record
            assert time.monotonic() < deadline, f"record not as expected within {timeout} s: {record}"
            await asyncio.sleep(0.05)

    async def run(self, name: str, x: int, job_id: str) -> Outcome:
        return await self.client.submit(
            "svc.square", {"x": x}, peer=self.workers[name].public_key, job_id=job_id, timeout=10
        )


@pytest.fixture
async def mesh(broker: NatsServer) -> AsyncIterator[Mesh]:
    operator, anchor = Identity.generate(), Identity.generate()
    workers = {"anchor": anchor, "honest": Identity.generate(), "cheat": Identity.generate()}
    trusts = TrustPolicy(frozenset({operator.public_key}))
    started, conns = [], []
    for name, identity in workers.items():
        wnc = await nats.connect(broker.url)
        worker = Worker(cheating if name == "cheat" else honest, identity, trusts)
        await worker.start(wnc)
        started.append(worker)
        conns.append(wnc)
    policy = TrustPolicy(operators=frozenset({operator.public_key}), pretrusted=frozenset({anchor.public_key}))
    nc = await connect(broker.url, operator)
    service = await TrustService.open(nc, operator, policy)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), 10)
    client = await Client.connect(broker.url, operator)
    book = await ReputationBook.open(client.nc, operator, trust_services={operator.public_key})
    try:
        yield Mesh(broker.url, operator, anchor, nc, client, book, service, task, workers)
    finally:
        await book.close()
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()
        await nc.close()
        for worker in started:
            await worker.drain()
        for wnc in conns:
            await wnc.close()


async def test_on_a_closed_broker_only_the_trust_service_writes_reputation(tmp_path: Path) -> None:
    """Each key with only its role: an ordinary peer's write is refused; the service (its role alone) runs."""
    operator, service_key, peer = Identity.generate(), Identity.generate(), Identity.generate()
    admitted = {
        operator.public_key: frozenset({OPERATOR}),
        service_key.public_key: frozenset({TRUST_SERVICE}),
        peer.public_key: PEER_ROLES,
    }
    with embedded(tmp_path / "closed", port=0, monitor_port=0, admitted=admitted) as server:
        op_nc = await connect(server.url, operator)
        await provision(op_nc, MESH_STATE)
        await op_nc.close()
        svc_nc, peer_nc = await connect(server.url, service_key), await connect(server.url, peer)
        service = await TrustService.open(svc_nc, service_key, TrustPolicy())
        task = asyncio.create_task(service.run())
        worker = Worker(honest, peer, TrustPolicy())  # runs its own key's jobs
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            forged = Record(peer=peer.public_key, good=1000.0).stamped(peer.public_key)
            kv = await open_bucket(peer_nc, BUCKET, create=False)
            with pytest.raises(Rejected) as refused:
                await kv.put(peer.public_key, seal_statement(TRUST_MAGIC, peer, forged))
            assert refused.value.reason == Reason.DENIED
            # The peer may publish evidence; the service, with its role alone, folds it and signs the record.
            await worker.start(peer_nc)
            async with await Client.connect(server.url, peer) as client:
                done = await client.submit("svc.square", {"x": 2}, peer=peer.public_key, timeout=10)
                book = await ReputationBook.open(client.nc, peer, trust_services={service_key.public_key})
                await book.report(
                    "success",
                    peer.public_key,
                    job_id=done.job_id,
                    capability="svc.square",
                    request=done.request,
                    result=done.frame,
                )
                deadline = time.monotonic() + 5
                while (record := await book.record(peer.public_key)).successes != 1:
                    assert time.monotonic() < deadline, record
                    await asyncio.sleep(0.05)
            # A self-report by an unknown key is worth almost nothing, but it is on the record.
            assert record.service == service_key.public_key and record.score() < 0.05
        finally:
            await worker.drain()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await service.close()
            await svc_nc.close()
            await peer_nc.close()


async def test_real_results_become_signed_records_within_seconds(mesh: Mesh) -> None:
    job = "job-svc-000000001"
    mine, other = await mesh.run("honest", 3, job), await mesh.run("anchor", 3, job)
    assert mine.value == other.value == 9
    started = time.monotonic()
    peer = mesh.workers["honest"].public_key
    await mesh.book.publish(
        [
            mesh.book.evidence_for(
                "success",
                peer,
                job_id=job,
                capability="svc.square",
                request=mine.request,
                result=mine.frame,
                latency_ms=2.0,
            )
        ]
    )
    record = await mesh.record(peer, lambda r: r.successes == 1)
    await mesh.book.publish(
        [
            mesh.book.evidence_for(
                "agree",
                peer,
                job_id=job,
                capability="svc.square",
                request=mine.request,
                result=mine.frame,
                proof=[(other.request, other.frame)],
            )
        ]
    )
    record = await mesh.record(peer, lambda r: r.verified == 1)
    assert time.monotonic() - started < 3
    assert record.service == mesh.operator.public_key and record.jobs == 2 and record.latency_ms == 2.0
    assert record.good == pytest.approx(1.0, abs=0.01)  # the agreement added what the success had not
    assert 0.2 < record.score() < 0.5 and record.mean() > 0.6 and not record.quarantined
    assert 0.2 < record.trust() == record.credibility() < 0.5  # proven by agreeing with an anchor
    anchor = await mesh.book.record(mesh.anchor.public_key)
    assert anchor.anchor and anchor.trust() == 1.0 and anchor.service == mesh.operator.public_key


async def test_invalid_and_repeated_evidence_is_counted_never_folded(mesh: Mesh) -> None:
    job = "job-svc-000000002"
    outcome = await mesh.run("honest", 4, job)
    peer = mesh.workers["honest"].public_key
    book = mesh.book
    good = book.evidence_for(
        "success", peer, job_id=job, capability="svc.square", request=outcome.request, result=outcome.frame
    )
    bare = book.evidence_for("success", peer, job_id=job + "x", capability="svc.square")  # no proof
    lying = book.evidence_for(
        "agree",
        peer,
        job_id=job,
        capability="svc.square",
        request=outcome.request,
        result=outcome.frame,
        proof=[(outcome.request, outcome.frame)],
    )  # its own result
    invalid = mesh.service.stats["invalid"]
    await book.publish([good, bare, lying])
    # The same piece again, after the stream's duplicate window would have let it in.
    js = mesh.client.nc.jetstream(domain="hub")
    await js.publish(f"{SUBJECT}.{peer}", seal_statement(EVIDENCE_MAGIC, mesh.operator, good))
    record = await mesh.record(peer, lambda r: r.successes >= 1)
    await asyncio.sleep(0.5)
    assert (await book.record(peer)).jobs == 1 and record.successes == 1
    assert mesh.service.stats["invalid"] - invalid == 2 and mesh.service.stats["duplicate"] >= 1


async def test_a_forged_record_changes_no_score_route_or_quarantine(mesh: Mesh) -> None:
    job = "job-svc-000000003"
    bad, right = await mesh.run("cheat", 5, job), await mesh.run("anchor", 5, job)
    cheat = mesh.workers["cheat"].public_key
    await mesh.book.publish(
        [
            mesh.book.evidence_for(
                "wrong",
                cheat,
                job_id=job,
                capability="svc.square",
                request=bad.request,
                result=bad.frame,
                proof=[(right.request, right.frame)],
            )
        ]
    )
    genuine = await mesh.record(cheat, lambda r: r.quarantined)
    router = await _router(mesh)
    try:
        assert cheat not in {c.peer for c in await router.candidates("svc.square", Constraints())}
        # An unlisted key writes a glowing, unquarantined record (and a plain JSON one) over it.
        stranger = Identity.generate()
        kv = await open_bucket(mesh.client.nc, BUCKET, create=False)
        glowing = Record(peer=cheat, good=1000.0, seq=2**52).stamped(stranger.public_key)
        await kv.put(cheat, seal_statement(TRUST_MAGIC, stranger, glowing))
        await kv.put(mesh.workers["honest"].public_key, json.dumps({"peer": cheat, "alpha": 1000}).encode())
        await asyncio.sleep(0.5)
        assert (await router.book.record(cheat)).quarantined  # the running reader ignored it
        assert cheat not in {c.peer for c in await router.candidates("svc.square", Constraints())}
        trusted = await router.candidates("svc.square", Constraints(min_trust=0.5))
        assert cheat not in {c.peer for c in trusted}
        # A reader starting now finds the genuine record: the service wrote it again at once.
        fresh = await ReputationBook.open(mesh.client.nc, mesh.operator, trust_services={mesh.operator.public_key})
        now = await fresh.record(cheat)
        assert now.quarantined and now.good == genuine.good and now.service == mesh.operator.public_key
        assert mesh.service.stats["repaired"] >= 1
        entry = await kv.get(cheat)
        assert entry is not None and entry.value.startswith(b"MJ1T " + mesh.operator.public_key.encode())
    finally:
        await router.close()


async def _router(mesh: Mesh) -> Router:
    book = await ReputationBook.open(mesh.client.nc, mesh.operator, trust_services={mesh.operator.public_key})
    await book.watch()
    board = await QuarantineBoard.open(mesh.client.nc, frozenset({mesh.operator.public_key}))
    router = Router(mesh.client, book, board)
    deadline = time.monotonic() + 10
    while len(await _offering(router)) < 3:
        assert time.monotonic() < deadline, "workers did not appear in discovery"
        await asyncio.sleep(0.2)
    return router


async def _offering(router: Router) -> list[PeerInfo]:
    return [p for p in await router.client.peers(timeout=0.3) if "svc.square" in p.capabilities]


async def test_proven_wrong_results_quarantine_a_cheater_until_an_operator_releases_it(
    mesh: Mesh, tmp_path: Path
) -> None:
    cheat = mesh.workers["cheat"].public_key
    honest_peer = mesh.workers["honest"].public_key
    # A minority is not punished: the unknown honest peer does not outweigh the (unknown) cheater.
    job = "job-svc-000000004"
    bad, right = await mesh.run("cheat", 6, job), await mesh.run("honest", 6, job)
    await _wrong(mesh, cheat, job, bad, right)
    record = await mesh.record(cheat, lambda r: r.disputes == 1)
    assert not record.quarantined and record.bad == 0
    # The pre-trusted anchor does outweigh it: quarantined within seconds of the evidence.
    job = "job-svc-000000005"
    bad, right = await mesh.run("cheat", 7, job), await mesh.run("anchor", 7, job)
    started = time.monotonic()
    await _wrong(mesh, cheat, job, bad, right)
    record = await mesh.record(cheat, lambda r: r.quarantined)
    assert time.monotonic() - started < 2 and record.wrong == 1 and "outweighed" in record.reason
    assert not (await mesh.book.record(honest_peer)).quarantined
    # The chain behind it, as an operator reads it.
    home = tmp_path / "operator"
    save_identity(mesh.operator, home / IDENTITY_FILE)
    (home / "trust.toml").write_text(
        f'[[operator]]\nkey = "{mesh.operator.public_key}"\n[[pretrusted]]\nkey = "{mesh.anchor.public_key}"\n'
    )
    env = cli_env(home, mesh.url)
    shown = await asyncio.to_thread(meshjobs, "reputation", cheat, "--evidence", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["auto_quarantined"] is True and report["signed_by"] == mesh.operator.public_key
    kinds = [(e["kind"], e["proof_verified"], e["outweighed"]) for e in report["evidence"]]
    assert kinds == [("wrong", True, False), ("wrong", True, True)]
    assert report["evidence"][1]["agreeing"] == [{"worker": mesh.anchor.public_key, "trust": 1.0}]
    # `meshjobs release` lifts the automatic quarantine: the service honours the signed order.
    released = await asyncio.to_thread(meshjobs, "release", cheat, "--reason", "appeal granted", env=env)
    assert released.returncode == 0, released.stderr
    record = await mesh.record(cheat, lambda r: not r.quarantined)
    assert "appeal granted" in record.reason and record.wrong == 1
    text = await asyncio.to_thread(meshjobs, "reputation", cheat, "--evidence", env=env)
    assert "released by operator" in text.stdout and "outweighed the peer's" in text.stdout, text.stdout


async def test_plain_submit_takes_no_result_from_a_peer_the_service_quarantined(mesh: Mesh) -> None:
    """A quarantined worker that stays in its queue group (this one does not read the service's records,
    as a cheater would not) still never answers a plain submit: the submitter refuses and routes it."""
    cheat = mesh.workers["cheat"].public_key
    job = "job-svc-000000009"
    bad, right = await mesh.run("cheat", 9, job), await mesh.run("anchor", 9, job)
    await _wrong(mesh, cheat, job, bad, right)
    await mesh.record(cheat, lambda r: r.quarantined)
    router = await _router(mesh)
    try:
        deadline = time.monotonic() + 5
        while not router.refusal(cheat):
            assert time.monotonic() < deadline, "the router's watched copy never showed the quarantine"
            await asyncio.sleep(0.05)
        submitter = Submitter(mesh.client, router)
        answered: Counter[str] = Counter()
        for x in range(30):  # the queue group of three picks each member: (2/3)^30 that it never picks the cheat
            done = await submitter.submit("svc.square", {"x": x}, SubmitOptions(verify="off", timeout=10))
            assert done.outcome.value == x * x
            answered[done.outcome.worker] += 1
        assert cheat not in answered and sum(answered.values()) == 30
        # Asked for by name, it is refused before anything is sent.
        with pytest.raises(Rejected) as refused:
            await submitter.submit("svc.square", {"x": 2}, SubmitOptions(verify="off", peer=cheat, timeout=10))
        assert refused.value.code == Reason.QUARANTINED
    finally:
        await router.close()


def _noisy(index: int, *, compare: str) -> App:
    """A mean whose last bits differ by worker (floating point summed in another order, say)."""
    app = App(f"noisy-{index}")

    @app.capability("svc.mean", compare=compare)
    async def mean(xs: list[float]) -> float:
        ran.append(index)
        return sum(xs) / len(xs) * (1 + index * 1e-12)

    return app


ran: list[int] = []


async def test_a_declared_comparison_lets_noisy_peers_check_each_other_end_to_end(mesh: Mesh) -> None:
    """Real workers declare a tolerance; the submitter compares by it and the trust service folds the evidence."""
    ran.clear()
    identities = [Identity.generate() for _ in range(4)]
    trusts = TrustPolicy(frozenset({mesh.operator.public_key}))
    workers, conns = [], []
    for index, identity in enumerate(identities):  # the last one declares a much looser comparison
        conns.append(await nats.connect(mesh.url))
        workers.append(Worker(_noisy(index, compare="rel=0.5" if index == 3 else "rel=1e-9"), identity, trusts))
        await workers[-1].start(conns[-1])
    router = await _router(mesh)
    try:
        deadline = time.monotonic() + 10
        while len([p for p in await mesh.client.peers(timeout=0.3) if "svc.mean" in p.capabilities]) < 4:
            assert time.monotonic() < deadline, "workers did not appear in discovery"
            await asyncio.sleep(0.2)
        invalid, submitter = mesh.service.stats["invalid"], Submitter(mesh.client, router)
        done = await submitter.submit("svc.mean", {"xs": [0.1, 0.2, 0.7]}, SubmitOptions(verify="quorum:3/3"))
        assert done.outcome.value == pytest.approx(1 / 3, rel=1e-9) and done.executions == 3
        assert 3 not in ran and sorted(ran) == [0, 1, 2]  # the peer declaring another comparison checked nobody
        for identity in identities[:3]:  # each one's agreement, proven by the comparison, folded
            record = await mesh.record(identity.public_key, lambda r: r.jobs >= 1, timeout=5)
            assert record.wrong == 0 and not record.quarantined
        assert mesh.service.stats["invalid"] == invalid
    finally:
        await router.close()
        for worker in workers:
            await worker.drain()
        for nc in conns:
            await nc.close()


async def _wrong(mesh: Mesh, peer: str, job: str, bad: Outcome, right: Outcome) -> Evidence:
    evidence = mesh.book.evidence_for(
        "wrong",
        peer,
        job_id=job,
        capability="svc.square",
        request=bad.request,
        result=bad.frame,
        proof=[(right.request, right.frame)],
    )
    await mesh.book.publish([evidence])
    return evidence


async def test_a_restarted_service_resumes_without_counting_twice(mesh: Mesh) -> None:
    job = "job-svc-000000006"
    outcome = await mesh.run("honest", 8, job)
    peer = mesh.workers["honest"].public_key
    piece = mesh.book.evidence_for(
        "success", peer, job_id=job, capability="svc.square", request=outcome.request, result=outcome.frame
    )
    await mesh.book.publish([piece])
    before = await mesh.record(peer, lambda r: r.successes == 1)
    mesh.task.cancel()  # exactly one service per key at a time
    await asyncio.gather(mesh.task, return_exceptions=True)
    policy = TrustPolicy(operators=frozenset({mesh.operator.public_key}))
    again = await TrustService.open(mesh.nc, mesh.operator, policy)
    await _run_until_ready(again, _resend(mesh, piece, peer))
    assert again.state.last_seq >= mesh.service.state.last_seq - 1
    after = await mesh.book.record(peer)
    assert after.successes == 1 and after.good == before.good


def _resend(mesh: Mesh, piece: Evidence, peer: str) -> Callable[[], Awaitable[None]]:
    async def resend() -> None:
        js = mesh.client.nc.jetstream(domain="hub")
        await js.publish(f"{SUBJECT}.{peer}", seal_statement(EVIDENCE_MAGIC, mesh.operator, piece))
        await asyncio.sleep(1.0)

    return resend


async def _run_until_ready(service: TrustService, then: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await then()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()


def test_mesh_up_runs_the_trust_service_of_the_topology_and_down_stops_it(tmp_path: Path) -> None:
    """A closed two-region mesh whose operator key is also its trust service: records signed by it, end to end."""
    from meshjobs.infra.topology import load_topology
    from tests.integration.test_mesh_cli import mini_topology

    operator = Identity.generate()
    home = tmp_path / "home"
    save_identity(operator, home / IDENTITY_FILE)
    path = mini_topology(tmp_path, operator.public_key)
    text = path.read_text()
    path.write_text(text.replace("operators = [", f'trust_services = ["{operator.public_key}"]\noperators = [', 1))
    env, state = cli_env(home), tmp_path / "state"
    try:
        up = meshjobs("mesh", "up", "--topology", str(path), "--state", str(state), env=env, timeout=120)
        assert up.returncode == 0, up.stderr
        assert f"trust service started as {operator.public_key}" in up.stdout, up.stdout
        pid = int((state / "trust-service.pid").read_text())
        again = meshjobs("mesh", "up", "--topology", str(path), "--state", str(state), env=env, timeout=120)
        assert "trust service already running" in again.stdout, again.stdout
        assert int((state / "trust-service.pid").read_text()) == pid
        url = load_topology(path).client_url("s-1")  # the other region: evidence crosses the gateway

        async def folded() -> Record:
            nc = await connect(url, operator)
            try:
                book = await ReputationBook.open(nc, operator)
                peer = Identity.generate().public_key
                await book.report("timeout", peer, job_id="job-mesh-0000001", capability="svc.square")
                deadline = time.monotonic() + 10
                while (record := await book.record(peer)).timeouts != 1:
                    assert time.monotonic() < deadline, record
                    await asyncio.sleep(0.1)
                return record
            finally:
                await nc.close()

        record = asyncio.run(folded())
        assert record.service == operator.public_key and record.bad == 1.0
    finally:
        down = meshjobs("mesh", "down", "--topology", str(path), "--state", str(state), env=env, timeout=60)
    assert down.returncode == 0 and "trust-service" in down.stdout, down.stdout
    assert not Path(f"/proc/{pid}").exists() or b"trust" not in Path(f"/proc/{pid}/cmdline").read_bytes()
