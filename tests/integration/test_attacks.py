"""Attacks on the live path by a peer the workers do not trust, on real brokers.

Each attack runs against a closed mesh (tests/closed_mesh.py) from its hub
and from its community leaf: the attacker (an admitted ordinary peer no
worker trusts) and the trusted submitter connect there, one worker sits
beside them and one across the leaf link. The attacks that predate the closed
mesh also still run on the open session broker. Each test asserts the attack
fails (nothing runs twice, nothing foreign is accepted, a flood buys nothing,
a crafted frame is refused unrun) and that valid work is still served.
Where a closed broker stops an attack before it can even be attempted, the
test asserts that refusal and then tries the way that is still open.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from meshjobs import App, Client, JobTimeout, Worker, WorkerConfig
from meshjobs._nats import connect
from meshjobs.envelope import ENVELOPE_MAGIC, _dumps, _seal, digest, open_result, seal_envelope, seal_result
from meshjobs.errors import ConnectError, Reason
from meshjobs.identity import Identity
from meshjobs.subjects import peer_subject
from meshjobs.trust.policy import TrustPolicy
from tests.closed_mesh import Site, refused

pytestmark = pytest.mark.integration

MAX_FRAME = 64 * 1024  # the workers' frame limit here, below the broker's 1 MiB max_payload
SKEW_S = 0.5  # the workers' clock-skew tolerance here, so a captured envelope expires within the test


@pytest.fixture(params=["open", "hub", "leaf"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


CLOSED = pytest.mark.parametrize("where", ["hub", "leaf"])


@dataclass
class Pair:
    """Two workers of one capability (beside the attacker and across the leaf link), a trusted submitter."""

    site: Site
    cap: str
    other: str  # a second capability the same workers serve
    submitter: Identity
    attacker: Identity
    workers: list[Worker]
    keys: list[str]
    runs: list[int] = field(default_factory=list)
    conns: list[NATS] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.site.url

    async def start_worker(self, name: str, url: str) -> Worker:
        app = App("target")

        @app.capability(self.cap)
        async def work(n: int) -> int:
            self.runs.append(n)
            return n * 10

        @app.capability(self.other)
        async def other(n: int) -> int:
            self.runs.append(-n)
            return -n

        config = WorkerConfig(
            sender_rate=50.0, refusal_rate=20.0, durable=False, max_message_bytes=MAX_FRAME, clock_skew_s=SKEW_S
        )
        identity = self.site.ids[name]
        worker = Worker(app, identity, TrustPolicy(frozenset({self.submitter.public_key})), config)
        nc = await self.site.connect(name, url)
        self.conns.append(nc)
        await worker.start(nc)
        return worker


@pytest.fixture
async def pair(site: Site) -> AsyncIterator[Pair]:
    cap = f"a{secrets.token_hex(4)}.work"
    pair = Pair(site, cap, f"{cap}2", site.ids["sub"], site.ids["attacker"], [], [])
    try:
        for name, url in (("w1", site.url), ("w2", site.other)):
            pair.workers.append(await pair.start_worker(name, url))
            pair.keys.append(site.ids[name].public_key)
        await ready(pair)
        yield pair
    finally:
        for worker in pair.workers:
            if not worker.draining:
                await worker.drain()
        for nc in pair.conns:
            await nc.close()


async def ready(pair: Pair, timeout: float = 10.0) -> None:
    """Until both workers answer discovery where the submitter is (interest crosses the leaf link)."""
    async with await Client.connect(pair.url, pair.submitter) as client:
        deadline = time.monotonic() + timeout
        while {p.peer for p in await client.peers(timeout=0.3, capability=pair.cap)} < set(pair.keys):
            assert time.monotonic() < deadline, "the workers never appeared"


async def valid_work_still_served(pair: Pair, n: int = 4) -> None:
    async with await Client.connect(pair.url, pair.submitter) as client:
        assert (await client.submit(pair.cap, {"n": n}, timeout=10)).value == n * 10


def envelope(pair: Pair, n: int, reply: str | None, *, signer: Identity | None = None, ttl_ms: int = 30_000) -> bytes:
    return seal_envelope(
        signer or pair.submitter, pair.cap, {"n": n}, audience=f"mesh.cmd.{pair.cap}",
        job_id=secrets.token_hex(8), ttl_ms=ttl_ms, reply=reply,
    )[1]  # fmt: skip


# -- replays, foreign results, floods (also on the open broker) ---------------------------


async def test_replay_with_another_reply_subject_never_runs(pair: Pair) -> None:
    """A captured envelope (signed for the submitter's inbox) replayed by the attacker with its own inbox."""
    frame = envelope(pair, 1, f"_INBOX.{pair.submitter.public_key}.captured")
    errors: list[str] = []
    nc = await pair.site.raw("attacker", errors)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"mesh.cmd.{pair.cap}", frame, timeout=1.0)  # the attacker's own inbox
        assert pair.runs == [] and not refused(errors)  # it was delivered, and dropped unrun
    finally:
        await nc.close()
    await valid_work_still_served(pair)


