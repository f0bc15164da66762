"""Trust-routed execution: pick the most trusted capable peer, fall back, verify by redundancy.

Candidates come from discovery; they are filtered by the caller's constraints
(minimum trust, region, kind, one peer) and never include a quarantined peer
(by operator order or by its reputation), then ranked by score and by
latency, with ties shuffled so equal peers share the load. The job goes to the
chosen peer's direct subject; a failure, a timeout or a refusal moves it to
the next candidate within the deadline, with the same job id so no peer runs
it twice. Every outcome is reported as signed evidence and moves the peer's
reputation.

Verification (adaptive checks, or a quorum of several peers) runs on a
router: see :mod:`meshjobs.verify`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors

from meshjobs.client import Client, Outcome
from meshjobs.compare import Comparison
from meshjobs.discovery import PeerInfo
from meshjobs.envelope import new_job_id, now_ms
from meshjobs.errors import HandlerError, JobTimeout, MeshError, NoPeerError, Reason, Rejected, UsageError
from meshjobs.trust.evidence import value_digest
from meshjobs.trust.quarantine import QuarantineBoard
from meshjobs.trust.reputation import Evidence, Kind, Record, ReputationBook

DISCOVERY_TTL = 2.0
#: A peer stays a candidate this long after it last answered discovery: a busy worker may miss one
#: round's short window, and one that is really gone fails over to the next candidate anyway.
PEER_TTL = 10.0
#: Ranking weight = RANK_FLOOR + min(score, RANK_CAP): flat enough to spread work, steep enough to prefer the trusted.
RANK_FLOOR = 0.25
RANK_CAP = 0.5
log = logging.getLogger("meshjobs.router")


@dataclass(frozen=True)
class Constraints:
    """What a submitter demands of the peer that runs its job.

    ``region`` and ``kind`` are guarantees, so only an operator's attestation
    counts for them (see :mod:`meshjobs.manifest`): with ``region="eu"`` the
    job, its fallbacks and its verification never reach a peer that no
    operator placed in ``eu``. ``prefer_region`` is a preference: peers attested
    there are tried first, the others only when none of them answers.
    """

    min_trust: float | None = None
    region: str | None = None
    kind: str | None = None
    peer: str | None = None
    tags: tuple[str, ...] = ()
    """Every one of these must be among the tags the peer gives the capability."""
    prefer_region: str | None = None
    max_price: float | None = None
    """Only peers whose signed manifest asks at most this per job."""

    def admits(self, info: PeerInfo, record: Record) -> str | None:
        """Why *info* does not qualify, or None when it does."""
        if self.peer and info.peer != self.peer:
            return "not the requested peer"
        for field_name in ("region", "kind"):
            wanted = getattr(self, field_name)
            if not wanted:
                continue
            have = getattr(info, field_name) or "-"
            if have != wanted:
                return f"{field_name} {have} is not {wanted}"
            if not info.is_attested(field_name):
                return f"{field_name} {have} is only claimed; no operator attested it"
        if self.max_price is not None and info.price > self.max_price:
            return f"price {info.price:g} is above {self.max_price:g}"
        if self.min_trust is not None and record.score() < self.min_trust:
            return f"score {record.score():.2f} is below {self.min_trust:g}"
        return None

    @property
    def routed(self) -> bool:
        """Whether these constraints need a routed submission (a queue group cannot honour them)."""
        return bool(self.tags) or any(
            v is not None for v in (self.min_trust, self.region, self.kind, self.prefer_region, self.max_price)
        )


def attempt_budget(left: float, timeout: float, *, last: bool, expected: float = 0.0) -> float:
    """How long one peer may take: what is *left* for the *last* one, else a third of the timeout.

    So a peer that hangs (or answers only at the deadline) leaves time for at
    least two more: fallbacks, and the checks of a verified job. A job
    *expected* to take long (another peer took that many seconds) gets twice
    that and a second, if more.
    """
    return left if last else min(left, max(timeout / 3, 1.0 + 2 * expected))


@dataclass
class Attempt:
    """One step of a routed job, for ``--trace``."""

    peer: str
    outcome: str
    detail: str = ""
    ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "outcome": self.outcome, "detail": self.detail, "ms": round(self.ms, 3)}


@dataclass
class Candidate:
    info: PeerInfo
    record: Record
    anchor: bool = False
    """Pre-trusted in this submitter's policy: its word weighs fully, record or not (EigenTrust's anchor)."""
    witnessed: int = 0
    """Verified agreements this router settled itself (the signed record lags the evidence)."""

    @property
    def peer(self) -> str:
        return self.info.peer

    @property
    def expected(self) -> float:
        """Seconds its jobs took lately, by its signed record (0 when unknown): long jobs get the time they need."""
        return (self.record.latency_ms or 0.0) / 1000


@dataclass
class RoutedOutcome:
    outcome: Outcome
    trace: list[Attempt] = field(default_factory=list)
    agreeing: list[str] = field(default_factory=list)
    dissenting: list[str] = field(default_factory=list)


def result_digest(outcome: Outcome) -> str:
    """What redundant results are compared by: status and canonical value (the trust service's comparison)."""
    return value_digest(outcome.result)


class Router:
    """Routes jobs for one client; reports what every peer did."""

    def __init__(
        self, client: Client, book: ReputationBook, board: QuarantineBoard, anchors: frozenset[str] = frozenset()
    ) -> None:
        self.client = client
        #: Pre-trusted keys (``[[pretrusted]]`` in the policy): full weight in a vote from the start.
        self.anchors = anchors
        self.book = book
        self.board = board
        #: (peer, instance) -> (when it last answered discovery, what it said), within PEER_TTL.
        self._seen: dict[tuple[str, str], tuple[float, PeerInfo]] = {}
        self._asked_at = 0.0
        self._pending: list[Evidence] = []
        self._writer: asyncio.Task[None] | None = None
        #: Jobs this router has in flight per peer: the load part of the ranking.
        self.inflight: Counter[str] = Counter()
        #: Agreements with credible peers this router settled itself, per peer: they count before the
        #: trust service has folded the evidence into the peer's record (see :mod:`meshjobs.verify`).
        self.witnessed: Counter[str] = Counter()
        #: Peers this router proved wrong itself, and when (ms): it holds the signed proof, so it stops
        #: routing to them at once instead of when the trust service's quarantine reaches it.
        self.convicted: dict[str, int] = {}
        self.rng = random.Random()

    @classmethod
    async def open(
        cls,
        client: Client,
        operators: frozenset[str],
        trust_services: Iterable[str] = (),
        anchors: frozenset[str] = frozenset(),
    ) -> Router:
        """A router reading reputation signed by *trust_services* (none: this identity's own records).

        *anchors* are the policy's pre-trusted peers: they settle disagreements from the start.
        """
        book = await ReputationBook.open(client.nc, client.identity, trust_services=trust_services)
        await book.watch()
        board = await QuarantineBoard.open(client.nc, operators)
        return cls(client, book, board, anchors)

    async def flush(self) -> None:
        """Wait until every outcome reported so far is stored as evidence and in the record."""
        while self._writer is not None and not self._writer.done():
            await asyncio.gather(self._writer, return_exceptions=True)

    async def close(self) -> None:
        """Wait for evidence still being written, stop watching quarantine orders."""
        await self.flush()
        await self.board.close()
        await self.book.close()

    def rediscover(self) -> None:
        """Ask discovery again at the next routing decision (peers seen within PEER_TTL are kept)."""
        self._asked_at = 0.0

    async def _peers(self) -> list[PeerInfo]:
        now = time.monotonic()
        if now - self._asked_at > DISCOVERY_TTL or not self._seen:
            for info in await self.client.peers(timeout=0.5, operators=self.board.operators):
                self._seen[(info.peer, info.instance)] = (now, info)
            self._seen = {k: (t, i) for k, (t, i) in self._seen.items() if now - t <= PEER_TTL}
            self._asked_at = now
        return [info for _, info in self._seen.values()]

    async def candidates(
        self, capability: str, constraints: Constraints, *, deterministic: bool = False
    ) -> list[Candidate]:
        """Qualified peers for *capability*, best first."""
        infos: dict[str, PeerInfo] = {}
        for info in await self._peers():
            if capability in info.capabilities and info.peer:
                infos.setdefault(info.peer, info)
        records = await self.book.records(list(infos))
        wanted = constraints.peer
        if wanted and (why := self.refusal(wanted, records.get(wanted))):
            raise Rejected(Reason.QUARANTINED, f"peer {wanted[:12]}… {why}")
        found = []
        for peer, info in infos.items():
            record = records[peer]
            if self.refusal(peer, record):
                continue
            if deterministic and capability not in info.deterministic:
                continue
            if not set(constraints.tags) <= set(info.tags_of(capability)):
                continue
            if constraints.admits(info, record) is None:
                found.append(Candidate(info, record, peer in self.anchors, self.witnessed[peer]))
        ranked = self.rank(found)
        if constraints.prefer_region:
            # Stable: the ranking holds within each part; other regions are the emergency fallback.
            ranked.sort(key=lambda c: not (c.info.region == constraints.prefer_region and c.info.is_attested("region")))
        return ranked

    def refusal(self, peer: str, record: Record | None = None) -> str:
        """Why this router takes no result from *peer*, or "" when it does.

        An operator's quarantine order, the trust service's automatic
        quarantine (in *record*, else the watched copy), or a wrong result this
        router proved itself (see :meth:`convict`).
        """
        record = record if record is not None else self.book.cached(peer)
        if self.board.is_quarantined(peer) or (record is not None and record.auto_quarantined()):
            return "is quarantined"
        if self.is_convicted(peer):
            return "returned a result proven wrong to this submitter"
        return ""

    def refuse(self, worker: str, what: str) -> None:
        """Raise ``quarantined`` when this router takes no result from *worker* (see :meth:`refusal`)."""
        if why := self.refusal(worker):
            raise Rejected(Reason.QUARANTINED, f"{what}: the result comes from {worker[:12]}…, which {why}")

    def convict(self, peer: str) -> None:
        """Stop routing to *peer*: this router holds proof of a wrong result (until an operator releases it)."""
        self.convicted.setdefault(peer, now_ms())

    def is_convicted(self, peer: str) -> bool:
        """Whether this router proved *peer* wrong and no operator's release order is newer than that."""
        since = self.convicted.get(peer)
        if since is None:
            return False
        order = self.board.orders.get(peer)
        if order is not None and order.action == "release" and order.seq > since:
            del self.convicted[peer]
            return False
        return True

    def rank(self, found: list[Candidate]) -> list[Candidate]:
        """Best first, spread by score and load: a weighted random order, never a lock-in on one peer.

        Each peer's weight grows with its score (a lower credible bound) up to
        a cap, over one plus the jobs this router has in flight there; the
        order is a weighted sample without replacement (Efraimidis-Spirakis).
        The cap keeps the most trusted peers (pre-trusted anchors among them)
        from becoming the whole workforce: a newcomer still gets a fair share
        of work, and verification checks what it returns.
        """

        def key(c: Candidate) -> tuple[bool, float]:
            weight = (RANK_FLOOR + min(max(c.record.score(), 0.0), RANK_CAP)) / (1 + self.inflight[c.peer])
            # A peer that said it had no free slot goes after those that had one.
            return c.info.slots > 0 or not c.info.instance, float(self.rng.random() ** (1.0 / weight))

        return sorted(found, key=key, reverse=True)

    def report(
        self,
        kind: Kind,
        peer: str,
        outcome: Outcome | None,
        job_id: str,
        capability: str,
        *,
        proof: list[Outcome] | None = None,
        **kw: Any,
    ) -> None:
        """Queue evidence, with the signed request and result and any proof; published in the background.

        Batching keeps a burst of outcomes to one publish round (see :meth:`flush`).
        """
        self._pending.append(
            self.book.evidence_for(
                kind,
                peer,
                job_id=job_id,
                capability=capability,
                result=outcome.frame if outcome else None,
                request=outcome.request if outcome else None,
                proof=[(o.request, o.frame) for o in proof or []],
                latency_ms=outcome.elapsed * 1000 if outcome else None,
                **kw,
            )
        )
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def offers_deterministic(self, capability: str) -> bool:
        """Whether any discovered peer offers *capability* as deterministic (so results can be checked)."""
        return any(capability in info.deterministic for info in await self._peers())

    async def _write(self) -> None:
        while self._pending:
            await asyncio.sleep(0.02)  # let a burst of outcomes gather into one batch
            batch, self._pending = self._pending, []
            try:
                await self.book.store(batch)
            except (MeshError, nats.errors.Error) as exc:
                log.warning("could not store %d piece(s) of evidence: %s", len(batch), exc)

    async def attempt(
        self, peer: str, capability: str, args: dict[str, Any], job_id: str, budget: float, valid: float
    ) -> tuple[str, Outcome | None, MeshError | None]:
        """One candidate: (evidence kind or "" for none, outcome, error)."""
        self.inflight[peer] += 1
        try:
            return await self._attempt(peer, capability, args, job_id, budget, valid)
        finally:
            self.inflight[peer] -= 1
            if not self.inflight[peer]:
                del self.inflight[peer]

    async def _attempt(
        self, peer: str, capability: str, args: dict[str, Any], job_id: str, budget: float, valid: float
    ) -> tuple[str, Outcome | None, MeshError | None]:
        try:
            outcome = await self.client.submit(
                capability, args, peer=peer, job_id=job_id, timeout=budget, valid_for=valid, peer_wait=0.3
            )
        except HandlerError as exc:
            return "failure", exc.result, exc
        except JobTimeout as exc:
            return "timeout", None, exc
        except Rejected as exc:
            # A result that failed verification is the peer's doing; a refusal
            # by the peer (trust, policy, quarantine, overload) is not.
            own = exc.code in (Reason.BAD_SIGNATURE, Reason.RESULT_MISMATCH, Reason.KEY_MISMATCH)
            return ("rejected" if own else ""), exc.result, exc
        except NoPeerError as exc:
            return "", None, exc
        if why := self.refusal(outcome.worker):
            return "", None, Rejected(Reason.QUARANTINED, f"{peer[:12]}… {why} (found while it ran the job)")
        return "success", outcome, None

    async def submit(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        constraints: Constraints = Constraints(),  # noqa: B008 - frozen, shared safely
        timeout: float = 30.0,
        job_id: str | None = None,
    ) -> RoutedOutcome:
        """Run on the best qualified peer; fall back to the next ones within *timeout*."""
        job = JobRun.start(self, capability, args, job_id, timeout)
        candidates = await self.candidates(capability, constraints)
        if not candidates:
            raise NoPeerError(f"no capable peer: nobody offering {capability!r} meets the constraints")
        for index, candidate in enumerate(candidates):
            if job.left() <= 0:
                break
            budget = attempt_budget(job.left(), timeout, last=index == len(candidates) - 1, expected=candidate.expected)
            if (ran := await job.run(candidate, budget)) is not None:
                job.report("success", candidate.peer, ran[1])
                return RoutedOutcome(ran[1], job.trace, [candidate.peer])
        raise job.failure()


@dataclass
class JobRun:
    """One job's runs on one or more peers (fallbacks, checks, votes): what they share, and what they leave."""

    router: Router
    capability: str
    args: dict[str, Any]
    job_id: str
    timeout: float
    deadline: float
    trace: list[Attempt] = field(default_factory=list)
    errors: list[MeshError] = field(default_factory=list)
    absent: set[str] = field(default_factory=set)
    """Peers nobody was listening for (gone since discovery): they could not have checked anything."""
    comparison: Comparison = field(default_factory=Comparison)
    """How the job's results are compared (:mod:`meshjobs.compare`; exact by default); the evidence says so."""

    @classmethod
    def start(
        cls, router: Router, capability: str, args: dict[str, Any] | None, job_id: str | None, timeout: float
    ) -> JobRun:
        deadline = asyncio.get_running_loop().time() + timeout
        return cls(router, capability, args or {}, job_id or new_job_id(), timeout, deadline)

    def left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    async def run(self, candidate: Candidate, budget: float | None = None) -> tuple[Candidate, Outcome] | None:
        """One run on *candidate* (within *budget* seconds, if given); its outcome, or None (reported)."""
        left = self.left()
        if left <= 0:
            return None
        started = time.perf_counter()
        # Whole seconds of validity: how long the submitter took before sending (choosing a checker, say)
        # must not show in the request, or a peer could tell a checked job from an unchecked one.
        valid = float(math.ceil(left))
        budget = left if budget is None else min(budget, left)
        kind, outcome, error = await self.router.attempt(
            candidate.peer, self.capability, self.args, self.job_id, budget, valid
        )
        ms = (time.perf_counter() - started) * 1000
        self.trace.append(Attempt(candidate.peer, kind or "skipped", str(error or ""), ms))
        if isinstance(error, UsageError):
            raise error
        if error is not None:
            self.errors.append(error)
            if isinstance(error, NoPeerError):
                self.absent.add(candidate.peer)
        if kind and kind != "success":
            self.report(kind, candidate.peer, outcome, detail=str(error or ""))
            return None
        if outcome is None or error is not None:
            return None
        return candidate, outcome

    def failure(self) -> MeshError:
        """What to raise when no run gave a result: the last error (with the trace), or a timeout."""
        peers = {attempt.peer for attempt in self.trace}
        timeout = f"{self.capability}: no result within {self.timeout:g} s"
        if len(peers) > 1 and all(isinstance(e, JobTimeout) for e in self.errors):
            error: MeshError = JobTimeout(
                f"{timeout} from {len(peers)} peers, each given its share of the time (a third of it, or what its "
                "record says its jobs take; the last one all that was left): raise --timeout for long jobs"
            )
        else:
            error = self.errors[-1] if self.errors else JobTimeout(timeout)
        error.trace = self.trace
        return error

    def report(self, kind: str, peer: str, outcome: Outcome | None, **extra: Any) -> None:
        if not self.comparison.exact:
            extra["compare"] = self.comparison.spec
        self.router.report(kind, peer, outcome, self.job_id, self.capability, **extra)  # type: ignore[arg-type]
