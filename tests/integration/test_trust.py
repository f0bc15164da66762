"""Trust-routed execution with real worker processes: an honest, a dishonest and a flaky peer.

A trust service runs in the test (as the submitter's identity, as `meshjobs up`
runs it, so the submitter's router accepts its records without listing it);
honest-a is pre-trusted in its policy. Records appear once it has folded the
evidence, so tests wait for them with :func:`settled`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshjobs import Client, HandlerError, JobTimeout, NoPeerError, Rejected
from meshjobs._nats import connect
from meshjobs.errors import Reason
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer
from meshjobs.router import Constraints, Router
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import issue_order
from meshjobs.trust.record import Record
from meshjobs.trust.reputation import ReputationBook
from meshjobs.trust.service import TrustService
from meshjobs.verify import Verifier
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs

pytestmark = pytest.mark.integration


@dataclass
class Cast:
    submitter: Identity
    operator: Identity
    homes: dict[str, Path]
    keys: dict[str, str]
    url: str
    peers: dict[str, Identity]


@pytest.fixture
async def cast(tmp_path: Path, broker: NatsServer) -> AsyncIterator[Cast]:
    submitter, operator = Identity.generate(), Identity.generate()
    trust = (
        f'[[peer]]\nkey = "{submitter.public_key}"\n\n[[peer]]\nkey = "{operator.public_key}"\n\n'
        f'[[operator]]\nkey = "{operator.public_key}"\n\n[[trust_service]]\nkey = "{submitter.public_key}"\n'
    )
    homes, keys, peers = {}, {}, {}
    for name in ("submitter", "operator", "honest-a", "honest-b", "dishonest", "flaky"):
        identity = {"submitter": submitter, "operator": operator}.get(name) or Identity.generate()
        homes[name] = tmp_path / name
        save_identity(identity, homes[name] / IDENTITY_FILE)
        (homes[name] / "trust.toml").write_text(trust)
        keys[name], peers[name] = identity.public_key, identity
    policy = TrustPolicy(operators=frozenset({operator.public_key}), pretrusted=frozenset({keys["honest-a"]}))
    nc = await connect(broker.url, submitter)
    service = await TrustService.open(nc, submitter, policy)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        yield Cast(submitter, operator, homes, keys, broker.url, peers)
    finally:
        # Bounded: a service stopped in the middle of a write must not hold the suite.
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        await asyncio.wait_for(service.close(), 10)
        await asyncio.wait_for(nc.close(), 10)


async def settled(book: ReputationBook, peer: str, until: Callable[[Record], bool], timeout: float = 5) -> Record:
    """The peer's record as the router reads it (its watched copy), once it shows what *until* waits for.

    Not the bucket read directly: the bucket can have the record a few milliseconds before the
    router's watch delivers it, and the next routing decision reads the watched copy.
    """
    deadline = time.monotonic() + timeout
    while not until(record := (await book.records([peer]))[peer]):
        assert time.monotonic() < deadline, f"the trust service did not get there within {timeout} s: {record}"
        await asyncio.sleep(0.05)
    return record


@pytest.fixture
def workers(cast: Cast, tmp_path: Path) -> AsyncIterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, app: str) -> WorkerProcess:
        worker = WorkerProcess.launch(app, cast.homes[name], cast.url, tmp_path / f"{name}.log", "--name", name)
        started.append(worker)
        return worker

    yield start  # type: ignore[misc]
    for worker in started:
        worker.kill()


async def router_for(cast: Cast, names: list[str]) -> tuple[Client, Router]:
    client = await Client.connect(cast.url, cast.submitter, liveness=1.0)
    router = await Router.open(client, frozenset({cast.operator.public_key}))
    wanted = {cast.keys[n] for n in names}
    deadline = time.monotonic() + 20
    while wanted - {c.peer for c in await router.candidates("math.square", Constraints())}:
        assert time.monotonic() < deadline, "workers did not appear in discovery"
        router.rediscover()  # a fresh discovery round
        await asyncio.sleep(0.2)
    return client, router


async def test_redundancy_outvotes_and_quarantines_a_cheater(cast: Cast, workers: Callable[..., WorkerProcess]) -> None:
    workers("honest-a", "tests.apps:honest")
    workers("honest-b", "tests.apps:honest")
    workers("dishonest", "tests.apps:dishonest")
    client, router = await router_for(cast, ["honest-a", "honest-b", "dishonest"])
    cheater = cast.keys["dishonest"]
    try:
        for i in range(1, 13):
            done = await Verifier(router).submit_quorum("math.square", {"x": i}, replicas=3, quorum=2, timeout=20)
            assert done.outcome.value == i * i  # the dishonest result is never returned
            await router.flush()
            if i == 1:
                assert cheater in done.dissenting
                # Outweighed by the pre-trusted honest-a: proven wrong, quarantined by the trust service at once.
                record = await settled(router.book, cheater, lambda r: r.quarantined)
            else:
                # Quarantined: it gets no more work.
                assert cheater not in {a.peer for a in done.trace}, done.trace
        assert record.wrong == 1 and record.score() < 0.05 and "outweighed" in record.reason
        honest = await settled(router.book, cast.keys["honest-b"], lambda r: r.jobs == 12)
        assert honest.score() > 0.4 and not honest.quarantined
        evidence = await router.book.evidence(cheater)
        assert [e.kind for e, _ in evidence if e] == ["wrong"]
        assert all(e.result and e.result.startswith("MJ1R ") for e, _ in evidence if e)  # the cheater's own signature
        assert all(len(e.proof) == 2 for e, _ in evidence if e)  # both honest signed results
        # The README's command: the quarantined cheater is no candidate, the two honest peers agree.
        env = cli_env(cast.homes["submitter"], cast.url)
        args = ("submit", "math.square", '{"x": 12}', "--replicas", "3", "--quorum", "2")
        shown = await asyncio.to_thread(meshjobs, *args, env=env)
        assert shown.returncode == 0 and shown.stdout.strip() == "144", shown.stderr
    finally:
        await router.close()
        await client.close()


@pytest.mark.timeout(240)  # a hung job and 20 jobs on a loaded machine: a deadline for correctness only
async def test_min_trust_avoids_a_flaky_peer_and_fallback_completes_everything(
    cast: Cast, workers: Callable[..., WorkerProcess]
) -> None:
    workers("honest-b", "tests.apps:honest")
    workers("flaky", "tests.apps:flaky")
    client, router = await router_for(cast, ["honest-b", "flaky"])
    flaky, honest = cast.keys["flaky"], cast.keys["honest-b"]
    try:
        # Unknown peers score 0 (a lower credible bound): nobody passes --min-trust 0.5 yet.
        with pytest.raises(NoPeerError):
            await router.submit("math.square", {"x": 1}, constraints=Constraints(min_trust=0.5), timeout=5)
        first = await router.submit("math.square", {"x": 2}, constraints=Constraints(peer=flaky), timeout=10)
        assert first.outcome.worker == flaky and first.outcome.value == 4  # flaky's job 0 succeeds
        with pytest.raises(HandlerError):  # job 1 fails
            await router.submit("math.square", {"x": 3}, constraints=Constraints(peer=flaky), timeout=10)
        with pytest.raises(JobTimeout):  # job 2 hangs: a timeout is evidence too
            await router.submit("math.square", {"x": 4}, constraints=Constraints(peer=flaky), timeout=3)
        for x in range(10):
            done = await router.submit("math.square", {"x": x}, constraints=Constraints(peer=honest), timeout=10)
            assert done.outcome.value == x * x
        await router.flush()
        bad = await settled(router.book, flaky, lambda r: r.jobs == 3)
        good = await settled(router.book, honest, lambda r: r.jobs == 10)
        assert bad.failures == 1 and bad.timeouts == 1 and bad.score() < 0.05 and not bad.quarantined
        assert good.score() > 0.4 > 0.3 > bad.score()
        # Only the honest peer qualifies now, and every job completes.
        for x in range(10):
            done = await router.submit("math.square", {"x": x}, constraints=Constraints(min_trust=0.3), timeout=10)
            assert done.outcome.value == x * x
            assert {a.peer for a in done.trace} == {honest}
    finally:
        await router.close()
        await client.close()


async def test_manual_quarantine_is_honoured_within_two_seconds(
    cast: Cast, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    workers("honest-a", "tests.apps:honest")
    workers("honest-b", "tests.apps:honest")
    client, router = await router_for(cast, ["honest-a", "honest-b"])
    target = cast.keys["honest-b"]
    operator_nc = await connect(cast.url, cast.operator)
    try:
        started = time.monotonic()
        await issue_order(operator_nc, cast.operator, target, "quarantine", "caught cheating")
        await issue_order(operator_nc, cast.operator, cast.submitter.public_key, "quarantine", "sends junk")
        # A router: skips the peer.
        while target in {c.peer for c in await router.candidates("math.square", Constraints())}:
            await asyncio.sleep(0.05)
        router_seconds = time.monotonic() - started
        # A worker: refuses the quarantined submitter's envelopes.
        while True:
            try:
                await client.submit("math.square", {"x": 1}, peer=cast.keys["honest-a"], timeout=5)
            except Rejected as exc:
                assert exc.reason == Reason.QUARANTINED
                break
            await asyncio.sleep(0.05)
        worker_seconds = time.monotonic() - started
        assert router_seconds < 2 and worker_seconds < 2, (router_seconds, worker_seconds)
        # A submitter: refuses the quarantined peer's results (another submitter, through the CLI).
        other = cast.homes["operator"]
        out = await asyncio.to_thread(
            meshjobs, "submit", "math.square", '{"x": 3}', "--peer", target, env=cli_env(other, cast.url)
        )
        assert out.returncode == 5 and "[quarantined]" in out.stderr, out.stderr
        listed = await asyncio.to_thread(meshjobs, "peers", "--json", env=cli_env(other, cast.url))
        rows = {r["peer"]: r for r in json.loads(listed.stdout)}
        assert rows[target]["quarantined"] is True and rows[cast.keys["honest-a"]]["quarantined"] is False
        assert {"score", "kind", "region"} <= set(rows[target])
        await issue_order(operator_nc, cast.operator, target, "release", "cleared")
        deadline = time.monotonic() + 2
        while target not in {c.peer for c in await router.candidates("math.square", Constraints())}:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await issue_order(operator_nc, cast.operator, cast.submitter.public_key, "release", "test over")
        await operator_nc.close()
        await router.close()
        await client.close()


def test_only_operators_may_quarantine(cast: Cast) -> None:
    out = meshjobs("quarantine", cast.keys["flaky"], "--reason", "x", env=cli_env(cast.homes["submitter"], cast.url))
    assert out.returncode == 2 and "not an operator" in out.stderr
    operator = cli_env(cast.homes["operator"], cast.url)
    done = meshjobs("quarantine", cast.keys["flaky"], "--reason", "serves stale data", env=operator)
    assert done.returncode == 0 and "quarantine:" in done.stdout
    shown = json.loads(meshjobs("reputation", cast.keys["flaky"], "--json", env=operator).stdout)
    assert shown["quarantine"]["action"] == "quarantine" and shown["quarantine"]["reason"] == "serves stale data"
    released = meshjobs("release", cast.keys["flaky"], "--reason", "fixed", env=operator)
    assert released.returncode == 0
    shown = json.loads(meshjobs("reputation", cast.keys["flaky"], "--json", env=operator).stdout)
    assert shown["quarantine"]["action"] == "release"


async def test_concurrent_updaters_lose_no_update(cast: Cast) -> None:
    """5 processes each publish 20 pieces of evidence about the same peer at once; the service folds all 100."""
    peer = Identity.generate()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reputation_writer", cast.url, "20", f"w{n}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for n in range(5)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(cast.submitter.seed_text() + "\n" + peer.seed_text() + "\n")
        proc.stdin.close()
    for proc in procs:
        assert await asyncio.to_thread(proc.wait, 120) == 0, proc.stderr.read() if proc.stderr else ""
    nc = await connect(cast.url, cast.submitter)
    try:
        book = await ReputationBook.open(nc, cast.submitter)
        record = await settled(book, peer.public_key, lambda r: r.successes == 100, timeout=15)
        assert record.jobs == 100 and record.service == cast.submitter.public_key
        evidence = await book.evidence(peer.public_key, limit=1000)
        assert len(evidence) == 100 and all(e is not None for e, _ in evidence)
        # The latest evidence published again (a publish that timed out but was stored, retried): counts once.
        latest = evidence[-1][0]
        assert latest is not None
        await book.publish([latest.model_copy(update={"id": "0" * 32})])
        await asyncio.sleep(1.0)
        assert (await book.record(peer.public_key)).successes == 100
    finally:
        await nc.close()


async def test_per_capability_policy(broker: NatsServer, tmp_path: Path) -> None:
    import nats

    from meshjobs import App, TrustPolicy, Worker

    app = App("scoped")

    @app.capability("scoped.read")
    async def read() -> str:
        return "ok"

    @app.capability("scoped.write")
    async def write() -> str:
        return "written"

    reader, me = Identity.generate(), Identity.generate()
    policy = TrustPolicy(frozenset({reader.public_key}), capabilities={reader.public_key: ("scoped.read",)})
    worker = Worker(app, me, policy)
    wnc = await nats.connect(broker.url)
    await worker.start(wnc)
    try:
        async with await Client.connect(broker.url, reader) as client:
            assert (await client.submit("scoped.read")).value == "ok"
            with pytest.raises(Rejected) as info:
                await client.submit("scoped.write")
            assert info.value.reason == Reason.DENIED
    finally:
        await worker.drain()
        await wnc.close()
