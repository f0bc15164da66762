"""A real worker on a real nats-server: adversarial messages never reach handler code.

Each test asserts that the handler did not run and that the worker kept
serving (a valid command afterwards still succeeds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import pytest

from meshjobs import App, Client, HandlerError, JobTimeout, NoPeerError, Rejected, UsageError
from meshjobs.envelope import DOMAIN, ENVELOPE_MAGIC, HEADER_LEN, digest, open_result, seal_envelope, seal_result
from meshjobs.errors import Reason
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.worker import Worker
from meshjobs.trust.policy import TrustPolicy

pytestmark = pytest.mark.integration


@dataclass
class Rig:
    url: str
    cap: str
    other_cap: str
    worker_identity: Identity
    submitter: Identity
    worker: Worker
    nc: Any
    runs: list[dict[str, Any]] = field(default_factory=list)

    def envelope(self, args: dict[str, Any] | None = None, *, cap: str | None = None, **kw: Any) -> bytes:
        cap = cap or self.cap
        kw.setdefault("audience", f"mesh.cmd.{cap}")
        kw.setdefault("job_id", f"job-{secrets.token_hex(6)}")
        kw.setdefault("ttl_ms", 30_000)
        return seal_envelope(kw.pop("signer", self.submitter), cap, args or {"x": 1}, **kw)[1]

    async def send(self, frame: bytes, subject: str | None = None) -> Any:
        msg = await self.nc.request(subject or f"mesh.cmd.{self.cap}", frame, timeout=5)
        result = open_result(msg.data)
        assert result.worker == self.worker_identity.public_key
        assert result.request_digest == digest(frame)
        return result

    async def still_serving(self) -> None:
        runs = len(self.runs)
        async with await Client.connect(self.url, self.submitter) as client:
            outcome = await client.submit(self.cap, {"x": 42}, timeout=5)
        assert outcome.value == {"x": 42}
        assert len(self.runs) == runs + 1


@pytest.fixture
async def rig(broker: NatsServer) -> AsyncIterator[Rig]:
    suffix = secrets.token_hex(4)
    cap, other = f"t{suffix}.echo", f"t{suffix}.other"
    runs: list[dict[str, Any]] = []
    app = App("rig")

    @app.capability(cap)
    async def echo(x: int) -> dict[str, int]:
        runs.append({"x": x})
        return {"x": x}

    @app.capability(other)
    async def other_handler(x: int) -> int:
        runs.append({"other": x})
        return x

    @app.capability(f"t{suffix}.slow")
    async def slow(seconds: float) -> float:
        runs.append({"slow": seconds})
        await asyncio.sleep(seconds)
        return seconds

    @app.capability(f"t{suffix}.boom")
    def boom() -> None:
        raise ValueError("it broke")

    worker_identity, submitter = Identity.generate(), Identity.generate()
    policy = TrustPolicy(frozenset({submitter.public_key}))
    worker = Worker(app, worker_identity, policy, WorkerConfig(heartbeat_interval_s=0.2, max_message_bytes=65536))
    wnc = await nats.connect(broker.url)
    nc = await nats.connect(broker.url)
    await worker.start(wnc)
    rig = Rig(broker.url, cap, other, worker_identity, submitter, worker, nc, runs)
    try:
        yield rig
    finally:
        await worker.drain()
        await nc.close()
        await wnc.close()


async def test_round_trip_with_signed_result(rig: Rig) -> None:
    async with await Client.connect(rig.url, rig.submitter) as client:
        outcome = await client.submit(rig.cap, {"x": 7})
    assert outcome.value == {"x": 7}
    assert outcome.worker == rig.worker_identity.public_key
    assert outcome.record()["signed_result"].startswith("MJ1R ")
    assert rig.runs == [{"x": 7}]


async def rejected(rig: Rig, frame: bytes, reason: Reason, subject: str | None = None) -> None:
    result = await rig.send(frame, subject)
    assert result.status == "rejected"
    assert result.error is not None and result.error.code == reason.value, result.error
    assert rig.runs == []
    await rig.still_serving()


async def test_flipped_body_byte(rig: Rig) -> None:
    frame = bytearray(rig.envelope())
    frame[-3] ^= 1
    await rejected(rig, bytes(frame), Reason.BAD_SIGNATURE)


async def test_flipped_signature_byte(rig: Rig) -> None:
    frame = bytearray(rig.envelope())
    frame[80] = ord("A") if frame[80] != ord("A") else ord("B")
    await rejected(rig, bytes(frame), Reason.BAD_SIGNATURE)


async def test_key_swapped(rig: Rig) -> None:
    frame = rig.envelope()
    swapped = frame[:5] + Identity.generate().public_key.encode() + frame[61:]
    await rejected(rig, swapped, Reason.BAD_SIGNATURE)


async def test_replay_of_a_captured_envelope(rig: Rig) -> None:
    frame = rig.envelope({"x": 5})
    first = await rig.send(frame)
    assert first.status == "ok" and rig.runs == [{"x": 5}]
    rig.runs.clear()
    await rejected(rig, frame, Reason.REPLAY)


async def test_expired(rig: Rig) -> None:
    from meshjobs.envelope import now_ms

    await rejected(rig, rig.envelope(issued_at=now_ms() - 600_000, ttl_ms=1000), Reason.EXPIRED)


async def test_future_dated(rig: Rig) -> None:
    from meshjobs.envelope import now_ms

    await rejected(rig, rig.envelope(issued_at=now_ms() + 600_000), Reason.NOT_YET_VALID)


async def test_oversized(rig: Rig) -> None:
    await rejected(rig, rig.envelope({"x": 1, "pad": "y" * 100_000}), Reason.TOO_LARGE)


def forge(rig: Rig, body: bytes) -> bytes:
    sig = base64.urlsafe_b64encode(rig.submitter.sign(DOMAIN[ENVELOPE_MAGIC] + body)).rstrip(b"=")
    return b"MJ1E " + rig.submitter.public_key.encode() + b" " + sig + b"\n" + body


def body(rig: Rig, **changes: Any) -> dict[str, Any]:
    value = json.loads(rig.envelope()[HEADER_LEN:])
    value.update(changes)
    return value


async def test_duplicate_json_keys(rig: Rig) -> None:
    raw = json.dumps(body(rig)).encode()
    raw = raw[:-1] + b',"args":{"x":2}}'
    await rejected(rig, forge(rig, raw), Reason.MALFORMED)


async def test_nan(rig: Rig) -> None:
    raw = json.dumps(body(rig, args={"x": float("nan")})).encode()
    await rejected(rig, forge(rig, raw), Reason.MALFORMED)


async def test_unknown_field(rig: Rig) -> None:
    await rejected(rig, forge(rig, json.dumps(body(rig, admin=True)).encode()), Reason.SCHEMA)


async def test_wrong_version(rig: Rig) -> None:
    await rejected(rig, forge(rig, json.dumps(body(rig, version=2)).encode()), Reason.UNKNOWN_VERSION)


@pytest.mark.parametrize("capability", ["t.*", "t.>", "t..x", "T.X", "with space"])
async def test_wildcard_or_malformed_capability(rig: Rig, capability: str) -> None:
    raw = json.dumps(body(rig, capability=capability, audience=f"mesh.cmd.{rig.cap}")).encode()
    await rejected(rig, forge(rig, raw), Reason.BAD_CAPABILITY)


async def test_envelope_resent_on_another_capability_subject(rig: Rig) -> None:
    frame = rig.envelope({"x": 3})
    await rejected(rig, frame, Reason.WRONG_AUDIENCE, subject=f"mesh.cmd.{rig.other_cap}")


async def test_envelope_for_one_peer_resent_to_the_queue(rig: Rig) -> None:
    frame = rig.envelope({"x": 3}, audience=f"mesh.peer.{rig.worker_identity.public_key}.cmd.{rig.cap}")
    await rejected(rig, frame, Reason.WRONG_AUDIENCE)


async def test_untrusted_submitter(rig: Rig) -> None:
    await rejected(rig, rig.envelope(signer=Identity.generate()), Reason.UNTRUSTED)


async def test_garbage_gets_a_signed_rejection(rig: Rig) -> None:
    await rejected(rig, b"\x00" * 300, Reason.MALFORMED)


async def test_strangers_get_exactly_the_refusal_budget_of_signed_rejections(broker: NatsServer) -> None:
    """refusal_rate 5/s allows a burst of 10 signed rejections: a flood of 200 gets those, not half of them."""
    cap = f"t{secrets.token_hex(4)}.echo"
    app = App("budget")

    @app.capability(cap)
    def echo(x: int) -> int:
        return x

    me, stranger = Identity.generate(), Identity.generate()
    worker = Worker(app, me, TrustPolicy(frozenset({me.public_key})), WorkerConfig(refusal_rate=5.0))
    wnc, nc = await nats.connect(broker.url), await nats.connect(broker.url)
    await worker.start(wnc)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.monotonic()
        for n in range(200):
            job = f"job-{n:08d}"
            _, frame = seal_envelope(stranger, cap, {"x": n}, audience=f"mesh.cmd.{cap}", ttl_ms=30_000, job_id=job)
            await nc.publish(f"mesh.cmd.{cap}", frame, reply=inbox)
        await nc.flush()
        await asyncio.sleep(0.3)
        elapsed = time.monotonic() - started
        replies = []
        while True:
            try:
                replies.append(open_result((await sub.next_msg(timeout=0.2)).data))
            except nats.errors.TimeoutError:
                break
        assert all(r.status == "rejected" and r.error is not None and r.error.code == "untrusted" for r in replies)
        assert 10 <= len(replies) <= 10 + 5 * elapsed + 1, (len(replies), elapsed)
        assert worker.rejected == len(replies)  # the rest were dropped before any crypto
    finally:
        await worker.drain()
        await nc.close()
        await wnc.close()


async def test_direct_addressing(rig: Rig) -> None:
    async with await Client.connect(rig.url, rig.submitter) as client:
        outcome = await client.submit(rig.cap, {"x": 9}, peer=rig.worker_identity.public_key)
        assert outcome.value == {"x": 9}
        with pytest.raises(NoPeerError, match="not offered by peer"):
            await client.submit(rig.cap, {"x": 9}, peer=Identity.generate().public_key, peer_wait=0.2)


async def test_same_job_id_never_runs_twice(rig: Rig) -> None:
    async with await Client.connect(rig.url, rig.submitter) as client:
        first = await client.submit(rig.cap, {"x": 1}, job_id="fixed-job-0001")
        again = await client.submit(rig.cap, {"x": 1}, job_id="fixed-job-0001")
        assert first.value == again.value == {"x": 1}
        assert rig.runs == [{"x": 1}]
        with pytest.raises(Rejected) as info:
            await client.submit(rig.cap, {"x": 2}, job_id="fixed-job-0001")
        assert info.value.reason == Reason.JOB_CONFLICT


async def test_handler_error_invalid_args_and_timeout(rig: Rig) -> None:
    suffix = rig.cap.split(".")[0]
    async with await Client.connect(rig.url, rig.submitter) as client:
        with pytest.raises(HandlerError, match="ValueError: it broke"):
            await client.submit(f"{suffix}.boom")
        with pytest.raises(UsageError, match="x: Input should be a valid integer"):
            await client.submit(rig.cap, {"x": "nope"})
        with pytest.raises(JobTimeout):
            await client.submit(f"{suffix}.slow", {"seconds": 3}, timeout=0.5)


async def test_long_job_outlives_liveness_through_heartbeats(rig: Rig) -> None:
    suffix = rig.cap.split(".")[0]
    async with await Client.connect(rig.url, rig.submitter, liveness=0.5) as client:
        outcome = await client.submit(f"{suffix}.slow", {"seconds": 1.5}, timeout=10)
    assert outcome.value == 1.5
    assert outcome.attempts == 1
    assert rig.runs.count({"slow": 1.5}) == 1


async def test_forged_result_is_refused_by_the_submitter(broker: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    """A rogue responder answers with results that are not bound to the request: ignored, never printed."""
    cap = f"t{secrets.token_hex(4)}.rogue"
    rogue = Identity.generate()
    nc = await nats.connect(broker.url)

    async def respond(msg: Any) -> None:
        mode = json.loads(msg.data[HEADER_LEN:])["args"]["mode"]
        if mode == "digest":
            frame = seal_result(rogue, request_digest="0" * 64, job_id=None, status="ok", value=1)
        elif mode == "tamper":
            real = json.loads(msg.data[HEADER_LEN:])
            frame = seal_result(rogue, request_digest=digest(msg.data), job_id=real["job_id"], status="ok", value=1)
            frame = frame.replace(b'"value":1', b'"value":2')
        else:
            real = json.loads(msg.data[HEADER_LEN:])
            frame = seal_result(rogue, request_digest=digest(msg.data), job_id="other-job-000", status="ok", value=1)
        await msg.respond(frame)

    await nc.subscribe(f"mesh.cmd.{cap}", queue=f"mesh.cmd.{cap}", cb=respond)
    await nc.flush()
    try:
        async with await Client.connect(broker.url, Identity.generate()) as client:
            for mode, reason in [
                ("digest", Reason.RESULT_MISMATCH),
                ("tamper", Reason.BAD_SIGNATURE),
                ("job", Reason.RESULT_MISMATCH),
            ]:
                caplog.clear()
                # A junk reply does not end the attempt: the real answer may
                # still come. Here none does, so the deadline ends it.
                with pytest.raises(JobTimeout):
                    await client.submit(cap, {"mode": mode}, timeout=1)
                assert f"[{reason.value}]" in caplog.text
    finally:
        await nc.close()


async def test_nobody_offers_fails_fast(client: Client) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NoPeerError):
        await client.submit(f"nobody{secrets.token_hex(4)}.here", timeout=30, peer_wait=0.5)
    assert loop.time() - started < 5


async def test_concurrency_is_bounded(broker: NatsServer) -> None:
    cap = f"t{secrets.token_hex(4)}.busy"
    active, peak = 0, 0
    app = App("bounded")

    @app.capability(cap)
    async def busy() -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.2)
        active -= 1
        return peak

    me = Identity.generate()
    worker = Worker(app, me, TrustPolicy(frozenset()), WorkerConfig(concurrency=2))
    wnc = await nats.connect(broker.url)
    await worker.start(wnc)
    try:
        async with await Client.connect(broker.url, me) as client:
            outcomes = await asyncio.gather(*(client.submit(cap, timeout=20) for _ in range(8)))
        assert len(outcomes) == 8
        assert peak == 2
    finally:
        await worker.drain()
        await wnc.close()


async def test_services_protocol_lists_the_worker(rig: Rig) -> None:
    from meshjobs.discovery import collect

    me = rig.worker_identity.public_key
    infos = [i for i in await collect(rig.nc, "$SRV.INFO.meshjobs") if i["metadata"].get("peer") == me]
    assert len(infos) == 1
    info = infos[0]
    assert info["type"] == "io.nats.micro.v1.info_response" and info["name"] == "meshjobs"
    assert info["metadata"]["kind"] == "system"
    subjects = {e["subject"]: e for e in info["endpoints"]}
    assert subjects[f"mesh.cmd.{rig.cap}"]["queue_group"] == f"mesh.cmd.{rig.cap}"
    assert subjects[f"mesh.cmd.{rig.cap}"]["metadata"]["capability"] == rig.cap
    assert f"mesh.peer.{me}.cmd.{rig.cap}" in subjects
    pings = await collect(rig.nc, f"$SRV.PING.meshjobs.{info['id']}")
    assert [p["type"] for p in pings] == ["io.nats.micro.v1.ping_response"]
    await rig.still_serving()
    stats = (await collect(rig.nc, f"$SRV.STATS.meshjobs.{info['id']}"))[0]
    echo = next(e for e in stats["endpoints"] if e["subject"] == f"mesh.cmd.{rig.cap}")
    assert echo["num_requests"] == 1 and echo["num_errors"] == 0 and echo["processing_time"] > 0
