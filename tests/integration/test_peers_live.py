"""Workers as they run: tags in discovery and routing, capabilities offered and withdrawn live,
and a quarantined worker leaving its queue groups (and rejoining when released)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from meshjobs import App, Client, Constraints, JobTimeout, NoPeerError, SubmitOptions, Submitter, TrustPolicy, Worker
from meshjobs.durable import Durable
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer
from meshjobs.router import Router
from meshjobs.trust.policy import TRUST_FILE
from meshjobs.trust.quarantine import issue_order
from tests.conftest import cli_env, meshjobs

pytestmark = pytest.mark.integration


@dataclass
class Live:
    url: str
    prefix: str
    app: App
    worker: Worker
    submitter: Identity
    operator: Identity
    runs: list[str]


@pytest.fixture
async def live(broker: NatsServer) -> AsyncIterator[Live]:
    prefix = f"l{secrets.token_hex(4)}"
    runs: list[str] = []
    app = App("live")

    @app.capability(f"{prefix}.audit", tags=["security", "review"], idempotent=True)
    async def audit(code: str) -> str:
        runs.append("audit")
        return f"audited {len(code)}"

    @app.capability(f"{prefix}.slow", idempotent=True)
    async def slow(seconds: float) -> str:
        runs.append("slow")
        await asyncio.sleep(seconds)
        return "finished"

    submitter, operator = Identity.generate(), Identity.generate()
    policy = TrustPolicy(frozenset({submitter.public_key}), operators=frozenset({operator.public_key}))
    worker = Worker(app, Identity.generate(), policy)
    nc = await nats.connect(broker.url)
    await worker.start(nc)
    try:
        yield Live(broker.url, prefix, app, worker, submitter, operator, runs)
    finally:
        await worker.drain()
        await nc.close()


async def wait_until(predicate: object, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await predicate():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


async def test_tags_show_in_discovery_and_route(live: Live) -> None:
    cap = f"{live.prefix}.audit"
    async with await Client.connect(live.url, live.submitter) as client:
        [info] = [p for p in await client.peers(timeout=0.5) if p.peer == live.worker.peer]
        assert info.tags_of(cap) == ("review", "security")
        submitter = Submitter(client, await Router.open(client, frozenset()))
        async with submitter:
            done = await submitter.submit(
                cap, {"code": "x=1"}, SubmitOptions(constraints=Constraints(tags=("security",)))
            )
            assert done.outcome.value == "audited 3"
            with pytest.raises(NoPeerError):
                await submitter.submit(cap, {"code": "x"}, SubmitOptions(constraints=Constraints(tags=("docs",))))


async def test_offer_and_withdraw_while_running(live: Live) -> None:
    new = f"{live.prefix}.fresh"

    @live.app.capability(new, idempotent=True)
    async def fresh(n: int) -> int:
        return n + 1

    async with await Client.connect(live.url, live.submitter) as client:
        await live.worker.offer(new)

        async def offered() -> bool:
            return any(new in p.capabilities for p in await client.peers(timeout=0.3))

        assert await wait_until(offered, 1.0) <= 1.0
        assert (await client.submit(new, {"n": 1}, timeout=5)).value == 2
        # Withdraw a capability while one of its jobs runs: that job finishes, new ones find nobody.
        slow = f"{live.prefix}.slow"
        running = asyncio.create_task(client.submit(slow, {"seconds": 1.0}, timeout=10))
        await asyncio.sleep(0.3)
        await live.worker.withdraw(slow)

        async def withdrawn() -> bool:
            return not any(slow in p.capabilities for p in await client.peers(timeout=0.3))

        assert await wait_until(withdrawn, 1.0) <= 1.0
        assert (await running).value == "finished"
        with pytest.raises(NoPeerError):
            await client.submit(slow, {"seconds": 0}, timeout=3, peer_wait=0.5)


async def test_a_quarantined_worker_leaves_its_queue_groups(live: Live) -> None:
    cap = f"{live.prefix}.audit"
    operator_nc = await nats.connect(live.url)
    try:
        async with await Client.connect(live.url, live.submitter) as client:
            assert (await client.submit(cap, {"code": "a"}, timeout=5)).value == "audited 1"
            operators = frozenset({live.operator.public_key})
            await issue_order(operator_nc, live.operator, live.worker.peer, "quarantine", "test", operators=operators)

            async def gone() -> bool:
                try:
                    await client.submit(cap, {"code": "b"}, timeout=0.5, peer_wait=0.2)
                except NoPeerError:
                    return True
                except JobTimeout:  # sent just as the worker unsubscribed: not gone for sure yet
                    return False
                return False

            assert await wait_until(gone, 2.0) <= 2.0
            await issue_order(operator_nc, live.operator, live.worker.peer, "release", "cleared", operators=operators)

            async def back() -> bool:
                return not await gone()

            assert await wait_until(back, 3.0) <= 3.0
    finally:
        await operator_nc.close()


async def test_a_quarantined_worker_takes_no_durable_jobs_until_released(live: Live) -> None:
    cap = f"{live.prefix}.audit"
    operator_nc = await nats.connect(live.url)
    operators = frozenset({live.operator.public_key})
    try:
        async with await Client.connect(live.url, live.submitter) as client:
            durable = await Durable.open(client.nc)
            first = await durable.submit(live.submitter, cap, {"code": "ab"})
            assert (await durable.wait(first, 10))[0].value == "audited 2"
            await issue_order(operator_nc, live.operator, live.worker.peer, "quarantine", "test", operators=operators)

            async def quarantined() -> bool:
                return live.worker.quarantined()

            await wait_until(quarantined, 1.0)
            await asyncio.sleep(1.2)  # a pull already waiting when the order came ends within a second
            held = await durable.submit(live.submitter, cap, {"code": "abc"})
            with pytest.raises(JobTimeout):
                await durable.wait(held, 2.0)  # the only worker is quarantined: the job waits in the queue
            assert "audit" not in live.runs[1:]
            await issue_order(operator_nc, live.operator, live.worker.peer, "release", "cleared", operators=operators)
            assert (await durable.wait(held, 10))[0].value == "audited 3"
    finally:
        await operator_nc.close()


async def test_a_durable_result_from_a_worker_ignoring_its_quarantine_is_refused(
    broker: NatsServer, tmp_path: Path
) -> None:
    """This worker reads no operator's orders (a cheater would not either), so it keeps taking durable jobs;
    the submitter, whose policy lists the operator, shows none of its results: CLI and library alike."""
    cap = f"s{secrets.token_hex(4)}.audit"
    app = App("stubborn")

    @app.capability(cap, idempotent=True)
    async def audit(code: str) -> str:
        return f"audited {len(code)}"

    submitter, operator = Identity.generate(), Identity.generate()
    worker = Worker(app, Identity.generate(), TrustPolicy(frozenset({submitter.public_key})))
    home = tmp_path / "home"
    save_identity(submitter, home / IDENTITY_FILE)
    (home / TRUST_FILE).write_text(f'[[operator]]\nkey = "{operator.public_key}"\n')
    env = cli_env(home, broker.url)
    nc = await nats.connect(broker.url)
    await worker.start(nc)
    try:
        done = await asyncio.to_thread(meshjobs, "submit", "--durable", cap, '{"code": "ab"}', "--wait", "10", env=env)
        assert done.returncode == 0 and done.stdout == '"audited 2"\n', done.stderr
        operators = frozenset({operator.public_key})
        await issue_order(nc, operator, worker.peer, "quarantine", "cheats", operators=operators)
        out = await asyncio.to_thread(meshjobs, "submit", "--durable", cap, '{"code": "abc"}', "--wait", "10", env=env)
        assert out.returncode == 5 and "[quarantined]" in out.stderr and "audited" not in out.stdout, out
        queued = await asyncio.to_thread(meshjobs, "submit", "--durable", cap, '{"code": "abcd"}', env=env)
        job_id = queued.stdout.strip()
        shown = await asyncio.to_thread(meshjobs, "jobs", "result", job_id, "--wait", "10", env=env)
        assert shown.returncode == 5 and "[quarantined]" in shown.stderr and "audited" not in shown.stdout, shown
        async with await Client.connect(broker.url, submitter) as client:
            async with await Submitter.open(client, TrustPolicy(operators=operators)) as library:
                job = await library.enqueue(cap, {"code": "abcde"})
                with pytest.raises(Rejected) as refused:
                    await library.wait(job, 10)
                assert refused.value.code == Reason.QUARANTINED
    finally:
        await worker.drain()
        await nc.close()
