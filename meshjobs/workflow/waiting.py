"""Waiting for approvals: the ``approvals`` bucket, the poll, a worker's gate, a submitter's held result.

See :mod:`meshjobs.workflow.approval` for the model. Polling (0.1 s growing
to 1 s) rather than watching: peers' NATS grants allow KV gets and stream
message gets on this bucket, but no consumers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from meshjobs.envelope import Envelope, digest, now_ms, open_envelope, open_result
from meshjobs.errors import JobTimeout, KeyExists, MeshError, Reason, Rejected, UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.state import DOMAIN, MeshKV, open_bucket
from meshjobs.workflow.approval import (
    APPROVAL_TIMEOUT,
    BUCKET,
    MAX_REASON,
    NOT_APPROVED,
    SPEC,
    Approval,
    Decision,
    RecordState,
    Request,
    Stage,
    Verb,
    check_decision,
    decision_key,
    envelope_subject,
    parse_request,
    request_key,
    seal_decision,
)

if TYPE_CHECKING:
    from meshjobs.client import Outcome

log = logging.getLogger("meshjobs.approval")
POLL_FIRST_S = 0.1
POLL_MAX_S = 1.0


class ApprovalStore:
    """The ``approvals`` bucket: waiting records and signed decisions."""

    def __init__(self, nc: NATS, kv: MeshKV) -> None:
        self.kv = kv
        self._js = nc.jetstream(domain=DOMAIN, timeout=2.0)

    @classmethod
    async def open(cls, nc: NATS, *, timeout: float = 10.0) -> ApprovalStore:
        return cls(nc, await open_bucket(nc, SPEC, replicas=None, timeout=timeout))

    async def post(self, request: Request) -> None:
        await self.kv.put(request_key(request.subject_sha256), request.encode())

    async def request(self, subject: str) -> Request | None:
        entry = await self.kv.get(request_key(subject))
        return None if entry is None else parse_request(entry.value)

    async def decision(self, subject: str) -> bytes | None:
        entry = await self.kv.get(decision_key(subject))
        return entry.value if entry is not None and entry.value else None

    async def requests(self) -> list[Request]:
        """Every request record, oldest first.

        A scan with stream message gets (next by subject): peers may read but
        not create consumers on this bucket.
        """
        stream, wanted = f"KV_{BUCKET}", f"$KV.{BUCKET}.req.>"
        found: list[Request] = []
        seq = 1
        while True:
            try:
                msg = await self._js.get_msg(stream, seq=seq, subject=wanted, next=True)
            except nats.js.errors.NotFoundError:
                break
            seq = int(msg.seq or seq) + 1
            if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
                continue
            request = parse_request(msg.data or b"")
            key = (msg.subject or "").removeprefix(f"$KV.{BUCKET}.")
            if request is not None and request_key(request.subject_sha256) == key:  # filed under its own subject
                found.append(request)
        return sorted(found, key=lambda r: r.created_ms)

    async def settle(self, request: Request, state: RecordState, by: str | None, reason: str) -> None:
        """Mark a record decided or expired (best effort: it only tidies the listing)."""
        done = request.model_copy(update={"state": state, "decided_by": by, "reason": reason[:MAX_REASON]})
        try:
            await self.post(done)
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.debug("could not mark the approval request of job %s %s: %s", request.job_id, state, exc)

    async def decide(self, identity: Identity, request: Request, verb: Verb, reason: str = "") -> bytes:
        """Sign and store a decision on *request*; refuses a key that may not decide, and a second decision."""
        if identity.public_key not in request.approvers:
            raise Rejected(
                Reason.DENIED,
                f"this key {identity.public_key[:12]}… may not decide on job {request.job_id} "
                f"({request.capability}); its approvers: {', '.join(k[:12] + '…' for k in request.approvers)}",
            )
        if len(reason) > MAX_REASON:
            raise UsageError(f"the reason is {len(reason)} characters; at most {MAX_REASON} are kept")
        frame = seal_decision(identity, request, verb, reason)
        key = decision_key(request.subject_sha256)
        try:
            await self.kv.create(key, frame)
        except KeyExists:
            entry = await self.kv.get(key)
            previous = _valid(entry.value if entry else b"", request)
            if previous is not None:
                raise UsageError(
                    f"job {request.job_id} was already decided: {previous.decision} by {previous.approver[:12]}…"
                ) from None
            # Junk or a stranger's frame holds the key: a valid decision replaces it.
            if entry is None:
                await self.kv.create(key, frame)
            else:
                await self.kv.update(key, frame, entry.revision)
        state: RecordState = "approved" if verb == "approve" else "rejected"
        await self.settle(request, state, identity.public_key, reason)
        return frame

    async def find(self, job: str, stage: Stage | None = None, *, waiting_only: bool = True) -> Request:
        """The one record for job id (or subject prefix) *job*; a usage error when none or several match."""
        now = now_ms()
        matches = [
            r
            for r in await self.requests()
            if (r.job_id == job or (len(job) >= 8 and r.subject_sha256.startswith(job)))
            and (stage is None or r.stage == stage)
            and (not waiting_only or (r.state == "waiting" and r.deadline_ms > now))
        ]
        if not matches:
            what = "waiting for approval" if waiting_only else "with an approval request"
            raise UsageError(f"no job {job} {what} (see `meshjobs approvals`)")
        if len({r.subject_sha256 for r in matches}) > 1:
            subjects = ", ".join(f"{r.stage}:{r.subject_sha256[:12]}" for r in matches)
            raise UsageError(f"several requests match {job} ({subjects}); name one by --stage or its subject prefix")
        return matches[-1]


def _valid(frame: bytes, request: Request) -> Decision | None:
    try:
        return check_decision(
            frame,
            stage=request.stage,
            job_id=request.job_id,
            subject=request.subject_sha256,
            allowed=frozenset(request.approvers),
        )
    except Rejected:
        return None


# -- waiting -----------------------------------------------------------------------


class Verdict(NamedTuple):
    """How a wait ended: approved (with the decision frame), or refused with an error code and a sentence."""

    approved: bool
    code: str = ""
    message: str = ""
    frame: bytes | None = None


async def wait_for_decision(
    store: ApprovalStore, request: Request, allowed: frozenset[str], deadline_ms: int
) -> tuple[Decision, bytes] | None:
    """Poll for a valid decision on *request* until *deadline_ms*; None when none came.

    Invalid frames (bad signature, another job, a key that may not decide) are
    ignored, each logged once.
    """
    delay = POLL_FIRST_S
    ignored: set[str] = set()
    failing = False
    while True:
        try:
            frame = await store.decision(request.subject_sha256)
            failing = False
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            if not failing:
                log.warning("job %s: cannot read approval decisions yet: %s; retrying", request.job_id, exc)
            failing, frame = True, None
        if frame is not None and digest(frame) not in ignored:
            try:
                decision = check_decision(
                    frame, stage=request.stage, job_id=request.job_id, subject=request.subject_sha256, allowed=allowed
                )
                return decision, frame
            except Rejected as exc:
                ignored.add(digest(frame))
                log.warning("job %s: ignoring an approval decision: %s", request.job_id, exc)
        left = deadline_ms - now_ms()
        if left <= 0:
            return None
        await asyncio.sleep(min(delay, left / 1000))
        delay = min(delay * 2, POLL_MAX_S)


def _margin_ms(issued_at: int, expires_at: int) -> int:
    return min(3000, max(500, (expires_at - issued_at) // 10))


def verdict_of(decision: Decision, frame: bytes) -> Verdict:
    if decision.decision == "approve":
        return Verdict(True, frame=frame)
    reason = f": {decision.reason}" if decision.reason else ""
    return Verdict(False, NOT_APPROVED, f"rejected by approver {decision.approver}{reason}", frame)


class ApprovalGate:
    """A worker's side of approval gates: post the request, wait for a valid decision, say how it went.

    *connection* returns the worker's NATS connection (None before it has
    one); the bucket is opened on first use and the store kept.
    """

    def __init__(self, connection: Callable[[], NATS | None], *, worker: str, operators: frozenset[str]) -> None:
        self.connection = connection
        self.worker = worker
        self.operators = operators
        self._store: ApprovalStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> ApprovalStore:
        async with self._opening:
            if self._store is None:
                nc = self.connection()
                if nc is None:
                    raise UsageError("the worker is not connected yet")
                self._store = await ApprovalStore.open(nc)
            return self._store

    async def wait(self, capability: str, approval: Approval, envelope: Envelope) -> Verdict:
        """Hold *envelope*'s job until a valid decision or the deadline. Never raises but on cancellation."""
        allowed = approval.keys(self.operators)
        if not allowed:
            message = f"{capability} requires approval by an operator, and this worker's trust policy names none"
            return Verdict(False, NOT_APPROVED, message)
        deadline = envelope.expires_at - _margin_ms(envelope.issued_at, envelope.expires_at)
        subject = envelope_subject(envelope)
        request = Request(
            stage="run",
            job_id=envelope.job_id,
            subject_sha256=subject,
            capability=capability,
            submitter=envelope.submitter,
            args=envelope.args,
            expires_at=envelope.expires_at,
            waiting=self.worker,
            approvers=tuple(sorted(allowed)),
            deadline_ms=deadline,
            created_ms=now_ms(),
        )
        store = await self._post(request, deadline)
        if store is None:
            return Verdict(False, APPROVAL_TIMEOUT, "approval did not come before the deadline (approvals unreachable)")
        log.info("job %s %s waits for approval (%d approver key(s))", envelope.job_id, capability, len(allowed))
        found = await wait_for_decision(store, request, allowed, deadline)
        if found is None:
            await store.settle(request, "expired", None, "")
            waited = (now_ms() - request.created_ms) / 1000
            message = f"approval did not come before the deadline (job {envelope.job_id} waited {waited:.3g} s)"
            return Verdict(False, APPROVAL_TIMEOUT, message)
        decision, frame = found
        state: RecordState = "approved" if decision.decision == "approve" else "rejected"
        await store.settle(request, state, decision.approver, decision.reason)
        log.info("job %s %s: %s by %s", envelope.job_id, capability, state, decision.approver)
        return verdict_of(decision, frame)

    async def _post(self, request: Request, deadline_ms: int) -> ApprovalStore | None:
        """Post the waiting record (unless the job was decided already), retrying until the deadline."""
        delay, warned = POLL_FIRST_S, False
        while True:
            try:
                store = await self.store()
                if await store.decision(request.subject_sha256) is None:
                    await store.post(request)  # a redelivered job's record is simply written again
                return store
            except (MeshError, nats.errors.Error, TimeoutError) as exc:
                if not warned:
                    log.warning("job %s: cannot post its approval request yet: %s; retrying", request.job_id, exc)
                    warned = True
            left = deadline_ms - now_ms()
            if left <= 0:
                return None
            await asyncio.sleep(min(delay, left / 1000))
            delay = min(delay * 2, POLL_MAX_S)


