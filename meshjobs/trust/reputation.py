"""Reputation, as readers see it: signed evidence out, signed records in.

Submitters only **publish** evidence (:mod:`meshjobs.trust.evidence`, signed
``MJ1V`` frames) to the ``EVIDENCE`` stream under ``mesh.evidence.<peer>``,
where an operator can audit it. The trust service
(:mod:`meshjobs.trust.service`) is the only writer of the ``reputation``
bucket: it checks each piece and its proof and folds it into the peer's
:class:`~meshjobs.trust.record.Record`, which it signs (``MJ1T``).

A :class:`ReputationBook` accepts only records signed by a trust service its
owner lists (``[[trust_service]]`` in the trust file; when none is listed,
its own key, since ``meshjobs up`` runs the service as the local identity),
filed under the peer they are about, and per peer only a higher ``seq`` than
it has seen. Everything else (a forged, unsigned, misfiled or rolled-back
record, a delete) is ignored, and logged once per signer. A peer without an
accepted record is unknown: score 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from meshjobs.envelope import EVIDENCE_MAGIC, TRUST_MAGIC, claimed_signer, open_statement, seal_statement
from meshjobs.errors import Rejected
from meshjobs.identity import Identity, is_public_key
from meshjobs.state import (
    DOMAIN,
    BucketSpec,
    MeshKV,
    StateSpec,
    StreamSpec,
    follow,
    open_bucket,
    provision,
    read_subject,
    replay,
)
from meshjobs.trust.evidence import Evidence, Kind, Standing, assess, check_proof, make_evidence
from meshjobs.trust.record import Record

__all__ = ["BUCKET", "STATE", "STREAM", "SUBJECT", "Evidence", "Kind", "Record", "ReputationBook", "summary"]

BUCKET = "reputation"
STREAM = "EVIDENCE"
SUBJECT = "mesh.evidence"
#: Several revisions per peer: a reader starting after a forged write still finds the signed one.
SPEC = BucketSpec(BUCKET, history=8)
STATE: tuple[StateSpec, ...] = (SPEC, StreamSpec(STREAM, (f"{SUBJECT}.>",), max_age_s=90 * 86400.0))
MAX_RECORD_BYTES = 64 * 1024
#: Distinct signers warned about, at most: a flood of forgeries cannot grow memory.
MAX_WARNED = 1000
log = logging.getLogger("meshjobs.trust.reputation")


class RecordFilter:
    """Which signed records count: the pure half of :class:`ReputationBook`."""

    def __init__(self, accepted: frozenset[str]) -> None:
        self.accepted = accepted
        self._warned: set[str] = set()

    def open(self, key: str, data: bytes) -> Record | None:
        """The record in one revision of *key*, or None (logged once per signer) when it does not count."""
        if not data or not is_public_key(key):
            return None
        signer = claimed_signer(data) or "?"
        if signer not in self.accepted:
            self._warn(
                signer,
                f"ignoring reputation records signed by {signer[:12]}…: not a trust service here "
                "(list the mesh's trust service as [[trust_service]] in trust.toml)",
            )
            return None
        try:
            record = open_statement(TRUST_MAGIC, Record, "service", data, MAX_RECORD_BYTES)
        except Rejected as exc:
            self._warn(f"{signer}/invalid", f"ignoring a reputation record that does not verify: {exc}")
            return None
        if record.peer != key:
            self._warn(f"{signer}/misfiled", f"ignoring a record about {record.peer[:12]}… filed under {key[:12]}…")
            return None
        return record

    def _warn(self, what: str, text: str) -> None:
        if what in self._warned or len(self._warned) >= MAX_WARNED:
            return
        self._warned.add(what)
        log.warning("%s", text)

    @staticmethod
    def newer(record: Record, current: Record | None) -> bool:
        return current is None or record.seq > current.seq


class ReputationBook:
    """Reads signed records and publishes evidence for one identity."""

    def __init__(self, nc: NATS, identity: Identity, kv: MeshKV, *, trust_services: Iterable[str] = ()) -> None:
        self.nc = nc
        self.identity = identity
        self.kv = kv
        self.js = nc.jetstream(domain=DOMAIN, timeout=5.0)
        self.filter = RecordFilter(frozenset(trust_services) or frozenset({identity.public_key}))
        self._cache: dict[str, Record] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def accepted(self) -> frozenset[str]:
        """The trust service keys whose records count."""
        return self.filter.accepted

    @classmethod
    async def open(
        cls,
        nc: NATS,
        identity: Identity,
        *,
        trust_services: Iterable[str] = (),
        replicas: int | None = None,
        placement: str | None = None,
    ) -> ReputationBook:
        """Open (creating where missing and allowed) the bucket and the evidence stream.

        *trust_services*: the keys whose records count (``TrustPolicy.trust_services``);
        none: this identity's own. Existing state keeps its replicas and placement.
        """
        await provision(nc, STATE, replicas=replicas, placement=placement)
        kv = await open_bucket(nc, BUCKET, create=False)
        return cls(nc, identity, kv, trust_services=trust_services)

    async def watch(self) -> None:
        """Keep every accepted record in memory, following the bucket (routers read per job)."""
        cache: dict[str, Record] = {}
        ready = asyncio.Event()
        self._watch = asyncio.create_task(self._follow(cache, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
        except BaseException:
            await self.close()
            raise
        self._cache = cache

    async def _follow(self, cache: dict[str, Record], ready: asyncio.Event) -> None:
        """Every kept revision, then every new one: the highest accepted seq per peer wins."""

        def on_update(update: Any) -> None:
            if update is None:
                ready.set()
                return
            record = self.filter.open(update.key, update.value or b"")
            if record is not None and self.filter.newer(record, cache.get(update.key)):
                cache[update.key] = record

        js = self.nc.jetstream(domain=DOMAIN, timeout=2.0)
        await follow(lambda: replay(js, BUCKET), on_update, what="reputation")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    # -- records -------------------------------------------------------------------

    def cached(self, peer: str) -> Record | None:
        """The peer's record as the watch last saw it (None before :meth:`watch` or without one): no I/O."""
        return None if self._cache is None else self._cache.get(peer)

    async def record(self, peer: str) -> Record:
        """The peer's record: the latest accepted revision the bucket keeps, else an unknown one."""
        if self._cache is not None and peer in self._cache:
            return self._cache[peer]
        entry = await self.kv.get(peer)
        if entry is not None and (record := self.filter.open(peer, entry.value)) is not None:
            return record
        best: Record | None = None
        for value in await self._history(peer):  # a forged or deleted latest revision hides nothing
            record = self.filter.open(peer, value)
            if record is not None and self.filter.newer(record, best):
                best = record
        return best or Record(peer=peer)

    async def _history(self, peer: str) -> list[bytes]:
        if not is_public_key(peer):
            return []
        try:
            kv = await self.js.key_value(BUCKET)
            return [e.value or b"" for e in await kv.history(peer)]
        except (TimeoutError, nats.errors.Error):
            return []

    async def records(self, peers: list[str]) -> dict[str, Record]:
        if self._cache is not None:
            return {p: self._cache.get(p) or Record(peer=p) for p in peers}
        found = await asyncio.gather(*(self.record(p) for p in peers))
        return dict(zip(peers, found, strict=True))

    # -- evidence ------------------------------------------------------------------

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
        request: bytes | None = None,
        proof: Iterable[tuple[bytes, bytes]] = (),
        compare: str | None = None,
    ) -> Evidence:
        """A piece of evidence by this submitter (not yet signed or published).

        *request* is the signed envelope frame *result* answers (``Outcome.request``
        and ``Outcome.frame``); *proof* is (request, result) frame pairs of other
        workers for the same job: the agreeing ones for ``agree``, the side
        that outweighs the peer for ``wrong``. Frames too large to embed
        (over 256 KiB) are left out, and the proof then fails. *compare* is
        how the results were compared (:mod:`meshjobs.compare`; None: exact).
        """
        return make_evidence(
            kind,
            peer,
            self.identity.public_key,
            job_id=job_id,
            capability=capability,
            latency_ms=latency_ms,
            detail=detail,
            request=request,
            result=result,
            proof=proof,
            compare=compare,
        )

    async def publish(self, batch: list[Evidence]) -> None:
        """Sign every piece of *batch* and publish it to the evidence stream (the trust service folds it)."""
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

    async def store(self, batch: list[Evidence]) -> None:
        """Old name of :meth:`publish` (submitters no longer write records)."""
        await self.publish(batch)

    async def report(self, kind: Kind, peer: str, **details: Any) -> Evidence:
        """Make, sign and publish one piece of evidence."""
        evidence = self.evidence_for(kind, peer, **details)
        await self.publish([evidence])
        return evidence

    async def evidence(self, peer: str, limit: int = 100) -> list[tuple[Evidence | None, str]]:
        """The latest evidence about *peer*, each signature verified: (evidence or None, problem)."""
        out: list[tuple[Evidence | None, str]] = []
        for msg in await read_subject(self.js, STREAM, f"{SUBJECT}.{peer}"):
            try:
                out.append((open_statement(EVIDENCE_MAGIC, Evidence, "submitter", msg.data), ""))
            except Rejected as exc:
                out.append((None, str(exc)))
        return out[-limit:] if limit else []

    async def audit(self, peer: str, anchors: frozenset[str], limit: int = 20) -> list[dict[str, Any]]:
        """The chain behind *peer*'s score: each piece of evidence, its proof checked, weighed as of now."""
        pieces = await self.evidence(peer, limit)
        keys = {peer} | {e.submitter for e, _ in pieces if e}
        for e, _ in pieces:
            if e is not None:
                try:
                    keys |= set(check_proof(e).others)
                except Rejected:
                    pass
        records = await self.records(sorted(keys))
        anchors = anchors | self.accepted | {key for key, record in records.items() if record.anchor}
        standing = Standing(anchors, lambda key: records[key].credibility() if key in records else 0.0)
        return [audit_item(e, problem, standing) for e, problem in pieces]


