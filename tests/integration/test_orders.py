"""Quarantine orders against real brokers: replays, deletes, purges, forgeries and races never lift one.

Each test runs on the open session broker and on a closed mesh
(tests/closed_mesh.py) with the readers, a live worker and the attacker at
its hub or at its leaf. On the closed mesh an ordinary peer's writes are
refused by the broker (asserted); the same write by a key that may write the
bucket but that no reader lists as an operator is then ignored by the
readers. Each test checks that the live worker still refuses the quarantined
peer and serves the trusted submitter.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import pytest
from nats.aio.client import Client as NATS

from meshjobs import App, Worker, WorkerConfig
from meshjobs._nats import connect
from meshjobs.envelope import open_result, seal_envelope
from meshjobs.errors import KeyExists, Reason, Rejected
from meshjobs.identity import Identity
from meshjobs.state import DOMAIN, MeshKV, open_bucket
from meshjobs.trust import quarantine
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import BUCKET, SPEC, QuarantineBoard, issue_order
from tests.closed_mesh import Site, refused

pytestmark = pytest.mark.integration


@pytest.fixture(params=["open", "hub", "leaf"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Mesh:
    """Operators write at the hub; readers, a live worker and the attacker are at the site (hub or leaf).

    ``writer`` is a key that may write the quarantine bucket but that no
    reader lists as an operator: on a closed mesh an operator of the broker
    (say, another team's), on the open broker anyone. ``attacker`` is an
    ordinary peer of the closed mesh: the broker refuses its writes outright.
    """

    site: Site
    operator: Identity
    rival: Identity  # a second operator
    stranger: Identity  # the writer's key
    bad: Identity  # the peer the orders are about: trusted by the worker, unless quarantined
    policy: TrustPolicy
    nc: NATS  # the operator's
    kv: MeshKV  # the operator's
    writer_nc: NATS
    writer: MeshKV
    reader_nc: NATS  # the trusted submitter's, at the site
    worker: Worker
    cap: str

    @property
    def url(self) -> str:
        return self.site.hub

    async def board(self) -> QuarantineBoard:
        """A board reading the whole history at the site; settled, as nats-py may say it caught up a moment early."""
        board = await QuarantineBoard.open(self.reader_nc, self.policy.operators)
        await self.settle(board)
        return board

    async def settle(self, *boards: QuarantineBoard) -> None:
        """Wait until *boards* have seen everything written so far: a watch delivers in stream order."""
        sentinel = Identity.generate().public_key
        await issue_order(self.nc, self.operator, sentinel, "quarantine", "sentinel")
        await until(lambda: all(b.is_quarantined(sentinel) for b in boards), "the boards never caught up")

    async def attacker_cannot_write(self, key: str, value: bytes, operation: str | None = None) -> None:
        """On a closed mesh, the ordinary peer's write of *value* under *key* is refused by the broker."""
        if not self.site.closed:
            return
        errors: list[str] = []
        nc = await self.site.raw("attacker", errors)
        try:
            headers = {"KV-Operation": operation} if operation else None
            await nc.publish(f"$JS.{DOMAIN}.API.$KV.{BUCKET}.{key}", value, headers=headers)  # as meshjobs writes
            await nc.publish(f"$KV.{BUCKET}.{key}", value, headers=headers)  # as nats-py's own KV writes
            await nc.flush()
            await until(lambda: sum(refused([e], "for publish to") for e in errors) == 2, f"not refused: {errors}")
        finally:
            await nc.close()

    async def _run(self, who: Identity) -> str:
        """The code the live worker answers *who*'s envelope with (sent through the submitter's connection)."""
        inbox = self.reader_nc.new_inbox()
        sub = await self.reader_nc.subscribe(inbox)
        try:
            _, frame = seal_envelope(
                who, self.cap, {"n": 1}, audience=f"mesh.cmd.{self.cap}", job_id=secrets.token_hex(8),
                ttl_ms=30_000, reply=inbox,
            )  # fmt: skip
            await self.reader_nc.publish(f"mesh.cmd.{self.cap}", frame, reply=inbox)
            result = open_result((await sub.next_msg(timeout=10)).data)
        finally:
            await sub.unsubscribe()
        return result.error.code if result.error else result.status

    async def enforced(self, quarantined: bool) -> None:
        """The live worker refuses the peer exactly while it is quarantined, and serves the trusted submitter."""
        worker = self.worker
        await until(lambda: worker.board is not None and worker.board.ready.is_set(), "no orders read", timeout=15)
        assert worker.board is not None
        await self.settle(worker.board)
        assert await self._run(self.bad) == (Reason.QUARANTINED.value if quarantined else "ok")
        assert await self._run(self.site.ids["sub"]) == "ok"


async def until(condition: object, message: str, timeout: float = 5.0) -> float:
    """Poll *condition* (a callable) until true; return the seconds it took."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, message
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
async def mesh(site: Site) -> AsyncIterator[Mesh]:
    ids = site.ids
    operator, rival, stranger, bad = ids["op"], ids["op2"], ids["outsider"], Identity.generate()
    policy = TrustPolicy(keys=frozenset(), operators=frozenset({operator.public_key, rival.public_key}))
    cap = f"o{secrets.token_hex(4)}.work"
    app = App("orders")

    @app.capability(cap)
    async def work(n: int) -> int:
        return n

    worker_policy = TrustPolicy(keys=frozenset({bad.public_key, ids["sub"].public_key}), operators=policy.operators)
    worker = Worker(app, ids["w1"], worker_policy, WorkerConfig(durable=False))
    conns = [await connect(site.hub, operator), await connect(site.hub, stranger), await site.connect("sub")]
    worker_nc = await site.connect("w1")
    try:
        await worker.start(worker_nc)
        kv = await open_bucket(conns[0], SPEC, replicas=None)
        writer = await open_bucket(conns[1], SPEC, replicas=None)
        yield Mesh(site, operator, rival, stranger, bad, policy, conns[0], kv, conns[1], writer, conns[2], worker, cap)
    finally:
        if not worker.draining:
            await worker.drain()
        for nc in [*conns, worker_nc]:
            await nc.close()


async def test_an_old_signed_release_republished_over_a_newer_quarantine_changes_nothing(mesh: Mesh) -> None:
    peer = mesh.bad.public_key
    running = await mesh.board()
    try:
        first = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "first offence")
        release = await issue_order(mesh.nc, mesh.operator, peer, "release", "looked fine")
        captured = await mesh.kv.get(peer)  # the signed release, as anyone who can read the bucket sees it
        assert captured is not None
        again = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "second offence")
        assert first.seq < release.seq < again.seq
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        # The old, validly signed release written back, without compare-and-set: an ordinary peer of a
        # closed mesh is refused by the broker; a key with write rights gets it stored.
        await mesh.attacker_cannot_write(peer, captured.value)
        await mesh.writer.put(peer, captured.value)
        current = await mesh.kv.get(peer)
        assert current is not None and current.value == captured.value  # the record now *is* the release
        await mesh.settle(running)
        assert running.is_quarantined(peer) and running.orders[peer].seq == again.seq
        # A board starting now reads the key's whole history, not just the replayed release.
        fresh = await mesh.board()
        try:
            assert fresh.is_quarantined(peer) and fresh.orders[peer].reason == "second offence"
        finally:
            await fresh.close()
        await mesh.enforced(quarantined=True)
        # The writer is not fooled either: its next order outranks the quarantine, not the replayed release.
        lifted = await issue_order(mesh.nc, mesh.operator, peer, "release", "done")
        assert lifted.seq > again.seq
        await mesh.enforced(quarantined=False)
    finally:
        await running.close()


async def test_delete_and_purge_never_lift_a_quarantine(mesh: Mesh) -> None:
    peer = mesh.bad.public_key
    running = await mesh.board()
    try:
        await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "misbehaves")
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        await mesh.attacker_cannot_write(peer, b"", "DEL")
        await mesh.attacker_cannot_write(peer, b"", "PURGE")
        await mesh.writer.delete(peer)
        assert await mesh.kv.get(peer) is None  # to a plain KV reader the record is gone
        js = mesh.writer_nc.jetstream(domain=DOMAIN)
        raw = await js.key_value(BUCKET)
        # A KV purge (a rollup that would erase the key's history) and a stream purge: refused by the bucket.
        with pytest.raises(nats.errors.Error):
            await raw.purge(peer)
        with pytest.raises(nats.errors.Error):
            await js.purge_stream(f"KV_{BUCKET}", subject=f"$KV.{BUCKET}.{peer}")
        # A purge marker without the rollup is stored, and must be ignored like the delete.
        await js.publish(f"$KV.{BUCKET}.{peer}", b"", headers={"KV-Operation": "PURGE"})
        await mesh.settle(running)
        assert running.is_quarantined(peer)
        fresh = await mesh.board()
        try:
            assert fresh.is_quarantined(peer)
        finally:
            await fresh.close()
        await mesh.enforced(quarantined=True)
        # An operator can still end it, over the markers.
        await issue_order(mesh.nc, mesh.operator, peer, "release", "served its time")
        await until(lambda: not running.is_quarantined(peer), "the release never arrived", timeout=2)
        await mesh.enforced(quarantined=False)
    finally:
        await running.close()


async def test_a_forged_order_by_a_non_operator_is_ignored_and_a_newer_release_lifts_within_two_seconds(
    mesh: Mesh,
) -> None:
    peer, framed = mesh.bad.public_key, mesh.site.ids["sub"].public_key
    running = await mesh.board()
    try:
        await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "misbehaves")
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        if mesh.site.closed:  # an ordinary peer cannot even file one: refused at its first write
            attacker = await mesh.site.connect("attacker")
            try:
                with pytest.raises(Rejected) as refused:
                    await issue_order(attacker, mesh.site.ids["attacker"], peer, "release", "trust me")
                assert refused.value.reason == Reason.DENIED
            finally:
                await attacker.close()
        # Properly signed and sequenced, by a key that may write but that nobody lists as an operator:
        # both ignored (the release of the quarantined peer, the quarantine of the trusted submitter).
        forged = await issue_order(mesh.writer_nc, mesh.stranger, peer, "release", "trust me")
        await issue_order(mesh.writer_nc, mesh.stranger, framed, "quarantine", "framed")
        assert forged.seq > running.orders[peer].seq
        await mesh.settle(running)
        assert running.is_quarantined(peer) and not running.is_quarantined(framed)
        await mesh.enforced(quarantined=True)  # the framed submitter is still served
        # A newer release by an operator (another one: operators share the sequence) lifts it mesh-wide.
        rival_nc = await connect(mesh.url, mesh.rival)
        try:
            started = time.monotonic()
            await issue_order(rival_nc, mesh.rival, peer, "release", "cleared", operators=mesh.policy.operators)
            await until(lambda: not running.is_quarantined(peer), "the release never arrived", timeout=2)
            assert time.monotonic() - started < 2
        finally:
            await rival_nc.close()
        await mesh.enforced(quarantined=False)
    finally:
        await running.close()


async def test_two_operators_cannot_both_write_on_the_same_view(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rival's order lands between our read and our compare-and-set: we refuse instead of overriding it."""
    peer = Identity.generate().public_key
    await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "misbehaves")
    real = quarantine.read_history
    rival_nc = await connect(mesh.url, mesh.rival)

    async def racing(nc: NATS, key: str, board: QuarantineBoard) -> int:
        last = await real(nc, key, board)
        monkeypatch.setattr(quarantine, "read_history", real)  # once
        await issue_order(rival_nc, mesh.rival, peer, "release", "rival's call", operators=mesh.policy.operators)
        return last

    monkeypatch.setattr(quarantine, "read_history", racing)
    try:
        with pytest.raises(KeyExists, match="newer order .* was written meanwhile .*release"):
            await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "mine", operators=mesh.policy.operators)
    finally:
        await rival_nc.close()
    board = await mesh.board()
    try:
        assert not board.is_quarantined(peer) and board.orders[peer].operator == mesh.rival.public_key
    finally:
        await board.close()


async def test_junk_written_between_read_and_write_is_written_over(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = mesh.bad.public_key
    real = quarantine.read_history

    async def racing(nc: NATS, key: str, board: QuarantineBoard) -> int:
        last = await real(nc, key, board)
        monkeypatch.setattr(quarantine, "read_history", real)
        await mesh.attacker_cannot_write(peer, b"junk")
        await mesh.writer.put(peer, b"junk")
        return last

    monkeypatch.setattr(quarantine, "read_history", racing)
    order = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "after junk")
    board = await mesh.board()
    try:
        assert board.is_quarantined(peer) and board.orders[peer] == order
    finally:
        await board.close()
    await mesh.enforced(quarantined=True)
