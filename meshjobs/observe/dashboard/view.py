"""The dashboard's live picture of the mesh, kept current from NATS, and its fan-out to browsers.

Where each panel's data comes from (and so what it can honestly claim):

- **servers**: monitoring endpoints (:mod:`.health`), polled;
- **peers**: discovery (``$SRV.INFO``) for who offers what, ``$SRV.STATS``
  for load (jobs handled per second between two polls, as each worker
  counts them), the reputation bucket for trust scores, the quarantine board
  (orders signed by the operators of the local trust policy);
- **jobs**: outcomes filed as signed evidence (``mesh.evidence.>``, each
  verified; every outcome a routing submitter sees is filed) and durable job
  states from the ``jobs`` bucket (written unsigned by submitters and
  workers). Jobs that leave neither (a plain request by a submitter without
  reputation) are not seen by anyone but their submitter;
- **approvals**: an :class:`ApprovalSource`; none exists yet, so the panel
  says that no approval gates are configured.

Every browser gets a snapshot, then events (``servers``, ``peers``, ``job``, ``jobs``,
``notes``) as things change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from meshjobs.client import Client
from meshjobs.discovery import SERVICE_NAME, PeerInfo, collect, discover
from meshjobs.envelope import EVIDENCE_MAGIC, open_statement
from meshjobs.errors import MeshError, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.infra.topology import Topology
from meshjobs.observe.dashboard.evidence import evidence_row, recent_evidence, state_row
from meshjobs.observe.dashboard.health import from_monitors, from_topology
from meshjobs.router import Router
from meshjobs.state import open_bucket
from meshjobs.trust.quarantine import issue_order
from meshjobs.trust.reputation import SUBJECT as EVIDENCE_SUBJECT
from meshjobs.trust.reputation import Evidence, summary

log = logging.getLogger("meshjobs.dashboard")
#: Events a browser may fall behind by before it is cut off (it reconnects and gets a fresh snapshot).
MAX_BACKLOG = 1000
#: Fields of evidence too large (or too raw) for the page: the signed frames stay in the stream.
BULKY = {"result", "request", "proof"}


class ApprovalSource(Protocol):
    """Where waiting approvals come from, once signed approval gates exist."""

    configured: bool

    def waiting(self) -> list[dict[str, Any]]: ...


class NoApprovals:
    """No approval gates are configured: nothing is waiting."""

    configured = False

    def waiting(self) -> list[dict[str, Any]]:
        return []


@dataclass(frozen=True)
class ViewSettings:
    """What the dashboard watches and may do."""

    operators: frozenset[str]
    """Operators of the local trust policy: whose quarantine orders count."""
    trust_services: frozenset[str] = frozenset()
    """Trust services of the local policy: whose signed reputation records count."""
    actions: bool = False
    """Whether this dashboard signs orders (``--operator`` with an operator identity)."""
    monitors: tuple[str, ...] = ()
    topology: Topology | None = None
    poll_s: float = 2.0
    jobs_kept: int = 200
    approvals: ApprovalSource = field(default_factory=NoApprovals)


class Subscriber:
    """One browser's queue of events; cut off when it falls too far behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cut_off = False


