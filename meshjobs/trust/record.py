"""A peer's record, as the trust service signs it, and what its score means. Pure: no network.

The trust service folds each verified piece of evidence (see
:mod:`meshjobs.trust.evidence`) into the peer's :class:`Record` and signs it
(an ``MJ1T`` frame); readers accept only records signed by a trust service
they list.

**Score.** ``good`` and ``bad`` are weighted sums of evidence that decay with a
half-life of seven days (as of the evidence's arrival, so replaying the stream
gives the same record). :meth:`Record.score` is a *lower credible bound*: the
lower end of the 90% Wilson interval for the share of good outcomes. It grows
with the amount of evidence, so an unknown peer scores 0 (and never passes
``--min-trust 0.5``), one verified agreement about 0.27, three about 0.53, ten
0.79. :meth:`Record.mean` is the plain estimate, for display.

**Credibility** (:meth:`Record.credibility`) is the same bound counting as
good only what agreement with credible peers proved; it is what a peer weighs
in a vote, never as a submitter (see
:meth:`~meshjobs.trust.evidence.Standing.submitter`). Trust thus flows from
the anchors (operators, pre-trusted keys): unverified successes, and agreement
among peers nobody credible has checked, never make anyone credible.

**Submitters that are not anchors.** All evidence from submitters whose
standing is below :data:`MINOR_STANDING` (every key but the anchors) together
adds at most :data:`MINOR_CAP` good and :data:`MINOR_CAP` bad to a record
(decaying like the rest): keys cost nothing to make, so their number must not
matter. Twenty of them filing false reports move any score by less than 0.05.

**Automatic quarantine** is the ``quarantined`` flag, set by a proven wrong
result from a credible submitter (see :func:`~meshjobs.trust.evidence.assess`)
and lifted by an operator's signed ``release`` order newer than it.
Failures and timeouts lower the score but never quarantine: an honest flaky
peer is not a cheater.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from meshjobs.envelope import Wire, now_ms
from meshjobs.trust.evidence import WINDOW_MS, Evidence, Verdict

HALF_LIFE_S = 7 * 24 * 3600
#: One-sided 95% normal quantile: the lower end of a two-sided 90% interval.
Z = 1.6448536269514722
#: Below this standing a submitter is "minor": together, minor submitters' weight is capped per record.
MINOR_STANDING = 0.25
MINOR_CAP = 0.1
#: A latency average that follows recent jobs.
LATENCY_SMOOTHING = 0.2

_COUNTERS = {
    "success": "successes",
    "agree": "agreements",
    "failure": "failures",
    "timeout": "timeouts",
    "rejected": "rejected",
    "disputed": "failures",
}


def wilson_lower(good: float, bad: float, z: float = Z) -> float:
    """Lower bound of the Wilson score interval for good / (good + bad); 0 without evidence."""
    n = good + bad
    if n <= 0:
        return 0.0
    p = good / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def decay(value: float, since_ms: int, now: int) -> float:
    if not since_ms or now <= since_ms:
        return value
    return value * math.pow(0.5, (now - since_ms) / 1000 / HALF_LIFE_S)


class Record(Wire):
    """A peer's aggregate as the trust service signs it (``service`` is the signer)."""

    version: Literal[1] = 1
    peer: str
    service: str = Field(default="", max_length=56)
    """The trust service that signed it; "" for a peer without a record."""
    seq: int = Field(default=0, ge=0)
    """Per peer, increasing: max(now in ms, previous seq + 1). Readers ignore a lower one."""
    good: float = Field(default=0.0, ge=0)
    bad: float = Field(default=0.0, ge=0)
    proven: float = Field(default=0.0, ge=0)
    """The part of ``good`` proved by agreement with credible peers (see :meth:`credibility`)."""
    minor_good: float = Field(default=0.0, ge=0)
    minor_bad: float = Field(default=0.0, ge=0)
    jobs: int = 0
    successes: int = 0
    agreements: int = 0
    verified: int = 0
    """Agreements with credible peers reported by credible submitters."""
    wrong: int = 0
    """Proven wrong results (outweighed, reported by credible submitters)."""
    disputes: int = 0
    """Wrong reports whose agreeing side did not outweigh the peer: not held against it."""
    failures: int = 0
    timeouts: int = 0
    rejected: int = 0
    latency_ms: float | None = None
    updated_ms: int = 0
    """When the latest evidence folded in arrived; decay runs from here."""
    evidence_seq: int = 0
    """The evidence stream's sequence of the latest evidence folded in (folding is applied once)."""
    anchor: bool = False
    """An operator or pre-trusted key of the service: its word weighs 1 (see :meth:`trust`)."""
    quarantined: bool = False
    quarantined_ms: int = 0
    reason: str = Field(default="", max_length=2000)

    def decayed(self, now: int | None = None) -> tuple[float, float]:
        now = now_ms() if now is None else now
        return decay(self.good, self.updated_ms, now), decay(self.bad, self.updated_ms, now)

    def score(self, now: int | None = None) -> float:
        """The lower credible bound of the share of good outcomes (see the module docstring)."""
        return wilson_lower(*self.decayed(now))

    def credibility(self, now: int | None = None) -> float:
        """The score counting only proven good: the peer's weight in a vote and a tie-break.

        Only agreement with credible peers (in the end, with anchors) is proven,
        so a collective that only vouches for itself stays at 0.
        """
        now = now_ms() if now is None else now
        return wilson_lower(decay(self.proven, self.updated_ms, now), decay(self.bad, self.updated_ms, now))

    def mean(self, now: int | None = None) -> float:
        """The plain estimate (good + 1) / (good + bad + 2), for display."""
        good, bad = self.decayed(now)
        return (good + 1) / (good + bad + 2)

    def trust(self, now: int | None = None) -> float:
        """The peer's weight in a vote, as the trust service counts it: 1 for an anchor, else its credibility."""
        return 1.0 if self.anchor else self.credibility(now)

    def auto_quarantined(self, now: int | None = None) -> bool:
        """Whether the trust service has quarantined the peer (until an operator releases it)."""
        return self.quarantined

    @property
    def counts(self) -> dict[str, int]:
        return {
            "success": self.successes,
            "agree": self.agreements,
            "verified": self.verified,
            "wrong": self.wrong,
            "disputed": self.disputes,
            "failure": self.failures,
            "timeout": self.timeouts,
            "rejected": self.rejected,
        }

    def fold(
        self,
        verdict: Verdict,
        evidence: Evidence,
        *,
        received_ms: int,
        stream_seq: int,
        already: tuple[float, float] = (0.0, 0.0),
        released_ms: int = 0,
    ) -> Record:
        """This record with one valid piece of evidence folded in, as of *received_ms*.

        *already* is the weight this submitter's earlier evidence about the
        same job was granted (only more counts); *released_ms* the seq of the
        latest release order for the peer (evidence older than it does not
        quarantine again).
        """
        good, bad = self.decayed(received_ms)
        proven = decay(self.proven, self.updated_ms, received_ms)
        minor_good = decay(self.minor_good, self.updated_ms, received_ms)
        minor_bad = decay(self.minor_bad, self.updated_ms, received_ms)
        add_good, add_bad = max(0.0, verdict.good - already[0]), max(0.0, verdict.bad - already[1])
        if verdict.standing < MINOR_STANDING:
            add_good, add_bad = (
                min(add_good, max(0.0, MINOR_CAP - minor_good)),
                min(add_bad, max(0.0, MINOR_CAP - minor_bad)),
            )
            minor_good, minor_bad = minor_good + add_good, minor_bad + add_bad
        changes: dict[str, Any] = {
            "good": good + add_good,
            "bad": bad + add_bad,
            "proven": proven + min(verdict.proven_good, add_good),
            "minor_good": minor_good,
            "minor_bad": minor_bad,
            "jobs": self.jobs + 1,
            "verified": self.verified + verdict.verified,
            "wrong": self.wrong + verdict.wrong,
            "updated_ms": max(self.updated_ms, received_ms),
            "evidence_seq": max(self.evidence_seq, stream_seq),
        }
        counter = _COUNTERS.get(verdict.kind)
        if counter:
            changes[counter] = getattr(self, counter) + 1
        if verdict.kind == "wrong" and not verdict.wrong and verdict.bad == 0:
            changes["disputes"] = self.disputes + 1
        if verdict.kind in ("success", "agree") and evidence.latency_ms is not None and evidence.latency_ms >= 0:
            latency = evidence.latency_ms
            changes["latency_ms"] = latency if self.latency_ms is None else _smooth(self.latency_ms, latency)
        if verdict.quarantine and received_ms > released_ms and not self.quarantined:
            changes.update(quarantined=True, quarantined_ms=received_ms, reason=_why(verdict, evidence))
        return self.model_copy(update=changes)

    def release(self, order_seq: int, operator: str, reason: str) -> Record | None:
        """This record released by an operator's order with *order_seq*, or None when it does not apply."""
        if not self.quarantined or order_seq <= self.quarantined_ms:
            return None
        text = f"released by operator {operator[:12]}… (order seq {order_seq})" + (f": {reason}" if reason else "")
        return self.model_copy(update={"quarantined": False, "reason": text[:2000]})

    def stamped(self, service: str, now: int | None = None) -> Record:
        """The record as *service* writes it next: its key and the next seq."""
        seq = max(now_ms() if now is None else now, self.seq + 1)
        return self.model_copy(update={"service": service, "seq": seq})

    def explain(self, now: int | None = None) -> str:
        good, bad = self.decayed(now)
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        text = (
            f"score {self.score(now):.3f} (lower end of the 90% interval; mean {self.mean(now):.3f}) "
            f"from good {good:.2f}, bad {bad:.2f} (weighted, half-life {HALF_LIFE_S // 86400} days), "
            f"after {counts or 'no evidence'}"
        )
        if self.anchor:
            text += "; a pre-trusted anchor (trust 1)"
        else:
            proven = decay(self.proven, self.updated_ms, now_ms() if now is None else now)
            text += f"; credibility {self.credibility(now):.3f} (proven good {proven:.2f})"
        if self.quarantined:
            text += f"; QUARANTINED automatically: {self.reason}"
        elif self.reason:
            text += f"; {self.reason}"
        return text


