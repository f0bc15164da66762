"""Evidence and its proof: what a submitter saw a peer do, checked offline. Pure: no network.

A piece of **evidence** is a statement signed by the submitter (an ``MJ1V``
frame) about one peer and one job. It embeds what proves it:

- ``request``: the submitter's signed envelope the result answers, as text;
- ``result``: the peer's own signed result for that request;
- ``proof``: for ``agree`` and ``wrong``, other workers' signed results for the
  same job (same job id, capability and arguments), each with the signed
  request it answers.

:func:`check_proof` verifies everything that can be verified without the
network: every embedded frame's signature; each result bound to its own
request by digest and job id; every request signed by the evidence's
submitter; the same job, capability and arguments throughout; the values equal
(``agree``) or the proof agreeing on one other value (``wrong``).

:func:`assess` then weighs the evidence (see :mod:`meshjobs.trust.record` for
the score): the weight of a piece scales with the **submitter's standing**
(anchors, that is operators, pre-trusted keys and the service itself, 1; any
other key :data:`FRESH_STANDING`, whatever its record as a worker: see
:meth:`Standing.submitter`), and a
``wrong`` report counts only when the agreeing side's combined trust (the sum
of their scores, an anchor counting 1) exceeds the accused's: a peer in a
minority is not punished unless it is outweighed.

Kinds, and what each needs: ``success`` (request and result, status ok),
``agree`` and ``wrong`` (that, plus proof), ``failure``, ``timeout`` and
``rejected`` (nothing: they cannot be proven, so they weigh little; frames they
embed are checked when both are there, but for ``rejected``, whose result did
not verify by definition). ``disputed`` is what older submitters sent for an
outvoted result without proof; it counts like a failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from meshjobs.compare import MAX_SPEC, valid_comparison
from meshjobs.compare import parse as parse_comparison
from meshjobs.envelope import (
    Envelope,
    Result,
    Wire,
    digest,
    now_ms,
    open_envelope,
    open_result,
    valid_key,
)
from meshjobs.errors import Rejected

Kind = Literal["success", "agree", "wrong", "failure", "timeout", "rejected", "disputed"]
KINDS: tuple[Kind, ...] = ("success", "agree", "wrong", "failure", "timeout", "rejected", "disputed")
#: Kinds that must embed the request and the peer's own signed result.
PROVEN_KINDS = frozenset({"success", "agree", "wrong"})
#: Kinds that must also embed other workers' results.
PROOF_KINDS = frozenset({"agree", "wrong"})

MAX_FRAME_TEXT = 256 * 1024
MAX_PROOF = 8
#: The embedded frames of one piece of evidence, together: it must fit one NATS message (1 MiB by default).
MAX_EVIDENCE_TEXT = 900 * 1024
#: What a piece of evidence weighs, by kind, before it is scaled by the submitter's standing.
SUCCESS_WEIGHT = 0.2  # the peer answered: nobody checked the value
AGREE_WEIGHT = 1.0  # the value matched credible peers' values for the same request
WRONG_WEIGHT = 5.0  # the value was outweighed by credible peers' one other value
FAILURE_WEIGHT = 1.0  # failure, timeout, rejected, disputed: unproven
#: The standing of a submitter that is not an anchor: 20 of them filing reports weigh 0.4 of one operator's.
FRESH_STANDING = 0.02
#: Submitters at least this trusted count towards ``verified`` and ``wrong`` and can quarantine: anchors.
CREDIBLE_STANDING = 0.5
#: An agreement is *verified* when the agreeing side's trust reaches this.
VERIFY_TRUST = 0.5
#: How long after its request (or, without one, its own date) evidence is still taken.
WINDOW_MS = 30 * 60 * 1000
SKEW_MS = 60 * 1000


class ProofItem(Wire):
    """Another worker's signed result for the same job, and the signed request it answers."""

    request: str = Field(max_length=MAX_FRAME_TEXT)
    result: str = Field(max_length=MAX_FRAME_TEXT)


