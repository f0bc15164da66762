"""Quarantine: operators shut a peer out, everywhere, within seconds.

An order is a statement signed by an operator key (a ``MJ1Q`` frame) kept in
the ``quarantine`` KV bucket under the peer's key; releasing writes a signed
``release`` order over it. Every router, submitter and worker watches the
bucket and honours only orders signed by keys listed as ``[[operator]]`` in
its own trust file: routers skip a quarantined peer, submitters refuse its
results, workers refuse its envelopes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from nats.aio.client import Client as NATS
from pydantic import Field

from meshjobs.envelope import QUARANTINE_MAGIC, Wire, now_ms, open_statement, seal_statement
from meshjobs.errors import Rejected, UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.state import BucketSpec, Entry, MeshKV, StateSpec, open_bucket, watch_bucket

BUCKET = "quarantine"
SPEC = BucketSpec(BUCKET, history=16)
STATE: tuple[StateSpec, ...] = (SPEC,)
log = logging.getLogger("meshjobs.trust.quarantine")


class Order(Wire):
    """An operator's signed decision about one peer."""

    version: Literal[1]
    peer: str
    action: Literal["quarantine", "release"]
    reason: str = Field("", max_length=1000)
    operator: str
    at_ms: int


class QuarantineBoard:
    """The current quarantine orders, kept up to date by a watch on the bucket."""

    def __init__(self, kv: MeshKV, operators: frozenset[str]) -> None:
        self.kv = kv
        self.operators = operators
        self.orders: dict[str, Order] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        nc: NATS,
        operators: frozenset[str],
        *,
        watch: bool = True,
        replicas: int | None = None,
        placement: str | None = None,
    ) -> QuarantineBoard:
        board = cls(await open_bucket(nc, SPEC, replicas=replicas, placement=placement), operators)
        if watch:
            board._task = asyncio.create_task(watch_bucket(board.kv, board._on_entry, board.ready))
            await asyncio.wait_for(board.ready.wait(), 10)
        return board

    def _on_entry(self, entry: Entry) -> None:
        try:
            order = open_statement(QUARANTINE_MAGIC, Order, "operator", entry.value)
        except Rejected as exc:
            log.warning("ignoring an unverifiable quarantine order for %s: %s", entry.key[:12], exc)
            return
        if order.peer != entry.key or order.operator not in self.operators:
            log.warning(
                "ignoring a quarantine order for %s by %s: not an operator here", entry.key[:12], order.operator[:12]
            )
            return
        self.orders[order.peer] = order

    def is_quarantined(self, peer: str) -> bool:
        order = self.orders.get(peer)
        return order is not None and order.action == "quarantine"

    def check(self, peer: str) -> None:
        """Raise :class:`Rejected` (``quarantined``) for a quarantined peer."""
        order = self.orders.get(peer)
        if order is not None and order.action == "quarantine":
            raise Rejected("quarantined", f"peer {peer[:12]}… is quarantined: {order.reason or 'no reason given'}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def issue_order(nc: NATS, identity: Identity, peer: str, action: str, reason: str) -> Order:
    """Sign and store an order. Only meaningful where *identity* is listed as an operator."""
    if not is_public_key(peer):
        raise UsageError(f"{peer[:16]!r} is not a peer key")
    order = Order(version=1, peer=peer, action=action, reason=reason, operator=identity.public_key, at_ms=now_ms())  # type: ignore[arg-type]
    kv = await open_bucket(nc, SPEC, replicas=None)
    await kv.put(peer, seal_statement(QUARANTINE_MAGIC, identity, order))
    return order
