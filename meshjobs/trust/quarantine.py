"""Quarantine: operators shut a peer out, everywhere, within seconds; only a newer signed order lets it back.

An order is a statement signed by an operator key (a ``MJ1Q`` frame) kept in
the ``quarantine`` KV bucket under the peer's key. Every router, submitter
and worker watches the bucket and honours only orders signed by keys listed
as ``[[operator]]`` in its own trust file: routers skip a quarantined peer,
submitters refuse its results, workers refuse its envelopes.

**Order.** Each order carries ``seq``, signed with the rest, ordered per peer:
``seq = max(now in ms, highest seq of any order for that peer the writer
knows + 1)`` (a hybrid logical clock: monotonic per peer even across clock
steps, and a writer that finds no history still outranks orders written
before it). Readers keep, per peer, the valid order with the highest seq they
have seen and ignore any with a lower or equal one, so re-publishing an old
signed ``release`` over a newer ``quarantine`` changes nothing. Two orders
with the same seq (only a misbehaving operator writes them) resolve to the
quarantine, whichever arrives first. (Orders written before ``seq`` existed
lack it and fail the schema: re-issue them.)

**Writing.** The writer reads every revision the bucket keeps of the key
(``history`` 16) and writes by compare-and-set against the last revision it
read, so two operators never both write on the same view. The loser reads
again: if an operator's order appeared meanwhile, it refuses
(:class:`~meshjobs.errors.KeyExists`, exit 2) instead of overriding a
decision it has not seen; junk or a delete marker is simply written over.
Orders by keys the writer does not list as operators do not count towards
its ``seq`` (else a stranger could publish seq 2**53 and lock everyone out).

**Reading.** A board replays the bucket's whole history, then follows it.
What never lifts a quarantine, logged once per peer: a delete or purge marker,
a frame that does not verify or decode, an order filed under another peer's
key, an order by a key that is not an operator here, an older order. The
bucket's stream refuses rollup headers and purges, so a KV purge cannot wipe
a key's history (a bucket created before that keeps its settings until its
stream is updated with ``allow_rollup_hdrs=False, deny_purge=True``, together).

What is left: whoever may publish on ``$KV.quarantine.<peer>`` can push 16
junk revisions and evict the order from history. Boards already running keep
it (they remember); one starting afterwards does not see it. Only operators
should have publish rights there (NATS permissions).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from pydantic import Field, field_validator

from meshjobs.envelope import QUARANTINE_MAGIC, Wire, now_ms, open_statement, seal_statement, valid_key
from meshjobs.errors import KeyExists, Rejected, UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.state import DOMAIN, BucketSpec, MeshKV, Replay, StateSpec, follow, open_bucket, replay, retrying

BUCKET = "quarantine"
ORDER_VERSION: Literal[1] = 1
#: Sequences stay exact in every JSON reader (JavaScript's safe integers).
MAX_SEQ = 2**53 - 1
#: An order is a few hundred bytes; a reason of 1000 characters escaped stays far below this.
MAX_ORDER_BYTES = 16 * 1024
#: Distinct (peer, problem) pairs warned about, at most: a flood of junk keys cannot grow memory.
MAX_WARNED = 10_000
log = logging.getLogger("meshjobs.trust.quarantine")

Action = Literal["quarantine", "release"]


class OrderBucketSpec(BucketSpec):
    """The quarantine bucket: a KV bucket whose stream refuses rollups and purges (history stays)."""

    def config(self, replicas: int | None, placement: str | None) -> StreamConfig:
        return dataclasses.replace(super().config(replicas, placement), allow_rollup_hdrs=False, deny_purge=True)


SPEC = OrderBucketSpec(BUCKET, history=16)
STATE: tuple[StateSpec, ...] = (SPEC,)


class Order(Wire):
    """An operator's signed decision about one peer; ``seq`` orders the decisions about that peer."""

    version: Literal[1]
    peer: str
    action: Action
    seq: int = Field(ge=1, le=MAX_SEQ)
    reason: str = Field("", max_length=1000)
    operator: str
    at_ms: int = Field(ge=0)

    _keys = field_validator("peer", "operator")(valid_key)


def supersedes(new: Order, old: Order) -> bool:
    """Whether *new* replaces *old* (same peer): a higher seq, or the same seq and a quarantine over a release."""
    if new.seq != old.seq:
        return new.seq > old.seq
    return new.action == "quarantine" and old.action == "release"


