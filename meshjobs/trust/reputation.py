"""Reputation: signed evidence of what each peer did, folded into a score in replicated KV.

Every outcome a submitter sees becomes a piece of **evidence**, signed by the
submitter (a ``MJ1V`` frame) and kept in the ``EVIDENCE`` stream under
``mesh.evidence.<peer>`` where an operator can audit it; for successes,
rejected and disputed results it carries the worker's own signed result. The
evidence is then folded into the peer's **record** in the ``reputation`` KV
bucket by compare-and-set, retried on conflict, so concurrent updaters never
lose an update; each record remembers the ids of its latest 256 pieces of
evidence, so a write that timed out but was applied is not applied again when
it is retried (the evidence stream also drops a re-sent piece of evidence
within its two-minute duplicate window).

Score: the mean of a Beta distribution over good and bad outcomes,
``(α + 1) / (α + β + 2)``, where each piece of evidence adds its weight to α
(good) or β (bad) and both decay with a half-life of seven days, so old
behaviour fades. Weights: success +1 α; failure and timeout +1 β; a disputed
result (outvoted by a quorum) +3 β; a rejected result (did not verify) +5 β.
A peer with no evidence scores 0.5. A peer is **quarantined automatically**
when its score is below 0.3 with at least three pieces of bad evidence.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from typing import Any, Literal

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshjobs.envelope import EVIDENCE_MAGIC, Wire, now_ms, open_statement, seal_statement
from meshjobs.errors import KeyExists, MeshError, Rejected
from meshjobs.identity import Identity
from meshjobs.state import (
    DOMAIN,
    BucketSpec,
    Entry,
    MeshKV,
    StateSpec,
    StreamSpec,
    open_bucket,
    provision,
    read_subject,
    watch_bucket,
)

BUCKET = "reputation"
STREAM = "EVIDENCE"
SUBJECT = "mesh.evidence"
STATE: tuple[StateSpec, ...] = (BucketSpec(BUCKET), StreamSpec(STREAM, (f"{SUBJECT}.>",), max_age_s=90 * 86400.0))
HALF_LIFE_S = 7 * 24 * 3600
WEIGHTS: dict[str, tuple[float, float]] = {
    "success": (1.0, 0.0),
    "failure": (0.0, 1.0),
    "timeout": (0.0, 1.0),
    "disputed": (0.0, 3.0),
    "rejected": (0.0, 5.0),
}
PRIOR_SCORE = 0.5
QUARANTINE_SCORE = 0.3
QUARANTINE_MIN_BAD = 3
RECENT_IDS = 256
Kind = Literal["success", "failure", "timeout", "disputed", "rejected"]


class Evidence(Wire):
    """One signed observation by a submitter about a peer."""

    version: Literal[1]
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    kind: Kind
    peer: str
    submitter: str
    job_id: str = Field(max_length=64)
    capability: str = Field(max_length=128)
    at_ms: int
    latency_ms: float | None = None
    detail: str = Field("", max_length=1000)
    result: str | None = Field(None, max_length=256 * 1024)


class Record(BaseModel):
    """A peer's aggregate, as stored in the reputation bucket."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    peer: str
    alpha: float = 0.0
    beta: float = 0.0
    counts: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(WEIGHTS, 0))
    latency_ms: float | None = None
    updated_ms: int = 0
    recent: list[str] = Field(default_factory=list)

    def _decayed(self, now: int) -> tuple[float, float]:
        factor = math.pow(0.5, max(now - self.updated_ms, 0) / 1000 / HALF_LIFE_S) if self.updated_ms else 1.0
        return self.alpha * factor, self.beta * factor

    def score(self, now: int | None = None) -> float:
        alpha, beta = self._decayed(now_ms() if now is None else now)
        return (alpha + 1) / (alpha + beta + 2)

    @property
    def bad(self) -> int:
        return sum(self.counts.get(k, 0) for k, (_, b) in WEIGHTS.items() if b > 0)

    def auto_quarantined(self, now: int | None = None) -> bool:
        return self.bad >= QUARANTINE_MIN_BAD and self.score(now) < QUARANTINE_SCORE

    def apply(self, evidence: Evidence, now: int) -> Record:
        alpha, beta = self._decayed(now)
        good, bad = WEIGHTS[evidence.kind]
        counts = dict(self.counts)
        counts[evidence.kind] = counts.get(evidence.kind, 0) + 1
        latency = self.latency_ms
        if evidence.latency_ms is not None and evidence.kind == "success":
            latency = evidence.latency_ms if latency is None else 0.8 * latency + 0.2 * evidence.latency_ms
        recent = (self.recent + [evidence.id])[-RECENT_IDS:]
        return Record(
            peer=self.peer,
            alpha=alpha + good,
            beta=beta + bad,
            counts=counts,
            latency_ms=latency,
            updated_ms=now,
            recent=recent,
        )

    def explain(self, now: int | None = None) -> str:
        now = now_ms() if now is None else now
        alpha, beta = self._decayed(now)
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        return (
            f"score {self.score(now):.3f} = (α+1)/(α+β+2) with α={alpha:.2f} (good), β={beta:.2f} (bad), "
            f"after {counts or 'no evidence'}; weights: success +1α, failure/timeout +1β, disputed +3β, "
            f"rejected +5β; half-life {HALF_LIFE_S // 86400} days"
        )


def evidence_id(kind: str, peer: str, job_id: str, submitter: str) -> str:
    """One id per (kind, peer, job, submitter): reporting the same thing twice counts once."""
    return hashlib.sha256(f"{kind}\0{peer}\0{job_id}\0{submitter}".encode()).hexdigest()[:32]