class Evidence(Wire):
    """One signed observation by a submitter about a peer, with what proves it."""

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
    request: str | None = Field(None, max_length=MAX_FRAME_TEXT)
    result: str | None = Field(None, max_length=MAX_FRAME_TEXT)
    proof: list[ProofItem] = Field(default_factory=list, max_length=MAX_PROOF)
    compare: str | None = Field(None, max_length=MAX_SPEC)
    """How the submitter compared the results (:mod:`meshjobs.compare`; None: exact): the proof is checked by it."""

    _keys = field_validator("peer", "submitter")(valid_key)
    _compare = field_validator("compare")(valid_comparison)


def evidence_id(kind: str, peer: str, job_id: str, submitter: str) -> str:
    """One id per (kind, peer, job, submitter): reporting the same thing twice counts once."""
    return hashlib.sha256(f"{kind}\0{peer}\0{job_id}\0{submitter}".encode()).hexdigest()[:32]


def value_digest(result: Result) -> str:
    """What redundant results are compared by: status and canonical value.

    JSON has one kind of number, so ``5`` and ``5.0`` are the same value: two
    honest peers whose handlers differ only in that agree.
    """
    return hashlib.sha256(_canonical([result.status, result.value]).encode()).hexdigest()


def _text(frame: bytes | None) -> str | None:
    """A frame as evidence embeds it; None when absent or too large to embed (the proof then fails)."""
    if not frame or len(frame) > MAX_FRAME_TEXT:
        return None
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError:
        return None


def make_evidence(
    kind: Kind,
    peer: str,
    submitter: str,
    *,
    job_id: str,
    capability: str,
    latency_ms: float | None = None,
    detail: str = "",
    request: bytes | None = None,
    result: bytes | None = None,
    proof: Iterable[tuple[bytes, bytes]] = (),
    at_ms: int | None = None,
    compare: str | None = None,
) -> Evidence:
    """Evidence (not yet signed); *proof* is (request frame, result frame) pairs of other workers.

    Proof beyond :data:`MAX_PROOF` pairs, or beyond what fits in one message
    (:data:`MAX_EVIDENCE_TEXT`), is left out.
    """
    budget = MAX_EVIDENCE_TEXT - len(request or b"") - len(result or b"")
    items = []
    for req, res in list(proof)[:MAX_PROOF]:
        req_text, res_text = _text(req), _text(res)
        budget -= len(req or b"") + len(res or b"")
        if req_text is not None and res_text is not None and budget >= 0:
            items.append(ProofItem(request=req_text, result=res_text))
    return Evidence(
        version=1,
        id=evidence_id(kind, peer, job_id, submitter),
        kind=kind,
        peer=peer,
        submitter=submitter,
        job_id=job_id[:64],
        capability=capability[:128],
        at_ms=now_ms() if at_ms is None else at_ms,
        latency_ms=latency_ms,
        detail=detail[:1000],
        request=_text(request),
        result=_text(result),
        proof=items,
        compare=compare,
    )


# -- proof ---------------------------------------------------------------------------


def _bad(message: str) -> Rejected:
    return Rejected("invalid_evidence", message)


@dataclass(frozen=True)
class Proof:
    """What :func:`check_proof` established: the peer's answer and who else answered what."""

    request: Envelope | None = None
    result: Result | None = None
    others: tuple[str, ...] = ()
    """The other workers in the proof (distinct, never the peer)."""
    proven: bool = False
    """Request and result were embedded and checked out (for every kind)."""


def _bound(evidence: Evidence, request_text: str, result_text: str) -> tuple[Envelope, Result]:
    """Open a request and its result; check they belong together and to this evidence."""
    frame = request_text.encode("utf-8")
    try:
        request = open_envelope(frame)
        result = open_result(result_text.encode("utf-8"))
    except Rejected as exc:
        raise _bad(f"an embedded frame does not verify: {exc}") from None
    if request.submitter != evidence.submitter:
        raise _bad("an embedded request is not signed by the submitter of the evidence")
    if result.request_digest != digest(frame):
        raise _bad("an embedded result does not answer the request it comes with")
    if request.job_id != evidence.job_id or result.job_id != evidence.job_id:
        raise _bad("an embedded request or result is about another job")
    if request.capability != evidence.capability:
        raise _bad("an embedded request is for another capability")
    return request, result


def _canonical(value: Any) -> str:
    """Canonical JSON text: keys sorted, no spaces, integral numbers written as integers."""
    return json.dumps(_same_numbers(value), sort_keys=True, separators=(",", ":"))


