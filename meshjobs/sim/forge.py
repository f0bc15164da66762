"""The ``forge`` scenario's attacks on the reputation system, made from the cheaters' own connections.

The cheaters act as one adversary: each forging peer holds every cheater's
key. Each round, a forging peer:

1. **forges records** straight into the ``reputation`` bucket, signed with
   its own key in the trust service's record format (``MJ1T``) and also as
   plain JSON: a spotless, heavily verified record for itself and for a fellow
   cheater, and a ruined, quarantined one for an honest peer, each with the
   highest sequence number there is;
2. **bad-mouths** an honest peer: evidence filed under a fresh submitter key
   (a Sybil: keys cost nothing), cycling through the kinds that need no proof
   (failure, timeout, rejected) and ``wrong`` with the best "proof" it can
   find, the honest peer's real signed results harvested from the evidence
   stream next to conflicting results the cheaters sign;
3. **praises** itself: ``agree`` evidence under another fresh key whose
   proof fully verifies: the Sybil signs two requests for one job, this
   cheater and a colluder sign the same value for them.

Everything is signed with the real sealing API (:mod:`meshjobs.envelope`,
:func:`meshjobs.trust.evidence.make_evidence`), so what the defence has to see
through is who vouches for the signers, not broken signatures.
:attr:`Forger.stats` counts what was written and what the broker refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from meshjobs import envelope as wire
from meshjobs.errors import MeshError, Rejected
from meshjobs.identity import Identity
from meshjobs.sim.scenarios import CAPABILITY, job_args
from meshjobs.state import DOMAIN, open_bucket, read_subject
from meshjobs.subjects import queue_subject
from meshjobs.trust.evidence import KINDS, Evidence, Kind, make_evidence
from meshjobs.trust.record import Record

log = logging.getLogger("meshjobs.sim.forge")

#: Where evidence and records live (README, "Trust-routed execution").
EVIDENCE_STREAM = "EVIDENCE"
EVIDENCE_SUBJECT = "mesh.evidence"
RECORD_BUCKET = "reputation"
MAX_SEQ = 2**53 - 1
UNPROVEN: tuple[Kind, ...] = tuple(k for k in ("failure", "timeout", "rejected") if k in KINDS)


def fabricate(
    submitter: Identity, workers: list[Identity], value: Any, task: int
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """One job, signed by *submitter* once per worker, each answered with *value*: (job id, (request, result)s).

    Every signature verifies and every result is bound to its request.
    """
    job_id = wire.new_job_id()
    pairs = []
    for worker in workers:
        _, request = wire.seal_envelope(
            submitter, CAPABILITY, job_args(-1, task), audience=queue_subject(CAPABILITY), job_id=job_id, ttl_ms=60_000
        )
        result = wire.seal_result(worker, request_digest=wire.digest(request), job_id=job_id, status="ok", value=value)
        pairs.append((request, result))
    return job_id, pairs


def forged_record(signer: Identity, peer: str, *, good: bool) -> bytes:
    """A record in the trust service's format, signed by *signer* (a key no policy lists as a service)."""
    now = wire.now_ms()
    claim: dict[str, Any] = {"peer": peer, "service": signer.public_key, "seq": MAX_SEQ, "updated_ms": now}
    if good:
        claim.update(good=1000.0, jobs=1000, agreements=1000, verified=1000)
    else:
        claim.update(bad=1000.0, jobs=1000, wrong=1000, quarantined=True, quarantined_ms=now, reason="forged")
    return wire.seal_statement(wire.TRUST_MAGIC, signer, Record.model_validate(claim))