# -- a submitter holding a result ----------------------------------------------------


@dataclass(frozen=True)
class Decided:
    """A valid decision and its signed frame."""

    decision: Decision
    frame: bytes


async def hold_result(
    nc: NATS,
    result_frame: bytes,
    *,
    capability: str,
    submitter: str,
    approvers: Iterable[str],
    timeout: float,
    args: dict[str, Any] | None = None,
) -> Decided:
    """Hold a verified result until one of *approvers* approves it (stage ``result``).

    Posts a waiting record with the value and the signed result frame, then
    waits up to *timeout* seconds. Returns the approval; raises
    :class:`Rejected` (``not_approved``) when rejected and :class:`JobTimeout`
    when nobody decided in time.
    """
    allowed = frozenset(approvers)
    bad = [k for k in allowed if not is_public_key(k)]
    if not allowed or bad:
        raise UsageError(f"approving a result needs approver keys (U...){f', not {bad[0][:60]!r}' if bad else ''}")
    if not timeout > 0:
        raise UsageError("the approval timeout must be positive")
    result = open_result(result_frame)
    if result.job_id is None:
        raise UsageError("only a job's result can be held for approval")
    created = now_ms()
    deadline = created + int(timeout * 1000)
    request = Request(
        stage="result",
        job_id=result.job_id,
        subject_sha256=digest(result_frame),
        capability=capability,
        submitter=submitter,
        args=args,
        expires_at=deadline,
        waiting=submitter,
        approvers=tuple(sorted(allowed)),
        deadline_ms=deadline,
        created_ms=created,
        value=result.value,
        result=result_frame.decode("utf-8"),
    )
    store = await ApprovalStore.open(nc)
    await store.post(request)
    found = await wait_for_decision(store, request, allowed, deadline)
    if found is None:
        await store.settle(request, "expired", None, "")
        raise JobTimeout(f"the result of job {request.job_id} was not approved within {timeout:g} s")
    decision, frame = found
    state: RecordState = "approved" if decision.decision == "approve" else "rejected"
    await store.settle(request, state, decision.approver, decision.reason)
    verdict = verdict_of(decision, frame)
    if not verdict.approved:
        raise Rejected(NOT_APPROVED, f"the result of job {request.job_id} was {verdict.message}")
    return Decided(decision, frame)


async def hold_outcome(
    nc: NATS, outcome: Outcome, *, submitter: str, approvers: Iterable[str], timeout: float
) -> Decided:
    """:func:`hold_result` for a verified :class:`~meshjobs.client.Outcome` (its arguments shown when it has them)."""
    args = open_envelope(outcome.request).args if outcome.request else None
    return await hold_result(
        nc,
        outcome.frame,
        capability=outcome.capability,
        submitter=submitter,
        approvers=approvers,
        timeout=timeout,
        args=args,
    )