def _same_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_same_numbers(v) for v in value]
    return value


def _others(evidence: Evidence, request: Envelope, result: Result) -> tuple[str, ...]:
    """Check the proof of an agree or wrong report; return the other workers."""
    if not evidence.proof:
        raise _bad(f"{evidence.kind} evidence must embed other workers' signed results for the job")
    args, comparison = _canonical(request.args), parse_comparison(evidence.compare)
    workers: list[str] = []
    values: list[Any] = []
    for item in evidence.proof:
        other_request, other = _bound(evidence, item.request, item.result)
        if _canonical(other_request.args) != args:
            raise _bad("a request in the proof has other arguments")
        if other.worker == evidence.peer or other.worker in workers:
            raise _bad("each result in the proof must come from another, distinct worker")
        if other.status != "ok":
            raise _bad(f"a result in the proof has status {other.status!r}, not ok")
        workers.append(other.worker)
        values.append(other.value)
    same = comparison.same
    if evidence.kind == "agree" and not all(same(result.value, v) for v in values):
        raise _bad("a result in the proof has another value: that is no agreement")
    if evidence.kind == "wrong" and (
        not all(same(values[0], v) for v in values) or any(same(result.value, v) for v in values)
    ):
        raise _bad("the results in the proof must agree on one value other than the peer's")
    return tuple(workers)


def check_proof(evidence: Evidence) -> Proof:
    """Verify what *evidence* embeds (its own signature was checked when it was opened).

    Raises :class:`~meshjobs.errors.Rejected` (``invalid_evidence``) with a
    sentence saying what does not hold.
    """
    kind = evidence.kind
    if kind not in PROOF_KINDS and evidence.proof:
        raise _bad(f"{kind} evidence carries no proof of other workers")
    if evidence.request is None or evidence.result is None:
        if kind in PROVEN_KINDS:
            raise _bad(f"{kind} evidence must embed the signed request and the peer's signed result")
        return Proof()
    if kind in ("rejected", "disputed"):
        return Proof()  # a rejected result did not verify, by definition: nothing to check
    request, result = _bound(evidence, evidence.request, evidence.result)
    if result.worker != evidence.peer:
        raise _bad("the embedded result is signed by another worker than the peer")
    if kind in PROVEN_KINDS and result.status != "ok":
        raise _bad(f"{kind} evidence needs a result with status ok, not {result.status!r}")
    others = _others(evidence, request, result) if kind in PROOF_KINDS else ()
    return Proof(request, result, others, proven=True)


def evidence_time(evidence: Evidence, proof: Proof) -> int:
    """When the observed job began: its signed request's date, else the evidence's own."""
    return proof.request.issued_at if proof.request is not None else evidence.at_ms


# -- weighing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """How much the keys a piece of evidence names are trusted, as of now.

    *anchors* are operators, pre-trusted keys and the service itself (trust 1);
    *credibility* gives any other key's credibility: the score of its record
    counting only agreements with credible peers (0 without one; see
    :meth:`~meshjobs.trust.record.Record.credibility`). Unverified successes
    never make a key credible, so peers that only vouch for each other stay
    at 0, however many they are: trust flows from the anchors.
    """

    anchors: frozenset[str]
    credibility: Callable[[str], float]

    def trust(self, key: str) -> float:
        """A worker's weight in a vote: 1 for an anchor, else its credibility."""
        return 1.0 if key in self.anchors else max(0.0, min(1.0, self.credibility(key)))

    def submitter(self, key: str) -> float:
        """How much a submitter's reports weigh: 1 for an anchor, else :data:`FRESH_STANDING`.

        A worker's credibility is its weight as a worker (in a vote, a
        tie-break), not as a witness: a worker reporting on other workers has a
        stake in what it reports. Were it otherwise, cheaters that first earned
        credibility by honest work could file evidence with their own keys
        whose proof fully verifies (one asks an honest peer, two sign another
        value for the same request) and quarantine honest peers, or report
        agreement among themselves and vouch each other's records up. So only
        anchors' reports count in full; everyone else's together add at most
        :data:`~meshjobs.trust.record.MINOR_CAP` to a record, as fresh keys'.
        """
        return 1.0 if key in self.anchors else FRESH_STANDING