def _smooth(old: float, new: float) -> float:
    return (1 - LATENCY_SMOOTHING) * old + LATENCY_SMOOTHING * new


def _why(verdict: Verdict, evidence: Evidence) -> str:
    return (
        f"proven wrong result for job {evidence.job_id} ({evidence.capability}): {len(verdict.agreeing)} other "
        f"worker(s) with trust {verdict.side:.2f} outweighed the peer's {verdict.accused:.2f}; evidence "
        f"{evidence.id} by {evidence.submitter[:12]}…"
    )[:2000]


class ServiceState(Wire):
    """The trust service's own progress, kept (signed) next to the records under ``_service.<key>``."""

    version: Literal[1] = 1
    service: str
    seq: int = Field(default=0, ge=0)
    last_seq: int = Field(default=0, ge=0)
    """The evidence stream's sequence processed last."""
    updated_ms: int = 0
    """When that evidence arrived."""
    processed: int = 0
    invalid: int = 0


def state_key(service: str) -> str:
    return f"_service.{service}"


# -- remembering what was granted --------------------------------------------------------


@dataclass
class Ledger:
    """What each (peer, job, submitter) was granted already, while its evidence can still arrive.

    A submitter reporting the same kind twice counts once; a later report
    about the same job adds only what it weighs beyond the earlier one (an
    ``agree`` after a ``success``). An entry is forgotten once evidence about
    its job would be refused as stale anyway (:data:`~meshjobs.trust.evidence.WINDOW_MS`
    after the job began).
    """

    granted: dict[tuple[str, str, str], _Granted] = field(default_factory=dict)
    _expiry: list[tuple[int, tuple[str, str, str]]] = field(default_factory=list)

    @staticmethod
    def key(evidence: Evidence) -> tuple[str, str, str]:
        return evidence.peer, evidence.job_id, evidence.submitter

    def seen(self, evidence: Evidence) -> bool:
        entry = self.granted.get(self.key(evidence))
        return entry is not None and evidence.kind in entry.kinds

    def already(self, evidence: Evidence) -> tuple[float, float]:
        entry = self.granted.get(self.key(evidence))
        return (entry.good, entry.bad) if entry else (0.0, 0.0)

    def add(self, evidence: Evidence, verdict: Verdict) -> None:
        key = self.key(evidence)
        expires = verdict.observed_ms + WINDOW_MS
        entry = self.granted.get(key)
        if entry is None:
            entry = self.granted[key] = _Granted(expires_ms=expires)
            heapq.heappush(self._expiry, (expires, key))
        entry.good, entry.bad = max(entry.good, verdict.good), max(entry.bad, verdict.bad)
        entry.kinds.add(evidence.kind)
        entry.expires_ms = max(entry.expires_ms, expires)

    def prune(self, now: int) -> None:
        """Forget what evidence arriving at *now* could no longer repeat."""
        while self._expiry and self._expiry[0][0] < now:
            _, key = heapq.heappop(self._expiry)
            entry = self.granted.get(key)
            if entry is not None and entry.expires_ms >= now:
                heapq.heappush(self._expiry, (entry.expires_ms, key))  # a later piece extended it
            else:
                self.granted.pop(key, None)

    def __len__(self) -> int:
        return len(self.granted)


@dataclass
class _Granted:
    expires_ms: int
    good: float = 0.0
    bad: float = 0.0
    kinds: set[str] = field(default_factory=set)