class QuarantineBoard:
    """The current order per peer: the valid operator order with the highest seq seen.

    :meth:`apply` is the whole ordering logic and needs no network;
    :meth:`open` feeds it the bucket's history and then every new revision.
    """

    def __init__(self, operators: frozenset[str], kv: MeshKV | None = None) -> None:
        self.operators = operators
        self.kv = kv
        self.orders: dict[str, Order] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned: set[tuple[str, str]] = set()

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
        """Provision the bucket and, with *watch*, replay its history and follow it (ready when caught up)."""
        board = cls(operators, await open_bucket(nc, SPEC, replicas=replicas, placement=placement))
        if watch:
            board._task = asyncio.create_task(_follow(nc, board))
            try:
                await asyncio.wait_for(board.ready.wait(), 10)
            except BaseException:
                await board.close()
                raise
        return board

    def apply(self, key: str, value: bytes, operation: str | None = None) -> bool:
        """Consider one revision of *key* (*operation*: None for a value, ``DEL``/``PURGE`` for markers).

        Returns True when it became the peer's current order. Whether a peer
        ends up quarantined does not depend on the order revisions arrive in.
        """
        if operation is not None or not value:
            self._warn(key, "erased", "a delete or purge does not lift it: only a newer signed release does")
            return False
        try:
            order = open_statement(QUARANTINE_MAGIC, Order, "operator", value, MAX_ORDER_BYTES)
        except Rejected as exc:
            self._warn(key, "unverifiable", f"ignoring an order that does not verify: {exc}")
            return False
        if order.peer != key:
            self._warn(key, "misfiled", f"ignoring an order about {order.peer[:12]}… filed under this key")
            return False
        if order.operator not in self.operators:
            self._warn(key, "stranger", f"ignoring an order by {order.operator[:12]}…, not an operator here")
            return False
        current = self.orders.get(key)
        if current is not None and not supersedes(order, current):
            if order != current:
                self._warn(key, "stale", f"ignoring an older order (seq {order.seq} ≤ current seq {current.seq})")
            return False
        self.orders[key] = order
        return True

    def _warn(self, key: str, problem: str, text: str) -> None:
        """Log a problem once per peer and kind: a flood of bad revisions must not flood the log."""
        if (key, problem) in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            if ("", "") not in self._warned:
                self._warned.add(("", ""))
                log.info("too many skipped quarantine orders; no longer logging them")
            return
        self._warned.add((key, problem))
        # INFO, not WARNING: in a shared mesh, orders by other communities'
        # operators (and their erasure markers) are normal history to skip.
        log.info(
            "quarantine order for %r: %s", key[:16], "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
        )

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
            await asyncio.wait({self._task}, timeout=5.0)  # bounded: a stuck watcher must not hold a shutdown


async def _watch(nc: NATS, keys: str) -> Replay:
    """Every revision kept of *keys* (``>`` or one peer), markers included, then new ones.

    state.watch_bucket replays only the last revision of each key and drops
    the operation; orders need every revision and the markers, so the board
    watches them all, through the hub domain.
    """
    return await replay(nc.jetstream(domain=DOMAIN, timeout=2.0), BUCKET, keys)


async def _follow(nc: NATS, board: QuarantineBoard) -> None:
    """Feed every revision the bucket keeps, then every new one, to *board*; restart a broken watch."""

    def on_update(update: Any) -> None:
        if update is None:  # caught up with the history
            board.ready.set()
        else:
            board.apply(update.key, update.value or b"", update.operation)

    await follow(lambda: _watch(nc, ">"), on_update, what="quarantine")


async def read_history(nc: NATS, peer: str, board: QuarantineBoard) -> int:
    """Apply every revision the bucket keeps of *peer* to *board*; return the last revision (0: none)."""

    async def read() -> int:
        watcher = await _watch(nc, peer)
        last = 0
        try:
            async with asyncio.timeout(5.0):
                async for update in watcher:
                    if update is None:
                        break
                    last = max(last, int(update.revision or 0))
                    board.apply(update.key, update.value or b"", update.operation)
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc  # retried
        finally:
            await watcher.stop()
        return last

    return await retrying(read, timeout=15.0, what=f"reading quarantine orders of {peer[:12]}…")


async def issue_order(
    nc: NATS,
    identity: Identity,
    peer: str,
    action: str,
    reason: str,
    *,
    operators: frozenset[str] = frozenset(),
    attempts: int = 5,
) -> Order:
    """Sign and store the next order about *peer*, by compare-and-set (see the module docstring).

    *operators* are the keys whose orders count towards the sequence (this
    identity always does). Raises :class:`KeyExists` when an operator's order
    appeared while this one was being written: it is not overridden unseen.
    """
    if not is_public_key(peer):
        raise UsageError(f"{peer[:16]!r} is not a peer key")
    if action not in ("quarantine", "release"):
        raise UsageError(f"unknown order {action!r} (quarantine or release)")
    checked: Action = "quarantine" if action == "quarantine" else "release"
    if len(reason) > 1000:
        raise UsageError(f"the reason is {len(reason)} characters long; at most 1000")
    kv = await open_bucket(nc, SPEC, replicas=None)
    signers = operators | {identity.public_key}
    basis: Order | None = None
    for attempt in range(attempts):
        seen = QuarantineBoard(signers)
        last = await read_history(nc, peer, seen)
        current = seen.orders.get(peer)
        if attempt == 0:
            basis = current
        elif current is not None and (basis is None or supersedes(current, basis)):
            raise KeyExists(
                f"a newer order for {peer[:12]}… was written meanwhile ({current.action} by operator "
                f"{current.operator[:12]}…, seq {current.seq}); not overriding it: check it and run again"
            )
        known = max((o.seq for o in (basis, current) if o is not None), default=0)
        if known >= MAX_SEQ:
            raise UsageError(f"the order sequence of {peer[:12]}… is exhausted (seq {known})")
        order = Order(
            version=ORDER_VERSION,
            peer=peer,
            action=checked,
            seq=max(now_ms(), known + 1),
            reason=reason,
            operator=identity.public_key,
            at_ms=now_ms(),
        )
        try:
            await kv.update(peer, seal_statement(QUARANTINE_MAGIC, identity, order), last=last)
        except KeyExists:
            continue  # something was written meanwhile: read again, and decide again
        return order
    raise KeyExists(f"the quarantine record of {peer[:12]}… kept changing while being written; try again")