async def test_replay_to_a_fresh_worker_is_refused_mesh_wide(pair: Pair) -> None:
    """A worker that never saw the envelope (no local replay memory, across the leaf link) refuses its replay."""
    victim = await pair.site.connect("sub")
    errors: list[str] = []
    attacker = await pair.site.raw("attacker", errors)
    try:
        inbox = victim.new_inbox()
        sub = await victim.subscribe(inbox)
        frame = envelope(pair, 2, inbox)
        await victim.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        assert open_result((await sub.next_msg(timeout=10)).data).status == "ok"
        for worker in pair.workers:  # the workers that saw it leave the queue group
            await worker.drain()
        fresh = await pair.start_worker("w3", pair.site.other)
        pair.workers.append(fresh)
        pair.keys = [fresh.peer]
        await ready(pair)
        # The attacker replays the captured frame with its signed reply subject, so it would be answered.
        await attacker.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        replayed = open_result((await sub.next_msg(timeout=10)).data)
        assert replayed.worker == fresh.peer and replayed.status == "rejected"
        assert replayed.error is not None and replayed.error.code == Reason.REPLAY.value
        assert pair.runs == [2] and not refused(errors)
        await valid_work_still_served(pair)  # the fresh worker serves valid work
        assert pair.runs == [2, 4]
    finally:
        await victim.close()
        await attacker.close()


async def answer_as(nc: NATS, subject: str, queue: str, forge: Callable[[Msg], bytes]) -> list[Msg]:
    """Answer every command the attacker receives on *subject* with *forge*; returns what it answered."""
    answered: list[Msg] = []

    async def answer(msg: Msg) -> None:
        await msg.respond(forge(msg))
        answered.append(msg)

    await nc.subscribe(subject, queue=queue, cb=answer)
    await nc.flush()
    return answered


async def spy_queue(nc: NATS, errors: list[str], subject: str, site: Site) -> str:
    """The queue group through which the attacker gets a copy of every command on *subject*.

    On the open broker a plain subscription. On a closed mesh the plain one
    is refused (asserted here) and the known limit is used: a queue group of
    its own named under ``mesh.cmd.`` (README, Roles).
    """
    if not site.closed:
        return ""
    await nc.subscribe(subject)
    await nc.flush()
    await asyncio.sleep(0.1)  # the server's -ERR is asynchronous
    assert refused(errors, "for subscription to"), errors
    errors.clear()
    return f"mesh.cmd.spy{secrets.token_hex(3)}"


async def test_foreign_results_are_ignored(pair: Pair) -> None:
    """A rogue that sees every command answers first, signed by its own key."""
    rogue = pair.attacker
    errors: list[str] = []
    nc = await pair.site.raw("attacker", errors)

    def forge(msg: Msg) -> bytes:
        job_id = json.loads(msg.data[msg.data.index(b"\n") + 1 :])["job_id"]
        return seal_result(rogue, request_digest=digest(msg.data), job_id=job_id, status="ok", value=666)

    try:
        queue = await spy_queue(nc, errors, f"mesh.cmd.{pair.cap}", pair.site)
        answered = await answer_as(nc, f"mesh.cmd.{pair.cap}", queue, forge)
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
        assert answered and not refused(errors)  # the forgeries went out, and the broker let them through
    finally:
        await nc.close()
    await valid_work_still_served(pair)


