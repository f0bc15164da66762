"""Approval gates: a job waits for a person's signed approval before any handler runs.

A capability registered with ``approval=`` (named approver keys, or any
operator of the worker's trust policy) is gated::

    @app.capability("payments.send", approval=Approval(approvers=("UAPPROVER...",), operators=True))
    async def send(to: str, cents: int) -> str: ...

When a gated job arrives, the worker posts a *request* record in the
``approvals`` bucket (key ``req.<subject>``: job id, capability, arguments,
submitter, worker, deadline, who may decide) and polls ``dec.<subject>``
until an approver's signed :class:`Decision` (an ``MJ1A`` frame, domain
``meshjobs/1 approval``) arrives or the deadline passes. ``subject`` is the
SHA-256 of what is decided: for a job (stage ``run``) the canonical JSON of
its job id, capability, submitter, arguments and expiry (so retries of one
submission share it, and a later submission with the same job id needs a new
approval); for a held result (stage ``result``) the signed result frame.

The waiting peer verifies every decision: signature, stage, job id, subject,
and that the signer may decide. Anything else is ignored (logged once) and
the wait goes on. The records are unsigned conveniences for approvers: the
approver's tool recomputes the subject from the fields it shows, so what is
signed is exactly what was seen, and a forged record can get nothing run.

Outcomes, as the signed result says them (``status: rejected`` for both
refusals, so a durable job is never retried or dead-lettered for them):

- approved: the handler runs; the decision frame is in the result's
  ``provenance.approval``;
- rejected: error code ``not_approved``, "rejected by approver U…: reason",
  the decision frame in the provenance too; the handler never ran;
- no decision in time: error code ``approval_timeout``, "approval did not
  come before the deadline". The wait ends a little before the envelope
  expires (10 % of its validity, 0.5 to 3 s), so a live submitter still hears
  the answer.

This module is the pure model (options, decisions, records, subjects; no
network); :mod:`meshjobs.workflow.waiting` holds the bucket, the wait and
the worker's gate. Nothing here imports the runtime.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshjobs.envelope import (
    APPROVAL_MAGIC,
    DIGEST_PATTERN,
    JOB_ID_PATTERN,
    Envelope,
    Wire,
    digest,
    loads_strict,
    now_ms,
    open_result,
    open_statement,
    seal_statement,
    valid_key,
)
from meshjobs.errors import Reason, Rejected, UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.state import BucketSpec

BUCKET = "approvals"
#: Longer than the longest durable envelope (7 days): a request outlives its job.
TTL_S = 8 * 86400.0
SPEC = BucketSpec(BUCKET, ttl_s=TTL_S)
STATE = (SPEC,)

#: Error codes of the signed result (``status: rejected``) of a gated job that did not run.
NOT_APPROVED = Reason.NOT_APPROVED.value
APPROVAL_TIMEOUT = Reason.APPROVAL_TIMEOUT.value
MAX_REASON = 1000

Stage = Literal["run", "result"]
Verb = Literal["approve", "reject"]
RecordState = Literal["waiting", "approved", "rejected", "expired"]


@dataclass(frozen=True)
class Approval:
    """Who may approve a gated capability: named keys, and/or any operator of the worker's trust policy."""

    approvers: tuple[str, ...] = ()
    operators: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.approvers, str):
            raise UsageError("approvers must be a list of keys, not one string")
        bad = [k for k in self.approvers if not is_public_key(k)]
        if bad:
            raise UsageError(f"approver {bad[0][:60]!r} is not a user public key (U...)")
        if not self.approvers and not self.operators:
            raise UsageError("an approval gate needs approvers, or operators=True")
        object.__setattr__(self, "approvers", tuple(sorted(set(self.approvers))))

    def keys(self, operators: frozenset[str]) -> frozenset[str]:
        """The keys that may decide, given the worker's operators."""
        return frozenset(self.approvers) | (operators if self.operators else frozenset())


def as_approval(approval: Approval | bool | None, approvers: Sequence[str] = ()) -> Approval | None:
    """``App.capability``'s options as one :class:`Approval` (``approval=True``: any operator)."""
    if approval is not None and approval is not False and approvers:
        raise UsageError("give approval= or approvers=, not both")
    if approvers:
        return Approval(approvers=tuple(approvers))
    if approval is True:
        return Approval(operators=True)
    if approval is None or approval is False:
        return None
    if not isinstance(approval, Approval):
        raise UsageError(f"approval must be an Approval, True or None, not {type(approval).__name__}")
    return approval


class Decision(Wire):
    """An approver's signed decision on one job (stage ``run``) or one result (stage ``result``)."""

    version: Literal[1]
    stage: Stage
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    subject_sha256: str = Field(pattern=DIGEST_PATTERN)
    decision: Verb
    reason: str = Field(max_length=MAX_REASON)
    approver: str
    at_ms: int = Field(ge=0)

    _approver = field_validator("approver")(valid_key)


