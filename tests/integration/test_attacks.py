"""Attacks on the live path by a peer the workers do not trust, on a real broker.

Each test asserts the attack fails (nothing runs twice, nothing foreign is
accepted, a flood buys nothing) and that valid work is still served.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest

from meshjobs import App, Client, JobTimeout, Worker, WorkerConfig
from meshjobs.envelope import digest, open_result, seal_envelope, seal_result
from meshjobs.errors import Reason
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer
from meshjobs.trust.policy import TrustPolicy

pytestmark = pytest.mark.integration


@dataclass
class Pair:
    """Two workers of one capability, a trusted submitter, and a count of executions."""

    url: str
    cap: str
    submitter: Identity
    workers: list[Worker]
    keys: list[str]
    runs: list[int] = field(default_factory=list)


@pytest.fixture
async def pair(broker: NatsServer) -> AsyncIterator[Pair]:
    cap = f"a{secrets.token_hex(4)}.work"
    runs: list[int] = []
    app = App("target")

    @app.capability(cap)
    async def work(n: int) -> int:
        runs.append(n)
        return n * 10

    submitter = Identity.generate()
    config = WorkerConfig(sender_rate=50.0, refusal_rate=20.0)
    identities = [Identity.generate(), Identity.generate()]
    workers = [Worker(app, i, TrustPolicy(frozenset({submitter.public_key})), config) for i in identities]
    conns = [await nats.connect(broker.url) for _ in workers]
    for worker, nc in zip(workers, conns, strict=True):
        await worker.start(nc)
    try:
        yield Pair(broker.url, cap, submitter, workers, [i.public_key for i in identities], runs)
    finally:
        for worker, nc in zip(workers, conns, strict=True):
            if worker.draining:
                await nc.close()
                continue
            await worker.drain()
            await nc.close()


async def valid_work_still_served(pair: Pair) -> None:
    async with await Client.connect(pair.url, pair.submitter) as client:
        assert (await client.submit(pair.cap, {"n": 4}, timeout=10)).value == 40


async def test_replay_with_another_reply_subject_never_runs(pair: Pair) -> None:
    nc = await nats.connect(pair.url)
    try:
        inbox = nc.new_inbox()
        _, frame = seal_envelope(
            pair.submitter, pair.cap, {"n": 1}, audience=f"mesh.cmd.{pair.cap}",
            job_id=secrets.token_hex(8), ttl_ms=30_000, reply=inbox,
        )  # fmt: skip
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"mesh.cmd.{pair.cap}", frame, timeout=1.0)  # the attacker's own inbox
        assert pair.runs == []
    finally:
        await nc.close()
    await valid_work_still_served(pair)


async def test_replay_to_a_fresh_worker_is_refused_mesh_wide(pair: Pair, broker: NatsServer) -> None:
    """A worker that never saw the envelope (no local replay memory) still refuses its replay."""
    nc = await nats.connect(pair.url)
    fresh_nc = await nats.connect(pair.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        _, frame = seal_envelope(
            pair.submitter, pair.cap, {"n": 2}, audience=f"mesh.cmd.{pair.cap}",
            job_id=secrets.token_hex(8), ttl_ms=30_000, reply=inbox,
        )  # fmt: skip
        await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        assert open_result((await sub.next_msg(timeout=10)).data).status == "ok"
        for worker in pair.workers:  # the workers that saw it leave the queue group
            await worker.drain()
        fresh = Worker(pair.workers[0].app, Identity.generate(), TrustPolicy(frozenset({pair.submitter.public_key})))
        await fresh.start(fresh_nc)
        await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        replayed = open_result((await sub.next_msg(timeout=10)).data)
        assert replayed.worker == fresh.peer and replayed.status == "rejected"
        assert replayed.error is not None and replayed.error.code == Reason.REPLAY.value
        assert pair.runs == [2]
        await fresh.drain()
    finally:
        await nc.close()
        await fresh_nc.close()


async def test_foreign_results_are_ignored(pair: Pair) -> None:
    """A rogue that sees every command (a plain subscription) answers first, signed by its own key."""
    rogue = Identity.generate()
    nc = await nats.connect(pair.url)

    async def answer(msg: Any) -> None:
        body_start = msg.data.index(b"\n") + 1
        job_id = json.loads(msg.data[body_start:])["job_id"]
        await msg.respond(seal_result(rogue, request_digest=digest(msg.data), job_id=job_id, status="ok", value=666))

    await nc.subscribe(f"mesh.cmd.{pair.cap}", cb=answer)
    await nc.flush()
    try:
        async with await Client.connect(pair.url, pair.submitter) as client:
            client.accept_workers = frozenset(pair.keys)
            for n in range(5):
                outcome = await client.submit(pair.cap, {"n": n}, timeout=10)
                assert outcome.value == n * 10 and outcome.worker in pair.keys
            client.accept_workers = None
            outcome = await client.submit(pair.cap, {"n": 9}, timeout=10, peer=pair.keys[0])
            assert outcome.value == 90 and outcome.worker == pair.keys[0]
            client.accept_workers = frozenset({Identity.generate().public_key})
            with pytest.raises(JobTimeout):  # only foreign results: none accepted
                await client.submit(pair.cap, {"n": 1}, timeout=1)
    finally:
        await nc.close()


async def test_a_junk_flood_buys_nothing(pair: Pair) -> None:
    """Thousands of junk and stranger frames: few signed rejections go out, valid jobs still run."""
    stranger = Identity.generate()
    nc = await nats.connect(pair.url)
    try:
        inbox = nc.new_inbox()
        replies: list[Any] = []

        async def collect(msg: Any) -> None:
            replies.append(msg)

        await nc.subscribe(inbox, cb=collect)
        _, strange = seal_envelope(
            stranger, pair.cap, {"n": 1}, audience=f"mesh.cmd.{pair.cap}", job_id=secrets.token_hex(8), ttl_ms=30_000
        )
        for i in range(3000):
            frame = strange if i % 2 else b"MJ1E " + secrets.token_bytes(200)
            await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        await nc.flush()
        await valid_work_still_served(pair)
        await asyncio.sleep(0.5)
        # Two workers, a refusal budget of 20/s with a burst of 40 each: far fewer than 3000.
        assert len(replies) < 200, len(replies)
        assert pair.runs == [4]
    finally:
        await nc.close()


async def test_one_sender_is_rate_limited(pair: Pair) -> None:
    nc = await nats.connect(pair.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        frames = [
            seal_envelope(
                pair.submitter, pair.cap, {"n": i}, audience=f"mesh.cmd.{pair.cap}",
                job_id=secrets.token_hex(8), ttl_ms=30_000, reply=inbox,
            )[1]
            for i in range(400)
        ]  # fmt: skip
        for frame in frames:
            await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        results = [open_result((await sub.next_msg(timeout=10)).data) for _ in range(400)]
        overloaded = [r for r in results if r.error is not None and r.error.code == Reason.OVERLOADED.value]
        # 50/s with a burst of 100 per worker: about 200 pass at once, the rest are told to retry.
        assert 100 <= len(overloaded) <= 300, len(overloaded)
        assert len(pair.runs) == 400 - len(overloaded)
    finally:
        await nc.close()
