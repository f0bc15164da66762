"""The trust service: the one writer of reputation. ``meshjobs trust serve``.

It reads the ``EVIDENCE`` stream in order, checks each piece and the proof
inside it (:func:`~meshjobs.trust.evidence.assess`), folds it into the peer's
record (:mod:`meshjobs.trust.record`) and writes the record to the
``reputation`` bucket signed with its key (``MJ1T``), with a higher ``seq``.
Invalid evidence is counted and logged (sampled), never folded.

**Reading in order, safely.** The service never relies on a named consumer
(any peer that may create consumers on ``EVIDENCE`` could redefine one whose
name it knows): it reads with server-named ephemeral pull consumers starting
after the last sequence it processed, which it remembers in its own signed
record under ``_service.<its key>``. Each peer's record also remembers the
stream sequence of the latest evidence folded into it, so evidence read again
after a crash is never applied twice. On start it re-reads the last
:data:`~meshjobs.trust.evidence.WINDOW_MS` of evidence without folding it, to
remember what was already granted (a piece filed again counts once; older
pieces are refused as stale).

**Anchors.** Operators and ``[[pretrusted]]`` keys of its trust policy, and
its own key, have full standing (EigenTrust's pre-trusted peers).

**Automatic quarantine** is the ``quarantined`` flag of a record. An
operator's signed ``release`` order (the ``quarantine`` bucket, honoured when
signed by one of its operators or itself) newer than the quarantine lifts it.

**Only writer.** It watches the bucket: a revision of one of its peers that it
did not write (a forgery on an open broker, a delete) is overwritten with its
own signed record at once; readers ignore such revisions anyway.

**Metrics.** Where the process enabled them (``trust serve --metrics-port``),
it exports each peer's score and quarantine state (its automatic quarantine or
an operator's order it honours, as routers combine them) when it loads its
records, whenever it writes one and whenever an order changes, and counts the
evidence it processes by outcome (see :mod:`meshjobs.observe.metrics`).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import Counter
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from meshjobs.envelope import EVIDENCE_MAGIC, TRUST_MAGIC, now_ms, open_statement, seal_statement
from meshjobs.errors import KeyExists, MeshError, Rejected
from meshjobs.identity import Identity, is_public_key
from meshjobs.observe import metrics
from meshjobs.state import DOMAIN, MeshKV, follow, open_bucket, provision, replay
from meshjobs.trust.evidence import SKEW_MS, WINDOW_MS, Evidence, Standing, Verdict, assess
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import QuarantineBoard
from meshjobs.trust.record import Ledger, Record, ServiceState, state_key
from meshjobs.trust.reputation import BUCKET, STATE, STREAM, SUBJECT

CLEANUP_S = 5.0  # the longest a subscription or watcher may take to stop at shutdown
log = logging.getLogger("meshjobs.trust.service")
FETCH = 256
WRITERS = 32


class _Releases(QuarantineBoard):
    """A quarantine board that also notes which peers got a new order (``touched``), and a release."""

    def __init__(self, operators: frozenset[str], kv: MeshKV | None = None) -> None:
        super().__init__(operators, kv)
        self.released: set[str] = set()
        self.touched: set[str] = set()
        self.changed = asyncio.Event()

    def apply(self, key: str, value: bytes, operation: str | None = None) -> bool:
        became = super().apply(key, value, operation)
        if became:
            self.touched.add(key)
            if self.orders[key].action == "release":
                self.released.add(key)
            self.changed.set()
        return became

    def released_seq(self, peer: str) -> int:
        order = self.orders.get(peer)
        return order.seq if order is not None and order.action == "release" else 0


class TrustService:
    """Folds verified evidence into signed records. Use :meth:`open`, then :meth:`run`."""

    def __init__(self, nc: NATS, identity: Identity, policy: TrustPolicy, kv: MeshKV, board: _Releases) -> None:
        self.nc = nc
        self.identity = identity
        self.key = identity.public_key
        self.kv = kv
        self.board = board
        self.js = nc.jetstream(domain=DOMAIN, timeout=5.0)
        self.anchors = policy.operators | policy.pretrusted | {self.key}
        self.records: dict[str, Record] = {}
        self.state = ServiceState(service=self.key, seq=0, last_seq=0)
        self.ledger = Ledger()
        self.stats: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self._revisions: dict[str, int] = {}
        self._written: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._lock = asyncio.Lock()
        self._clock = 0
        self._position = 0  # the stream sequence handled last in this run
        self._replay_until = 0  # evidence up to here was folded before this run: remember it only
        self._saved = -1  # the last_seq of the progress record written last
        self._standing = Standing(self.anchors, self._credibility)

    @classmethod
    async def open(
        cls, nc: NATS, identity: Identity, policy: TrustPolicy, *, replicas: int | None = None
    ) -> TrustService:
        """Provision what is missing (where allowed), load its records and follow release orders."""
        await provision(nc, STATE, replicas=replicas)
        kv = await open_bucket(nc, BUCKET, create=False)
        board = await _Releases.open(nc, policy.operators | {identity.public_key}, replicas=replicas)
        if not isinstance(board, _Releases):  # QuarantineBoard.open builds the class it is called on
            raise TypeError("expected a release board")
        service = cls(nc, identity, policy, kv, board)
        try:
            await service._load()
        except BaseException:
            await board.close()
            raise
        return service

    def _credibility(self, key: str) -> float:
        record = self.records.get(key)
        return record.credibility(self._clock) if record is not None else 0.0

    def _export(self, peer: str) -> None:
        """Publish the peer's score and whether it is quarantined (automatically or by an order) as metrics."""
        record = self.records.get(peer) or Record(peer=peer)
        metrics.set_peer_trust(peer, record.score(), record.quarantined or self.board.is_quarantined(peer))

    # -- loading ---------------------------------------------------------------------

    async def _load(self) -> None:
        """Its own latest signed revision of every key (where the latest one is not, it is written again)."""
        watcher = await replay(self.js, BUCKET)
        latest: dict[str, bytes] = {}
        try:
            async for update in watcher:
                if update is None:
                    break
                latest[update.key] = update.value or b""
                self._revisions[update.key] = int(update.revision or 0)
                self._consider(update.key, update.value or b"")
        finally:
            await watcher.stop()
        self._dirty = {key for key in self.records if latest.get(key) != self._written.get(key)}
        self._mark_anchors()
        self._replay_until = self.state.last_seq
        self._saved = self.state.last_seq
        # What it holds now, orders included; later orders are exported as they change.
        self.board.touched.clear()
        for key in self.records.keys() | {p for p in self.board.orders if self.board.is_quarantined(p)}:
            self._export(key)
        log.info("loaded %d records; resuming after evidence #%d", len(self.records), self.state.last_seq)

    def _mark_anchors(self) -> None:
        """Readers learn who the anchors are from the records: each says whether its peer is one."""
        for key in self.anchors | {k for k, r in self.records.items() if r.anchor}:
            record = self.records.get(key) or Record(peer=key)
            if record.anchor != (key in self.anchors):
                self.records[key] = record.model_copy(update={"anchor": key in self.anchors})
                self._dirty.add(key)

    def _consider(self, key: str, value: bytes) -> None:
        if key == state_key(self.key):
            try:
                state = open_statement(TRUST_MAGIC, ServiceState, "service", value)
            except Rejected:
                return
            if state.service == self.key and state.seq > self.state.seq:
                self.state, self._written[key] = state, value
            return
        if not is_public_key(key):
            return
        try:
            record = open_statement(TRUST_MAGIC, Record, "service", value)
        except Rejected:
            return
        current = self.records.get(key)
        if record.service == self.key and record.peer == key and (current is None or record.seq > current.seq):
            self.records[key], self._written[key] = record, value

    # -- running ---------------------------------------------------------------------

    async def run(self) -> None:
        """Consume evidence, honour releases and guard the bucket until cancelled."""
        tasks = [asyncio.create_task(t) for t in (self._consume(), self._releases(), self._guard())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            # Bounded: a task stuck in its own cleanup must not hold a shutdown.
            await asyncio.wait(tasks, timeout=CLEANUP_S)

    async def close(self) -> None:
        await self.board.close()

    def _config(self) -> ConsumerConfig:
        common: dict[str, Any] = {
            "ack_policy": AckPolicy.NONE,
            "filter_subject": f"{SUBJECT}.>",
            "inactive_threshold": 60.0,
            "mem_storage": True,
        }
        if self._position:
            return ConsumerConfig(
                **common, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._position + 1
            )
        if self._replay_until and self.state.updated_ms:
            # Read the window before the resume point again: remember what it granted, fold nothing.
            since = max(self.state.updated_ms - WINDOW_MS - SKEW_MS, 0) / 1000
            start = datetime.datetime.fromtimestamp(since, datetime.UTC)
            return ConsumerConfig(**common, deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        if self._replay_until:
            first = self._replay_until + 1
            return ConsumerConfig(**common, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL, **common)

    async def _consume(self) -> None:
        """Read the evidence stream in order with server-named consumers; recreate one that breaks."""
        while True:
            sub = None
            try:
                info = await self.js.add_consumer(STREAM, config=self._config())
                sub = await self.js.pull_subscribe_bind(consumer=info.name, stream=STREAM)
                while True:
                    try:
                        msgs = await sub.fetch(FETCH, timeout=1.0)
                    except TimeoutError:
                        msgs = []
                    for msg in msgs:
                        self._process(msg)
                    await self.flush()
                    if len(msgs) < FETCH:
                        self.ready.set()  # caught up
            except (nats.errors.Error, MeshError) as exc:
                log.warning("evidence consumer broke (%s); resuming after #%d", exc, self._position)
                await asyncio.sleep(0.5)
            finally:
                if sub is not None:
                    try:
                        await asyncio.wait_for(sub.unsubscribe(), CLEANUP_S)
                    except (nats.errors.Error, TimeoutError):
                        pass  # the connection is closing

    def _process(self, msg: Msg) -> None:
        """One message of the evidence stream, in order."""
        seq = int(msg.metadata.sequence.stream)
        if seq <= self._position:
            return  # delivered again after a consumer was recreated
        self._position = seq
        received = int(msg.metadata.timestamp.timestamp() * 1000)
        self._clock = received
        self.ledger.prune(received)
        remember_only = seq <= self._replay_until
        if not remember_only:
            self.state = self.state.model_copy(
                update={"last_seq": seq, "updated_ms": received, "processed": self.state.processed + 1}
            )
        try:
            evidence = open_statement(EVIDENCE_MAGIC, Evidence, "submitter", msg.data)
        except Rejected as exc:
            self._invalid(seq, f"does not verify: {exc}", remember_only)
            return
        if msg.subject != f"{SUBJECT}.{evidence.peer}":
            self._invalid(seq, "filed under another peer's subject", remember_only)
            return
        verdict = assess(evidence, self._standing, received)
        if not verdict.valid:
            self._invalid(seq, verdict.problem, remember_only)
            return
        self._fold(evidence, verdict, seq, received, remember_only)

    def _fold(self, evidence: Evidence, verdict: Verdict, seq: int, received: int, remember_only: bool) -> None:
        peer = evidence.peer
        record = self.records.get(peer) or Record(peer=peer)
        if self.ledger.seen(evidence):
            if not remember_only:
                self.stats["duplicate"] += 1
                metrics.count_evidence("duplicate")
            return
        already = self.ledger.already(evidence)
        self.ledger.add(evidence, verdict)
        if remember_only or seq <= record.evidence_seq:
            return
        released = self.board.released_seq(peer)
        folded = record.fold(
            verdict, evidence, received_ms=received, stream_seq=seq, already=already, released_ms=released
        )
        self.records[peer] = folded
        self._dirty.add(peer)
        self.stats["folded"] += 1
        metrics.count_evidence("folded")
        if folded.quarantined and not record.quarantined:
            log.warning("quarantined %s: %s", peer, folded.reason)

    def _invalid(self, seq: int, problem: str, remember_only: bool) -> None:
        if remember_only:
            return
        self.stats["invalid"] += 1
        metrics.count_evidence("invalid")
        self.state = self.state.model_copy(update={"invalid": self.state.invalid + 1})
        count = self.stats["invalid"]
        if count <= 10 or count & (count - 1) == 0:  # sampled: the first ten, then at powers of two
            text = "".join(c if c.isprintable() else "?" for c in problem)[:300]
            log.warning("invalid evidence #%d (%d so far): %s", seq, count, text)

    # -- writing ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every changed record, then the service's own progress; all signed."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if not dirty and self.state.last_seq == self._saved:
            return
        limit = asyncio.Semaphore(WRITERS)

        async def write(peer: str) -> None:
            async with limit:
                record = self.records[peer].stamped(self.key)
                self.records[peer] = record
                await self._write(peer, seal_statement(TRUST_MAGIC, self.identity, record))
                self._export(peer)

        try:
            await asyncio.gather(*(write(peer) for peer in sorted(dirty)))
        except BaseException:
            self._dirty |= dirty  # written again next time (a record's seq only grows)
            raise
        self.state = self.state.model_copy(update={"seq": max(now_ms(), self.state.seq + 1)})
        await self._write(state_key(self.key), seal_statement(TRUST_MAGIC, self.identity, self.state))
        self._saved = self.state.last_seq

    async def _write(self, key: str, data: bytes) -> None:
        """Compare-and-set against the revision it knows; another writer is logged, then overwritten."""
        self._written[key] = data
        try:
            revision = await self.kv.update(key, data, last=self._revisions.get(key, 0))
        except KeyExists:
            log.warning("%s was written by someone else; writing the signed record again", key[:20])
            revision = await self.kv.put(key, data)
        self._revisions[key] = revision

    # -- releases and guarding -------------------------------------------------------

    async def _releases(self) -> None:
        """Lift automatic quarantines that an operator's newer release order covers."""
        while True:
            await self.board.changed.wait()
            self.board.changed.clear()
            async with self._lock:
                released, self.board.released = self.board.released, set()
                touched, self.board.touched = self.board.touched, set()
                for peer in released:
                    order, record = self.board.orders.get(peer), self.records.get(peer)
                    if order is None or record is None:
                        continue
                    lifted = record.release(order.seq, order.operator, order.reason)
                    if lifted is not None:
                        self.records[peer] = lifted
                        self._dirty.add(peer)
                        log.warning("released %s from automatic quarantine by order seq %d", peer, order.seq)
                await self._flush()
                for peer in touched:  # an order alone (no record written) changes what routers do too
                    self._export(peer)

    async def _guard(self) -> None:
        """Write its record again wherever a revision it did not write becomes the latest."""
        mine = state_key(self.key)

        async def watch() -> Any:
            return await (await self.js.key_value(BUCKET)).watchall()

        async def on_update(update: Any) -> None:
            if update is None or (update.key not in self.records and update.key != mine):
                return
            revision = int(update.revision or 0)
            if revision > self._revisions.get(update.key, 0) and self._foreign(update.key, update.value or b""):
                async with self._lock:
                    self._revisions[update.key] = max(self._revisions.get(update.key, 0), revision)
                    if update.key in self.records:
                        self._dirty.add(update.key)
                    else:
                        self._saved = -1
                    self.stats["repaired"] += 1
                    await self._flush()

        await follow(watch, on_update, what="reputation guard", errors=(TimeoutError, nats.errors.Error, MeshError))

    def _foreign(self, key: str, value: bytes) -> bool:
        """Whether the latest revision of *key* must be replaced by what this service holds.

        Its own writes are serialised per key (under the lock), so a newer
        revision that does not hold what it wrote last is someone else's: a
        forgery, junk or a delete, or an older record of its own written again
        (a rollback). A newer record signed with its key is left alone (another
        instance with this key is running: logged, never fought over).
        """
        if value == self._written.get(key):
            return False
        model: type[Record] | type[ServiceState] = ServiceState if key == state_key(self.key) else Record
        try:
            found = open_statement(TRUST_MAGIC, model, "service", value)
        except Rejected:
            return True
        current = self.state if key == state_key(self.key) else self.records[key]
        if found.service != self.key or found.seq < current.seq:
            return True
        if self.stats["twin"] == 0:
            log.error("another trust service with this key (%s…) is writing; run exactly one", self.key[:12])
        self.stats["twin"] += 1
        return False


async def serve(nc: NATS, identity: Identity, policy: TrustPolicy, *, on_ready: Any = None) -> None:
    """Run a trust service on *nc* until cancelled; *on_ready* (a callable) is called once it reads evidence."""
    service = await TrustService.open(nc, identity, policy)
    try:
        runner = asyncio.create_task(service.run())
        ready = asyncio.create_task(service.ready.wait())
        await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and on_ready is not None:
            on_ready(service)
        ready.cancel()
        await runner
    finally:
        await service.close()