class Forger:
    """One cheater attacking reputation from its own connection, with its colluders' keys at hand."""

    def __init__(
        self, nc: NATS, identity: Identity, colluders: list[Identity], honest: list[str], *, seed: str
    ) -> None:
        self.nc = nc
        self.identity = identity
        self.colluders = [c for c in colluders if c.public_key != identity.public_key]
        self.honest = honest
        self.js = nc.jetstream(domain=DOMAIN, timeout=2.0)
        self.rng = random.Random(f"forge:{seed}")
        self.stats: Counter[str] = Counter()
        self._harvest: dict[str, list[tuple[bytes, bytes]]] = {}

    async def run(self, rounds: int, interval: float) -> None:
        """Attack *rounds* times, *interval* seconds apart; never raises (a refused write is the point)."""
        await asyncio.sleep(self.rng.uniform(0, interval))
        for index in range(rounds):
            for attack in (self.forge_records, self.badmouth, self.praise):
                try:
                    await attack(index)
                except (MeshError, nats.errors.Error, TimeoutError, ValueError) as exc:
                    name = attack.__name__
                    self.stats[f"{name}_refused"] += 1
                    if self.stats[f"{name}_refused"] == 1:  # once per attack: the host log stays short
                        who = self.identity.public_key[:8]
                        log.warning("%s by %s… refused: %s: %s", name, who, type(exc).__name__, exc)
            await asyncio.sleep(interval)

    async def forge_records(self, index: int) -> None:
        kv = await open_bucket(self.nc, RECORD_BUCKET, create=False, timeout=5.0)
        targets = [(self.identity.public_key, True)]
        if self.colluders:
            targets.append((self.rng.choice(self.colluders).public_key, True))
        if self.honest:
            targets.append((self.rng.choice(self.honest), False))
        for peer, good in targets:
            await kv.put(peer, forged_record(self.identity, peer, good=good))
            plain = {"version": 1, "peer": peer, "alpha": 1000.0 if good else 0.0, "beta": 0.0 if good else 1000.0}
            await kv.put(peer, json.dumps(plain).encode())
            self.stats["records_forged"] += 2

    async def _harvested(self, peer: str) -> list[tuple[bytes, bytes]]:
        """Real (request, signed result) pairs of *peer*, from evidence other submitters filed about it."""
        if peer not in self._harvest:
            found = []
            for msg in await read_subject(self.js, EVIDENCE_STREAM, f"{EVIDENCE_SUBJECT}.{peer}"):
                try:
                    evidence = wire.open_statement(wire.EVIDENCE_MAGIC, Evidence, "submitter", msg.data)
                except Rejected:
                    continue
                if evidence.request and evidence.result:
                    found.append((evidence.request.encode(), evidence.result.encode()))
            self._harvest[peer] = found[-20:]
        return self._harvest[peer]

    async def badmouth(self, index: int) -> None:
        if not self.honest:
            return
        victim = self.rng.choice(self.honest)
        sybil = Identity.generate()
        kinds: tuple[Kind, ...] = ("wrong", *UNPROVEN)
        kind = kinds[index % len(kinds)]
        harvested = await self._harvested(victim) if kind == "wrong" else []
        if kind == "wrong" and harvested:
            request, result = self.rng.choice(harvested)
            real = wire.open_result(result)
            job_id = real.job_id or wire.new_job_id()
            conflicting = wire.seal_result(
                self.identity, request_digest=real.request_digest, job_id=job_id, status="ok", value="0" * 24
            )
            evidence = make_evidence(
                "wrong",
                victim,
                sybil.public_key,
                job_id=job_id,
                capability=CAPABILITY,
                request=request,
                result=result,
                proof=[(request, conflicting)],
                detail="forged by the simulation",
            )
        else:
            kind = UNPROVEN[index % len(UNPROVEN)] if kind == "wrong" else kind
            evidence = make_evidence(
                kind, victim, sybil.public_key, job_id=wire.new_job_id(), capability=CAPABILITY, detail="forged"
            )
        await self._file(sybil, evidence, "badmouth")

    async def praise(self, index: int) -> None:
        sybil = Identity.generate()
        workers = [self.identity, *self.rng.sample(self.colluders, min(1, len(self.colluders)))]
        job_id, pairs = fabricate(sybil, workers, "f" * 24, index)
        (request, result), proof = pairs[0], pairs[1:]
        evidence = make_evidence(
            "agree" if proof else "success",
            self.identity.public_key,
            sybil.public_key,
            job_id=job_id,
            capability=CAPABILITY,
            latency_ms=1.0,
            request=request,
            result=result,
            proof=proof,
        )
        await self._file(sybil, evidence, "praise")

    async def _file(self, sybil: Identity, evidence: Evidence, what: str) -> None:
        frame = wire.seal_statement(wire.EVIDENCE_MAGIC, sybil, evidence)
        await self.js.publish(f"{EVIDENCE_SUBJECT}.{evidence.peer}", frame, headers={"Nats-Msg-Id": evidence.id})
        self.stats[f"{what}_filed"] += 1
