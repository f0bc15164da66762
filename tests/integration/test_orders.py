"""Quarantine orders against a real nats-server: replays, deletes, purges, forgeries and races never lift one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import pytest
from nats.aio.client import Client as NATS

from meshjobs._nats import connect
from meshjobs.errors import KeyExists
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer
from meshjobs.state import DOMAIN, MeshKV, open_bucket
from meshjobs.trust import quarantine
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import BUCKET, SPEC, QuarantineBoard, issue_order

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    operator: Identity
    rival: Identity  # a second operator
    stranger: Identity  # a key nobody lists as an operator
    policy: TrustPolicy
    nc: NATS
    kv: MeshKV
    url: str

    async def board(self) -> QuarantineBoard:
        return await QuarantineBoard.open(self.nc, self.policy.operators)

    async def settle(self, *boards: QuarantineBoard) -> None:
        """Wait until *boards* have seen everything written so far: a watch delivers in stream order."""
        sentinel = Identity.generate().public_key
        await issue_order(self.nc, self.operator, sentinel, "quarantine", "sentinel")
        await until(lambda: all(b.is_quarantined(sentinel) for b in boards), "the boards never caught up")


async def until(condition: object, message: str, timeout: float = 5.0) -> float:
    """Poll *condition* (a callable) until true; return the seconds it took."""
    import asyncio

    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, message
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
async def mesh(broker: NatsServer) -> AsyncIterator[Mesh]:
    operator, rival, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    policy = TrustPolicy(keys=frozenset(), operators=frozenset({operator.public_key, rival.public_key}))
    nc = await connect(broker.url, operator)
    try:
        yield Mesh(operator, rival, stranger, policy, nc, await open_bucket(nc, SPEC, replicas=None), broker.url)
    finally:
        await nc.close()


async def test_an_old_signed_release_republished_over_a_newer_quarantine_changes_nothing(mesh: Mesh) -> None:
    peer = Identity.generate().public_key
    running = await mesh.board()
    try:
        first = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "first offence")
        release = await issue_order(mesh.nc, mesh.operator, peer, "release", "looked fine")
        captured = await mesh.kv.get(peer)  # the signed release, as anyone who can read the bucket sees it
        assert captured is not None
        again = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "second offence")
        assert first.seq < release.seq < again.seq
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        # The attacker writes the old, validly signed release back, without compare-and-set.
        await mesh.kv.put(peer, captured.value)
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
        # The writer is not fooled either: its next order outranks the quarantine, not the replayed release.
        lifted = await issue_order(mesh.nc, mesh.operator, peer, "release", "done")
        assert lifted.seq > again.seq
    finally:
        await running.close()


async def test_delete_and_purge_never_lift_a_quarantine(mesh: Mesh) -> None:
    peer = Identity.generate().public_key
    running = await mesh.board()
    try:
        await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "misbehaves")
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        await mesh.kv.delete(peer)
        assert await mesh.kv.get(peer) is None  # to a plain KV reader the record is gone
        js = mesh.nc.jetstream(domain=DOMAIN)
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
        # An operator can still end it, over the markers.
        await issue_order(mesh.nc, mesh.operator, peer, "release", "served its time")
        await until(lambda: not running.is_quarantined(peer), "the release never arrived", timeout=2)
    finally:
        await running.close()


async def test_a_forged_order_by_a_non_operator_is_ignored_and_a_newer_release_lifts_within_two_seconds(
    mesh: Mesh,
) -> None:
    peer, framed = Identity.generate().public_key, Identity.generate().public_key
    running = await mesh.board()
    try:
        await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "misbehaves")
        await until(lambda: running.is_quarantined(peer), "the quarantine never arrived")
        stranger_nc = await connect(mesh.url, mesh.stranger)
        try:
            # Properly signed and sequenced, by a key nobody lists as an operator: both ignored.
            forged = await issue_order(stranger_nc, mesh.stranger, peer, "release", "trust me")
            await issue_order(stranger_nc, mesh.stranger, framed, "quarantine", "framed")
        finally:
            await stranger_nc.close()
        assert forged.seq > running.orders[peer].seq
        await mesh.settle(running)
        assert running.is_quarantined(peer) and not running.is_quarantined(framed)
        # A newer release by an operator (another one: operators share the sequence) lifts it mesh-wide.
        rival_nc = await connect(mesh.url, mesh.rival)
        try:
            started = time.monotonic()
            await issue_order(rival_nc, mesh.rival, peer, "release", "cleared", operators=mesh.policy.operators)
            await until(lambda: not running.is_quarantined(peer), "the release never arrived", timeout=2)
            assert time.monotonic() - started < 2
        finally:
            await rival_nc.close()
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
    peer = Identity.generate().public_key
    real = quarantine.read_history

    async def racing(nc: NATS, key: str, board: QuarantineBoard) -> int:
        last = await real(nc, key, board)
        monkeypatch.setattr(quarantine, "read_history", real)
        await mesh.kv.put(peer, b"junk")
        return last

    monkeypatch.setattr(quarantine, "read_history", racing)
    order = await issue_order(mesh.nc, mesh.operator, peer, "quarantine", "after junk")
    board = await mesh.board()
    try:
        assert board.is_quarantined(peer) and board.orders[peer] == order
    finally:
        await board.close()
