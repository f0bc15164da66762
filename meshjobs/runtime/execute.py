"""Bind, time-limit, run and seal one job: the part both runners share.

The live worker (:mod:`meshjobs.runtime.worker`) and the durable runner
(:mod:`meshjobs.runtime.durable_runner`) receive jobs differently, but run
them and sign what happened the same way, here. A capability with an
approval gate waits here for a signed approval first
(:mod:`meshjobs.workflow.approval`), without holding a concurrency slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from meshjobs.envelope import Envelope, now_ms, seal_result
from meshjobs.errors import InvalidArguments, Reason
from meshjobs.identity import Identity
from meshjobs.runtime.app import Capability, JobContext
from meshjobs.workflow.approval import NOT_APPROVED
from meshjobs.workflow.waiting import ApprovalGate

log = logging.getLogger("meshjobs.worker")


class Execution(NamedTuple):
    """What running a job came to: a result status, its value, (code, message) on failure, and provenance.

    ``provenance`` (a :class:`~meshjobs.envelope.Provenance` as a dict) goes
    into the signed result: the approval a gated job ran (or was refused) on.
    """

    status: str
    value: Any = None
    error: tuple[str, str] | None = None
    provenance: dict[str, Any] | None = None


RUNNING = Execution("running")


async def execute(
    cap: Capability,
    envelope: Envelope,
    peer: str,
    *,
    gate: ApprovalGate | None = None,
    slots: asyncio.Semaphore | None = None,
) -> Execution:
    """Run *cap* on *envelope*'s arguments within its timeout and the envelope's expiry.

    A gated capability first waits through *gate* for a signed approval (none
    given: it is refused, never run unapproved). The handler then runs in one
    of *slots*, taken only after the approval, so waiting jobs hold no slot.
    """
    provenance: dict[str, Any] | None = None
    if cap.approval is not None:
        if gate is None:
            return Execution("rejected", None, (NOT_APPROVED, f"{cap.name} needs approval, which this runner lacks"))
        verdict = await gate.wait(cap.name, cap.approval, envelope)
        provenance = {"approval": verdict.frame.decode("utf-8")} if verdict.frame else None
        if not verdict.approved:
            return Execution("rejected", None, (verdict.code, verdict.message), provenance)
    if slots is None:
        return await _run(cap, envelope, peer, provenance)
    async with slots:
        return await _run(cap, envelope, peer, provenance)


async def _run(cap: Capability, envelope: Envelope, peer: str, provenance: dict[str, Any] | None) -> Execution:
    left = (envelope.expires_at - now_ms()) / 1000
    if left <= 0:
        return Execution(
            "rejected", None, (Reason.EXPIRED.value, "the job expired while waiting for a free slot"), provenance
        )
    limit = min(cap.timeout, left)
    context = JobContext(envelope.job_id, cap.name, envelope.submitter, peer, envelope.expires_at)
    try:
        kwargs = cap.bind(envelope.args)
        # asyncio.timeout, unlike wait_for, runs the handler in this task:
        # one task hop less per job, which shows at one job in flight.
        async with asyncio.timeout(limit):
            value = await cap.call(kwargs, context)
    except InvalidArguments as exc:
        return Execution("invalid", None, ("invalid_args", exc.message), provenance)
    except TimeoutError:
        log.info("job %s %s timed out after %.3g s", envelope.job_id, cap.name, limit)
        return Execution("timeout", None, ("timeout", f"{cap.name} did not finish within {limit:.3g} s"), provenance)
    except Exception as exc:  # noqa: BLE001 - a failing handler is reported, never fatal
        log.info("job %s %s failed: %s: %s", envelope.job_id, cap.name, type(exc).__name__, exc)
        return Execution("error", None, (type(exc).__name__, str(exc) or type(exc).__name__), provenance)
    return Execution("ok", value, None, provenance)


def seal(identity: Identity, job_id: str | None, request_digest: str, execution: Execution) -> bytes:
    """Sign *execution* as the result of the request with *request_digest*."""
    status, value, error, provenance = execution
    try:
        return seal_result(
            identity,
            request_digest=request_digest,
            job_id=job_id,
            status=status,
            value=value,
            error=error,
            provenance=provenance,
        )
    except ValueError as exc:
        error = ("ResultError", f"the handler returned a value that cannot be sent: {exc}")
        return seal_result(
            identity, request_digest=request_digest, job_id=job_id, status="error", error=error, provenance=provenance
        )