async def test_a_junk_flood_buys_nothing(pair: Pair) -> None:
    """Thousands of junk and stranger frames: few signed rejections go out, valid jobs still run."""
    nc = await pair.site.raw("attacker")
    try:
        inbox = nc.new_inbox()
        replies: list[Any] = []

        async def collect(msg: Any) -> None:
            replies.append(msg)

        await nc.subscribe(inbox, cb=collect)
        strange = envelope(pair, 1, inbox, signer=pair.attacker)  # a key no worker trusts
        for i in range(3000):
            frame = strange if i % 2 else b"MJ1E " + secrets.token_bytes(200)
            await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=inbox)
        await nc.flush()
        await valid_work_still_served(pair)
        await asyncio.sleep(0.5)
        # Two workers, a refusal budget of 20/s with a burst of 40 each: far fewer than 3000.
        assert 0 < len(replies) < 200, len(replies)
        assert pair.runs == [4]
    finally:
        await nc.close()


async def test_one_sender_is_rate_limited(pair: Pair) -> None:
    nc = await pair.site.connect("sub")
    try:
        # One reply subject per request, as a client has: a closed broker lets a worker answer each
        # request's own reply subject a bounded number of times (allow_responses), not a shared one forever.
        inbox = nc.new_inbox()
        sub = await nc.subscribe(f"{inbox}.*")
        frames = [envelope(pair, i, f"{inbox}.{i}") for i in range(400)]
        for i, frame in enumerate(frames):
            await nc.publish(f"mesh.cmd.{pair.cap}", frame, reply=f"{inbox}.{i}")
        results = [open_result((await sub.next_msg(timeout=10)).data) for _ in range(400)]
        overloaded = [r for r in results if r.error is not None and r.error.code == Reason.OVERLOADED.value]
        # 50/s with a burst of 100 per worker: one worker's burst or both pass at once, the rest are told
        # to retry (a leaf prefers its local queue subscriber, so one worker may get them all).
        assert 100 <= len(overloaded) <= 300, len(overloaded)
        assert len(pair.runs) == 400 - len(overloaded)
    finally:
        await nc.close()
    await asyncio.sleep(0.5)
    await valid_work_still_served(pair, n=1000)


# -- crafted frames (closed mesh, hub and leaf) ---------------------------------------


def _body(pair: Pair, signer: Identity) -> dict[str, Any]:
    body, _ = seal_envelope(
        signer, pair.cap, {"n": 1}, audience=f"mesh.cmd.{pair.cap}", job_id=secrets.token_hex(8), ttl_ms=30_000
    )
    return body


def _signed(pair: Pair, change: Callable[[dict[str, Any]], None] | None = None, text: bytes | None = None) -> bytes:
    """An envelope the attacker signs itself, its body changed first (or replaced by *text*)."""
    body = _body(pair, pair.attacker)
    if change is not None:
        change(body)
    return _seal(ENVELOPE_MAGIC, pair.attacker, text if text is not None else _dumps(body))


def duplicate_key(pair: Pair) -> bytes:
    return _signed(pair, text=_dumps(_body(pair, pair.attacker))[:-1] + b',"args":{"n":2}}')


def not_a_number(pair: Pair) -> bytes:
    return _signed(pair, text=_dumps(_body(pair, pair.attacker)).replace(b'"n":1', b'"n":NaN'))


def too_deep(pair: Pair) -> bytes:
    return _signed(pair, text=_dumps(_body(pair, pair.attacker)).replace(b'"n":1', b'"n":' + b"[" * 40 + b"]" * 40))


def unknown_field(pair: Pair) -> bytes:
    return _signed(pair, lambda body: body.update(priority=9))


def body_version_2(pair: Pair) -> bytes:
    return _signed(pair, lambda body: body.update(version=2))


def frame_version_2(pair: Pair) -> bytes:
    return b"MJ2E" + _signed(pair)[4:]


def junk_with_the_magic(pair: Pair) -> bytes:
    return b"MJ1E " + secrets.token_bytes(300)


def header_names_the_submitter(pair: Pair) -> bytes:
    """Signed by the attacker, with the trusted submitter's key put in the header."""
    frame = _signed(pair)
    return frame[:5] + pair.submitter.public_key.encode() + frame[5 + 56 :]


def body_names_the_submitter(pair: Pair) -> bytes:
    return _signed(pair, lambda body: body.update(submitter=pair.submitter.public_key))


def over_the_frame_limit(pair: Pair) -> bytes:
    return _signed(pair, lambda body: body.update(args={"n": 1, "pad": "x" * MAX_FRAME}))