class MeshView:
    """Keeps the dashboard's data current; :meth:`start` it, :meth:`close` it."""

    def __init__(self, nc: NATS, identity: Identity, settings: ViewSettings) -> None:
        self.nc = nc
        self.identity = identity
        self.settings = settings
        self.client = Client(nc, identity)
        self.router: Router | None = None
        self.closing = asyncio.Event()
        self.servers: dict[str, Any] = {}
        self.peers: list[dict[str, Any]] = []
        self.quarantine: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, str] = {}
        self.unverifiable = 0
        self._queued_at: dict[str, int] = {}
        self._load_seen: dict[str, tuple[float, int]] = {}
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{EVIDENCE_SUBJECT}.>", cb=self._on_evidence)
        for loop in (self._servers_loop, self._reputation_loop, self._peers_loop, self._jobs_loop):
            self._tasks.append(asyncio.create_task(loop()))

    async def close(self) -> None:
        self.closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass  # the connection is closing anyway
        if self.router is not None:
            await self.router.close()

    # -- fan-out ---------------------------------------------------------------

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def _broadcast(self, event: str, data: Any) -> None:
        for subscriber in list(self._subscribers):
            if subscriber.queue.qsize() >= MAX_BACKLOG:
                subscriber.cut_off = True
                self._subscribers.discard(subscriber)
                continue
            subscriber.queue.put_nowait((event, data))

    def _note(self, source: str, problem: str | None) -> None:
        """Show (or clear) a problem with one data source in the page's status bar."""
        if self.notes.get(source) == problem or (problem is None and source not in self.notes):
            return
        if problem is None:
            del self.notes[source]
        else:
            self.notes[source] = problem
        self._broadcast("notes", dict(self.notes))

    def snapshot(self) -> dict[str, Any]:
        approvals = self.settings.approvals
        return {
            "identity": self.identity.public_key,
            "actions": self.settings.actions,
            "servers": self.servers,
            "peers": self.peers,
            "quarantine": self.quarantine,
            "jobs": self.job_rows(),
            "approvals": {"configured": approvals.configured, "waiting": approvals.waiting()},
            "notes": dict(self.notes),
        }

    def job_rows(self) -> list[dict[str, Any]]:
        """The jobs kept, newest first."""
        return sorted(self.jobs.values(), key=lambda r: r.get("at_ms") or 0, reverse=True)

    # -- servers ---------------------------------------------------------------

    async def _servers_loop(self) -> None:
        while True:
            view = await asyncio.to_thread(self._health)
            if _without(view, "checked_ms") != _without(self.servers, "checked_ms"):
                self.servers = view
                self._broadcast("servers", view)
            await asyncio.sleep(self.settings.poll_s)

    def _health(self) -> dict[str, Any]:
        if self.settings.topology is not None:
            return from_topology(self.settings.topology)
        return from_monitors(list(self.settings.monitors))

    # -- peers, reputation, quarantine -------------------------------------------

    async def _reputation_loop(self) -> None:
        """Open reputation and quarantine (retrying while JetStream is unreachable), then read recent evidence."""
        while self.router is None:
            try:
                self.router = await Router.open(self.client, self.settings.operators, self.settings.trust_services)
                self._note("reputation", None)
            except (MeshError, nats.errors.Error, TimeoutError) as exc:
                self._note("reputation", f"reputation and quarantine unavailable: {exc}")
                await asyncio.sleep(5)
        try:
            for data in await recent_evidence(self.nc, self.settings.jobs_kept // 2):
                self._add_evidence(data, live=False)
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.info("could not read recent evidence: %s", exc)
        await self.refresh_peers()
        self._broadcast("jobs", self.job_rows())

    async def _peers_loop(self) -> None:
        while True:
            self._note("nats", None if self.nc.is_connected else "disconnected from NATS; reconnecting")
            try:
                await self.refresh_peers()
                self._note("discovery", None)
            except (MeshError, nats.errors.Error, TimeoutError) as exc:
                self._note("discovery", f"discovery failed: {exc}")
            await asyncio.sleep(self.settings.poll_s)

    async def refresh_peers(self) -> None:
        """Discovery, load, scores and quarantine now; broadcast when anything changed."""
        infos, stats = await asyncio.gather(
            discover(self.nc, timeout=0.5, operators=self.settings.operators),
            collect(self.nc, f"$SRV.STATS.{SERVICE_NAME}", timeout=0.5),
        )
        loads = self._loads(stats)
        router = self.router
        keys = sorted({i.peer for i in infos if i.peer})
        records = await router.book.records(keys) if router is not None else {}
        peers = [self._peer_row(info, loads.get(info.instance), records.get(info.peer)) for info in infos]
        names = {p["peer"]: p["name"] for p in peers}
        quarantine = []
        if router is not None:
            for peer, order in sorted(router.board.orders.items(), key=lambda kv: -kv[1].seq):
                row = order.model_dump(mode="json")
                row.update(name=names.get(peer, ""), quarantined=router.board.is_quarantined(peer))
                quarantine.append(row)
        if peers != self.peers or quarantine != self.quarantine:
            self.peers, self.quarantine = peers, quarantine
            self._broadcast("peers", {"peers": peers, "quarantine": quarantine})

    def _peer_row(self, info: PeerInfo, load: dict[str, Any] | None, record: Any) -> dict[str, Any]:
        row = info.as_dict()
        row["load"] = load
        router = self.router
        if router is None or record is None:
            row.update(trust=None, state="unknown")
            return row
        trust = summary(record)
        # Tolerant of the record format: whatever summary() gives, these keys or None.
        row["trust"] = {k: trust.get(k) for k in ("score", "counts", "latency_ms", "auto_quarantined", "signed_by")}
        if router.board.is_quarantined(info.peer):
            row["state"] = "quarantined"
        elif trust.get("auto_quarantined"):
            row["state"] = "auto-quarantined"
        else:
            row["state"] = "ok"
        return row

    def _loads(self, stats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Per worker process: jobs handled, errors, mean handler time, and jobs/s since the last poll."""
        now = time.monotonic()
        loads = {}
        for reply in stats:
            instance = str(reply.get("id", ""))
            endpoints = [e for e in reply.get("endpoints") or [] if isinstance(e, dict)]
            handled = sum(_count(e.get("num_requests")) for e in endpoints)
            errors = sum(_count(e.get("num_errors")) for e in endpoints)
            busy_ns = sum(_count(e.get("processing_time")) for e in endpoints)
            before = self._load_seen.get(instance)
            rate = None
            if before is not None and now > before[0] and handled >= before[1]:
                rate = round((handled - before[1]) / (now - before[0]), 2)
            self._load_seen[instance] = (now, handled)
            mean_ms = round(busy_ns / handled / 1e6, 3) if handled else None
            loads[instance] = {"handled": handled, "errors": errors, "mean_ms": mean_ms, "per_s": rate}
        return loads

    async def peer_detail(self, peer: str, limit: int = 50) -> dict[str, Any]:
        """A peer's reputation explained, its quarantine order and its latest evidence (each verified)."""
        router = self.router
        if router is None:
            raise UsageError(self.notes.get("reputation", "reputation is not available yet"))
        record = await router.book.record(peer)
        evidence = await router.book.evidence(peer, limit=limit)
        order = router.board.orders.get(peer)
        items = []
        for item, problem in reversed(evidence):
            if item is None:
                items.append({"valid": False, "problem": problem})
            else:
                items.append({"valid": True, **_public(item)})
        name = next((p["name"] for p in self.peers if p["peer"] == peer), "")
        return {
            "peer": peer,
            "name": name,
            "reputation": summary(record),
            "quarantine": order.model_dump(mode="json") if order else None,
            "quarantined": router.board.is_quarantined(peer),
            "evidence": items,
            "actions": self.settings.actions,
        }

    async def order(self, peer: str, action: str, reason: str) -> dict[str, Any]:
        """Sign and store a quarantine or release order about *peer* with this dashboard's operator key."""
        if not self.settings.actions:
            raise Rejected(Reason.DENIED, "this dashboard is read-only")
        order = await issue_order(self.nc, self.identity, peer, action, reason, operators=self.settings.operators)
        router = self.router
        deadline = time.monotonic() + 3.0
        while router is not None and time.monotonic() < deadline:
            current = router.board.orders.get(peer)
            if current is not None and current.seq >= order.seq:
                break
            await asyncio.sleep(0.05)
        await self.refresh_peers()
        return order.model_dump(mode="json")

    # -- jobs ------------------------------------------------------------------

    async def _on_evidence(self, msg: Msg) -> None:
        self._add_evidence(msg.data, live=True)

    def _add_evidence(self, data: bytes, *, live: bool) -> None:
        try:
            evidence = open_statement(EVIDENCE_MAGIC, Evidence, "submitter", data)
        except Rejected:
            self.unverifiable += 1
            self._note("evidence", f"{self.unverifiable} piece(s) of evidence did not verify and are not shown")
            return
        self._add_job(evidence_row(evidence), live)

    def _add_job(self, row: dict[str, Any], live: bool) -> None:
        key = row["key"]
        self.jobs.pop(key, None)
        self.jobs[key] = row
        while len(self.jobs) > self.settings.jobs_kept:
            del self.jobs[next(iter(self.jobs))]
        if live:
            self._broadcast("job", row)

    async def _jobs_loop(self) -> None:
        """Follow the durable job states; retry while the bucket does not exist (nobody queued a job yet)."""
        while True:
            watcher = None
            try:
                bucket = await open_bucket(self.nc, "jobs", create=False, timeout=3.0)
                watcher = await bucket.watchall()
                self._note("jobs", None)
                live = False
                async for update in watcher:
                    if update is None:
                        live = True
                        self._broadcast("jobs", self.job_rows())
                        continue
                    row = state_row(update.key, update.value or b"", self._queued_at)
                    if row is not None:
                        self._add_job(row, live)
            except nats.js.errors.BucketNotFoundError:
                self._note("jobs", None)  # nobody queued a durable job yet: nothing to show, nothing wrong
            except (MeshError, nats.errors.Error, TimeoutError) as exc:
                self._note("jobs", f"durable job states unavailable: {exc}")
            finally:
                if watcher is not None:
                    try:
                        await watcher.stop()
                    except nats.errors.Error:
                        pass  # the connection is closing: nothing left to stop
            await asyncio.sleep(5)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def _public(evidence: Evidence) -> dict[str, Any]:
    """What the page shows of a piece of evidence: everything but the signed frames it carries."""
    data: dict[str, Any] = json.loads(evidence.model_dump_json())
    return {k: v for k, v in data.items() if k not in BULKY}