class ReputationBook:
    """Reads and writes reputation for one submitter identity."""

    def __init__(self, nc: NATS, identity: Identity, kv: MeshKV) -> None:
        self.nc = nc
        self.identity = identity
        self.kv = kv
        self.js = nc.jetstream(domain=DOMAIN, timeout=5.0)
        self._cache: dict[str, Record] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def watch(self) -> None:
        """Keep every record in memory, updated as the bucket changes (routers read per job)."""
        cache: dict[str, Record] = {}
        ready = asyncio.Event()

        def on_entry(entry: Entry) -> None:
            cache[entry.key] = _parse(entry.value, entry.key)

        self._watch = asyncio.create_task(watch_bucket(self.kv, on_entry, ready))
        await asyncio.wait_for(ready.wait(), 10)
        self._cache = cache

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    @classmethod
    async def open(
        cls, nc: NATS, identity: Identity, *, replicas: int | None = None, placement: str | None = None
    ) -> ReputationBook:
        """Open (creating where missing) the bucket and the evidence stream.

        Where they exist already (an operator provisioned them with
        `meshjobs mesh up`), their replicas and placement are kept.
        """
        await provision(nc, STATE, replicas=replicas, placement=placement)
        kv = await open_bucket(nc, BUCKET, create=False)
        return cls(nc, identity, kv)

    def evidence_for(
        self,
        kind: Kind,
        peer: str,
        *,
        job_id: str,
        capability: str,
        latency_ms: float | None = None,
        detail: str = "",
        result: bytes | None = None,
    ) -> Evidence:
        """A piece of evidence by this submitter (not yet signed or stored)."""
        return Evidence(
            version=1,
            id=evidence_id(kind, peer, job_id, self.identity.public_key),
            kind=kind,
            peer=peer,
            submitter=self.identity.public_key,
            job_id=job_id,
            capability=capability,
            at_ms=now_ms(),
            latency_ms=latency_ms,
            detail=detail[:1000],
            result=result.decode("utf-8", "replace")[: 256 * 1024] if result else None,
        )

    async def report(self, kind: Kind, peer: str, **details: Any) -> Record:
        """Sign evidence, keep it in the evidence stream, fold it into the peer's record."""
        records = await self.store([self.evidence_for(kind, peer, **details)])
        return records[peer]

    async def store(self, batch: list[Evidence]) -> dict[str, Record]:
        """Sign and keep every piece of *batch*, then fold each peer's share in one update."""
        await asyncio.gather(
            *(
                self.js.publish(
                    f"{SUBJECT}.{e.peer}",
                    seal_statement(EVIDENCE_MAGIC, self.identity, e),
                    headers={"Nats-Msg-Id": e.id},
                )
                for e in batch
            )
        )
        by_peer: dict[str, list[Evidence]] = {}
        for evidence in batch:
            by_peer.setdefault(evidence.peer, []).append(evidence)
        folded = await asyncio.gather(*(self.fold(*items) for items in by_peer.values()))
        return dict(zip(by_peer, folded, strict=True))

    async def fold(self, *batch: Evidence) -> Record:
        """Compare-and-set evidence about one peer into its record; retried on conflict, applied once."""
        peer = batch[0].peer
        for attempt in range(100):
            entry = await self.kv.get(peer)
            record = _parse(entry.value, peer) if entry else Record(peer=peer)
            updated = record
            now = now_ms()
            for evidence in batch:
                if evidence.id not in updated.recent:
                    updated = updated.apply(evidence, now)
            if updated is record:
                return record
            data = updated.model_dump_json().encode()
            try:
                if entry is None:
                    await self.kv.create(peer, data)
                else:
                    await self.kv.update(peer, data, last=entry.revision)
                if self._cache is not None:
                    self._cache[peer] = updated  # the watch confirms it a moment later
                return updated
            except KeyExists:
                await asyncio.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
        raise MeshError(f"could not update the reputation of {peer[:12]}…: too much contention")

    async def record(self, peer: str) -> Record:
        entry = await self.kv.get(peer)
        return _parse(entry.value, peer) if entry else Record(peer=peer)

    async def records(self, peers: list[str]) -> dict[str, Record]:
        if self._cache is not None:
            return {p: self._cache.get(p) or Record(peer=p) for p in peers}
        found = await asyncio.gather(*(self.record(p) for p in peers))
        return dict(zip(peers, found, strict=True))

    async def evidence(self, peer: str, limit: int = 100) -> list[tuple[Evidence | None, str]]:
        """The latest evidence about *peer*, each verified: (evidence or None, problem)."""
        out: list[tuple[Evidence | None, str]] = []
        for msg in await read_subject(self.js, STREAM, f"{SUBJECT}.{peer}"):
            try:
                out.append((open_statement(EVIDENCE_MAGIC, Evidence, "submitter", msg.data), ""))
            except Rejected as exc:
                out.append((None, str(exc)))
        return out[-limit:]


def _parse(data: bytes, peer: str) -> Record:
    try:
        record = Record.model_validate_json(data)
    except ValidationError:
        return Record(peer=peer)  # an unreadable record restarts from the prior
    return record


def summary(record: Record) -> dict[str, Any]:
    """What ``peers --json`` and ``reputation --json`` show of a record."""
    return {
        "score": round(record.score(), 4),
        "counts": record.counts,
        "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 3),
        "auto_quarantined": record.auto_quarantined(),
        "explanation": record.explain(),
    }