def non_canonical_signature(pair: Pair) -> bytes:
    """The last signature character carries 4 unused bits: the same signature, spelled another way."""
    frame = bytearray(_signed(pair))
    last = 5 + 56 + 1 + 86 - 1
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    frame[last] = alphabet[alphabet.index(frame[last]) ^ 1]
    return bytes(frame)


#: name -> (how the attacker crafts the frame, the reason a worker signs in its refusal)
FRAMES: dict[str, tuple[Callable[[Pair], bytes], Reason]] = {
    "junk after the envelope magic": (junk_with_the_magic, Reason.MALFORMED),
    "a frame of version 2": (frame_version_2, Reason.UNKNOWN_VERSION),
    "a body of version 2": (body_version_2, Reason.UNKNOWN_VERSION),
    "a duplicate key in the signed body": (duplicate_key, Reason.MALFORMED),
    "NaN in the signed body": (not_a_number, Reason.MALFORMED),
    "nesting deeper than 32 levels": (too_deep, Reason.MALFORMED),
    "an unknown field in the signed body": (unknown_field, Reason.SCHEMA),
    "a non-canonical signature encoding": (non_canonical_signature, Reason.MALFORMED),
    "the submitter's key in the header, the attacker's signature": (header_names_the_submitter, Reason.BAD_SIGNATURE),
    "the submitter named in a body the attacker signed": (body_names_the_submitter, Reason.KEY_MISMATCH),
    "a frame over the worker's size limit": (over_the_frame_limit, Reason.TOO_LARGE),
}


@CLOSED
@pytest.mark.parametrize("name", list(FRAMES))
async def test_a_crafted_frame_is_refused_unrun(pair: Pair, name: str) -> None:
    craft, reason = FRAMES[name]
    errors: list[str] = []
    nc = await pair.site.raw("attacker", errors)
    try:
        reply = await nc.request(f"mesh.cmd.{pair.cap}", craft(pair), timeout=5)
        refusal = open_result(reply.data)
        assert refusal.worker in pair.keys and refusal.status == "rejected"
        assert refusal.error is not None and refusal.error.code == reason.value, refusal.error
        assert pair.runs == [] and not refused(errors)
    finally:
        await nc.close()
    await valid_work_still_served(pair)


@CLOSED
async def test_a_frame_over_the_brokers_limit_costs_the_attacker_its_connection(pair: Pair) -> None:
    errors: list[str] = []
    nc = await pair.site.raw("attacker", errors)
    limit = nc.max_payload
    try:
        nc._max_payload = 4 * limit  # past the client's own check, as a hand-written client would be
        await nc.publish(f"mesh.cmd.{pair.cap}", b"MJ1E " + b"x" * (limit + 1))
        deadline = time.monotonic() + 5
        while not nc.is_closed:  # the server answers -ERR and closes the connection
            assert time.monotonic() < deadline, "the broker kept the connection open"
            await asyncio.sleep(0.05)
        said = " ".join([str(nc.last_error), *errors]).lower()
        assert "maximum payload" in said, said
        assert pair.runs == []
    finally:
        await nc.close()
    await valid_work_still_served(pair)


# -- captured envelopes, redirected and replayed (closed mesh, hub and leaf) -------------------


async def capture(pair: Pair, attacker: NATS, errors: list[str], n: int, timeout: float = 10) -> Msg:
    """The submitter runs a job; the attacker keeps the copy it got through a queue group of its own."""
    copies: list[Msg] = []

    async def keep(msg: Msg) -> None:
        copies.append(msg)

    subject = f"mesh.cmd.{pair.cap}"
    await attacker.subscribe(subject, queue=await spy_queue(attacker, errors, subject, pair.site), cb=keep)
    await attacker.flush()
    async with await Client.connect(pair.url, pair.submitter) as client:
        for _ in range(20):  # interest in the attacker's group may take a moment to cross the leaf link
            assert (await client.submit(pair.cap, {"n": n}, timeout=timeout)).value == n * 10
            await asyncio.sleep(0.05)
            if copies:
                break
    assert copies, "the attacker never got a copy of the command"
    pair.runs.clear()
    return copies[-1]


#: name -> (where the attacker sends the captured envelope, the reason it is refused with)
REDIRECTS: dict[str, tuple[Callable[[Pair], str], Reason]] = {
    "replayed as it was": (lambda pair: f"mesh.cmd.{pair.cap}", Reason.REPLAY),
    "sent to a worker's direct subject": (lambda pair: peer_subject(pair.keys[0], pair.cap), Reason.WRONG_AUDIENCE),
    "sent to another capability": (lambda pair: f"mesh.cmd.{pair.other}", Reason.WRONG_AUDIENCE),
}