@dataclass(frozen=True)
class Verdict:
    """What one piece of evidence does to its peer's record (or why it does nothing)."""

    kind: Kind
    standing: float = 0.0
    good: float = 0.0
    bad: float = 0.0
    proven_good: float = 0.0
    """The part of ``good`` that agreement with credible peers proved (what credibility counts)."""
    proof_checked: bool = False
    """Request and result were embedded and verified (every kind)."""
    agreeing: tuple[tuple[str, float], ...] = ()
    """The other workers in the proof, with their trust."""
    accused: float = 0.0
    """The peer's own trust (what the agreeing side must exceed for ``wrong``)."""
    verified: bool = False
    wrong: bool = False
    quarantine: bool = False
    observed_ms: int = 0
    """When the observed job began (its request's date): evidence older than :data:`WINDOW_MS` is stale."""
    problem: str = ""
    """Why the evidence is invalid (then nothing else counts)."""

    @property
    def valid(self) -> bool:
        return not self.problem

    @property
    def side(self) -> float:
        return sum(weight for _, weight in self.agreeing)

    def explain(self) -> str:
        """One line for operators: what the evidence proved and what it weighed."""
        if self.problem:
            return f"invalid: {self.problem}"
        text = f"standing {self.standing:.2f}, +{self.good:.3f} good, +{self.bad:.3f} bad"
        if self.kind == "wrong":
            verb = "outweighed" if self.side > self.accused else "did not outweigh"
            others = f"{len(self.agreeing)} other worker(s) with trust {self.side:.2f}"
            text += f"; {others} {verb} the peer's {self.accused:.2f}"
        elif self.kind == "agree":
            text += f"; agreed with {len(self.agreeing)} other worker(s) with trust {self.side:.2f}"
        if self.quarantine:
            text += "; quarantined"
        return text


def stale(evidence: Evidence, proof: Proof, received_ms: int) -> str:
    """Why evidence received (stored in the stream) at *received_ms* is out of date, or ""."""
    observed = evidence_time(evidence, proof)
    if observed < received_ms - WINDOW_MS:
        return f"stale: the job began {(received_ms - observed) // 1000} s before the evidence arrived"
    if max(observed, evidence.at_ms) > received_ms + SKEW_MS:
        return "dated in the future"
    return ""


def assess(evidence: Evidence, standing: Standing, received_ms: int | None = None) -> Verdict:
    """Check *evidence*'s proof and weigh it by who filed it and who agreed (see the module docstring).

    With *received_ms* (when the evidence stream stored it), evidence about a
    job older than :data:`WINDOW_MS` is refused as stale, so an old piece
    cannot be filed again once the service no longer remembers it.
    """
    try:
        proof = check_proof(evidence)
    except Rejected as exc:
        return Verdict(evidence.kind, problem=exc.message)
    observed = evidence_time(evidence, proof)
    if received_ms is not None and (problem := stale(evidence, proof, received_ms)):
        return Verdict(evidence.kind, observed_ms=observed, problem=problem)
    s = standing.submitter(evidence.submitter)
    credible = s >= CREDIBLE_STANDING
    agreeing = tuple((w, standing.trust(w)) for w in proof.others)
    side = sum(weight for _, weight in agreeing)
    base = Verdict(
        evidence.kind,
        s,
        proof_checked=proof.proven,
        agreeing=agreeing,
        accused=standing.trust(evidence.peer),
        observed_ms=observed,
    )
    kind = evidence.kind
    if kind == "success":
        return _replace(base, good=SUCCESS_WEIGHT * s)
    if kind == "agree":
        proven = s * (AGREE_WEIGHT - SUCCESS_WEIGHT) * min(1.0, side)
        verified = credible and side >= VERIFY_TRUST
        return _replace(base, good=s * SUCCESS_WEIGHT + proven, proven_good=proven, verified=verified)
    if kind == "wrong":
        if side <= base.accused:
            return base  # a minority is not punished unless the agreeing side outweighs it
        return _replace(base, bad=WRONG_WEIGHT * s, wrong=credible, quarantine=credible)
    return _replace(base, bad=FAILURE_WEIGHT * s)


def _replace(verdict: Verdict, **changes: Any) -> Verdict:
    return dataclasses.replace(verdict, **changes)