def audit_item(evidence: Evidence | None, problem: str, standing: Standing) -> dict[str, Any]:
    """One piece of evidence as ``reputation --evidence`` shows it."""
    if evidence is None:
        return {"valid": False, "problem": problem}
    verdict = assess(evidence, standing)
    return {
        "valid": verdict.valid,
        "problem": verdict.problem,
        "id": evidence.id,
        "kind": evidence.kind,
        "job_id": evidence.job_id,
        "capability": evidence.capability,
        "at_ms": evidence.at_ms,
        "submitter": evidence.submitter,
        "standing": round(verdict.standing, 4),
        "proof_verified": verdict.proof_checked,
        "agreeing": [{"worker": w, "trust": round(t, 4)} for w, t in verdict.agreeing],
        "accused_trust": round(verdict.accused, 4),
        "outweighed": verdict.side > verdict.accused if evidence.kind == "wrong" and verdict.valid else None,
        "detail": evidence.detail,
        "weighs": verdict.explain(),
    }


def summary(record: Record) -> dict[str, Any]:
    """What ``peers --json`` and ``reputation --json`` show of a record."""
    return {
        "score": round(record.score(), 4),
        "mean": round(record.mean(), 4),
        "credibility": round(record.credibility(), 4),
        "anchor": record.anchor,
        "counts": record.counts,
        "verified": record.verified,
        "wrong": record.wrong,
        "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 3),
        "auto_quarantined": record.quarantined,
        "reason": record.reason,
        "signed_by": record.service or None,
        "seq": record.seq,
        "explanation": record.explain(),
    }