class Request(BaseModel):
    """The waiting record an approver sees (unsigned: the decision binds what it shows, see the module doc)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    stage: Stage
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    subject_sha256: str = Field(pattern=DIGEST_PATTERN)
    capability: str = Field(max_length=256)
    submitter: str
    args: dict[str, Any] | None = None
    expires_at: int = Field(ge=0, description="the envelope's expiry (ms); part of a run subject")
    waiting: str
    """The peer that waits: the worker (stage run) or the submitter (stage result)."""
    approvers: tuple[str, ...]
    deadline_ms: int = Field(ge=0)
    created_ms: int = Field(ge=0)
    value: Any = None
    """Stage result: the value to review."""
    result: str | None = None
    """Stage result: the signed result frame, for the approver to verify."""
    state: RecordState = "waiting"
    decided_by: str | None = None
    reason: str = Field(default="", max_length=MAX_REASON)

    _keys = field_validator("submitter", "waiting")(valid_key)

    def expected_subject(self) -> str:
        """The subject recomputed from what this record shows (never its own claim)."""
        if self.stage == "run":
            return run_subject(self.job_id, self.capability, self.submitter, self.args or {}, self.expires_at)
        if self.result is None:
            return ""
        return digest(self.result.encode("utf-8"))

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def encode(self) -> bytes:
        """The record as stored in the bucket."""
        return _canonical(self.as_dict())


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def run_subject(job_id: str, capability: str, submitter: str, args: dict[str, Any], expires_at: int) -> str:
    """What an approval of a job binds: SHA-256 of its canonical job id, capability, submitter, args, expiry."""
    fields = {"job_id": job_id, "capability": capability, "submitter": submitter, "args": args}
    return hashlib.sha256(_canonical({**fields, "expires_at": expires_at})).hexdigest()


def envelope_subject(envelope: Envelope) -> str:
    return run_subject(envelope.job_id, envelope.capability, envelope.submitter, envelope.args, envelope.expires_at)


def seal_decision(identity: Identity, request: Request, verb: Verb, reason: str = "") -> bytes:
    """Sign *verb* on *request*, bound to the subject recomputed from the record's fields."""
    subject = request.expected_subject()
    if subject != request.subject_sha256:
        raise Rejected(Reason.RESULT_MISMATCH, "the waiting record does not match what it shows; not signing it")
    decision = Decision(
        version=1,
        stage=request.stage,
        job_id=request.job_id,
        subject_sha256=subject,
        decision=verb,
        reason=reason[:MAX_REASON],
        approver=identity.public_key,
        at_ms=now_ms(),
    )
    return seal_statement(APPROVAL_MAGIC, identity, decision)


def open_decision(frame: bytes | str) -> Decision:
    """Verify a decision frame's signature (by the approver it names) and decode it strictly."""
    data = frame.encode("utf-8") if isinstance(frame, str) else frame
    return open_statement(APPROVAL_MAGIC, Decision, "approver", data)


def check_decision(
    frame: bytes | str, *, stage: Stage, job_id: str, subject: str, allowed: frozenset[str] | None
) -> Decision:
    """A decision that is valid for exactly this stage, job and subject, by an allowed key (None: any).

    Raises :class:`Rejected` saying what is wrong with it.
    """
    decision = open_decision(frame)
    if decision.stage != stage or decision.job_id != job_id or decision.subject_sha256 != subject:
        raise Rejected(Reason.RESULT_MISMATCH, "the decision is for another job or request")
    if allowed is not None and decision.approver not in allowed:
        raise Rejected(Reason.DENIED, f"{decision.approver[:12]}… may not decide on job {job_id}")
    return decision


def check_provenance(result_frame: bytes, envelope: Envelope) -> Decision | None:
    """The approval a verified result carries for *envelope*, checked (signature, job, subject), or None.

    Who approved is the caller's to judge: ``decision.approver``.
    """
    result = open_result(result_frame)
    if result.provenance is None or result.provenance.approval is None:
        return None
    frame, subject = result.provenance.approval, envelope_subject(envelope)
    return check_decision(frame, stage="run", job_id=envelope.job_id, subject=subject, allowed=None)


def request_key(subject: str) -> str:
    return f"req.{subject}"


def decision_key(subject: str) -> str:
    return f"dec.{subject}"


def parse_request(data: bytes) -> Request | None:
    """A record from the bucket, or None for junk (peers write this bucket; nothing in it is trusted)."""
    try:
        return Request.model_validate(loads_strict(data))
    except (ValueError, ValidationError):
        return None