async def refusal_to_victim(pair: Pair, send: Callable[[], Any]) -> Any:
    """Run *send*, and return the first result that arrives in the victim's inbox (the signed reply subject)."""
    victim = await pair.site.connect("sub")
    try:
        sub = await victim.subscribe(f"_INBOX.{pair.submitter.public_key}.>")
        await victim.flush()
        await send()
        return open_result((await sub.next_msg(timeout=10)).data)
    finally:
        await victim.close()


@CLOSED
@pytest.mark.parametrize("name", list(REDIRECTS))
async def test_a_captured_envelope_sent_again_is_refused(pair: Pair, name: str) -> None:
    """The attacker sends a copy of a live command again, with its signed reply subject (so it would be answered)."""
    target, reason = REDIRECTS[name]
    errors: list[str] = []
    attacker = await pair.site.raw("attacker", errors)
    try:
        captured = await capture(pair, attacker, errors, 3)

        async def send() -> None:
            await attacker.publish(target(pair), captured.data, reply=captured.reply)
            await attacker.flush()

        refusal = await refusal_to_victim(pair, send)
        assert refusal.worker in pair.keys and refusal.status == "rejected"
        assert refusal.error is not None and refusal.error.code == reason.value, refusal.error
        assert refusal.request_digest == digest(captured.data)
        assert pair.runs == [] and not refused(errors)
    finally:
        await attacker.close()
    await valid_work_still_served(pair)


@CLOSED
async def test_a_captured_envelope_replayed_after_it_expired_is_refused(pair: Pair) -> None:
    errors: list[str] = []
    attacker = await pair.site.raw("attacker", errors)
    try:
        captured = await capture(pair, attacker, errors, 5, timeout=2)
        expires_at = json.loads(captured.data[captured.data.index(b"\n") + 1 :])["expires_at"]
        await asyncio.sleep(max(0.0, expires_at / 1000 + SKEW_S + 0.2 - time.time()))

        async def send() -> None:
            await attacker.publish(f"mesh.cmd.{pair.cap}", captured.data, reply=captured.reply)
            await attacker.flush()

        refusal = await refusal_to_victim(pair, send)
        assert refusal.error is not None and refusal.error.code == Reason.EXPIRED.value, refusal.error
        assert pair.runs == [] and not refused(errors)
    finally:
        await attacker.close()
    await valid_work_still_served(pair)


@CLOSED
async def test_a_genuine_result_of_another_request_is_not_the_answer(pair: Pair) -> None:
    """The attacker answers the victim's commands with a worker's real signed refusal of its own request.

    Signed by a worker of the pair (so no worker filter helps): only the
    binding to the request digest tells it apart. Were it taken, the job
    would fail with ``untrusted``, which no client retries.
    """
    errors: list[str] = []
    nc = await pair.site.raw("attacker", errors)
    try:
        genuine = await nc.request(f"mesh.cmd.{pair.cap}", envelope(pair, 1, None, signer=pair.attacker), timeout=5)
        stolen = open_result(genuine.data)
        assert stolen.worker in pair.keys and stolen.error is not None
        assert stolen.error.code == Reason.UNTRUSTED.value
        queue = await spy_queue(nc, errors, f"mesh.cmd.{pair.cap}", pair.site)
        answered = await answer_as(nc, f"mesh.cmd.{pair.cap}", queue, lambda msg: genuine.data)
        async with await Client.connect(pair.url, pair.submitter) as client:
            for n in range(5):
                outcome = await client.submit(pair.cap, {"n": n}, timeout=10)
                assert outcome.value == n * 10 and outcome.worker in pair.keys
                if answered:
                    break
        assert answered and not refused(errors)
    finally:
        await nc.close()
    await valid_work_still_served(pair)


@CLOSED
async def test_a_key_the_mesh_never_admitted_cannot_connect(pair: Pair) -> None:
    """A stranger's key (and no key at all) is refused at login, at the hub and at the leaf."""
    with pytest.raises(ConnectError, match="refused"):
        await connect(pair.url, Identity.generate())
    with pytest.raises(ConnectError):
        await connect(pair.url, None)
    await valid_work_still_served(pair)
