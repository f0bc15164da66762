"""The approval model, pure: gate options, signed decisions (tampering refused), execute() with a gate."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from meshjobs.envelope import (
    APPROVAL_MAGIC,
    HEADER_LEN,
    RESULT_MAGIC,
    digest,
    open_envelope,
    open_result,
    open_statement,
    seal_envelope,
    seal_result,
    seal_statement,
)
from meshjobs.errors import Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.runtime.app import App
from meshjobs.runtime.execute import execute, seal
from meshjobs.workflow.approval import (
    APPROVAL_TIMEOUT,
    NOT_APPROVED,
    Approval,
    Decision,
    Request,
    check_decision,
    check_provenance,
    envelope_subject,
    open_decision,
    run_subject,
    seal_decision,
)
from meshjobs.workflow.waiting import Verdict

SUBMITTER, APPROVER, STRANGER, WORKER = (Identity.generate() for _ in range(4))


def request_for(envelope_frame: bytes, approvers: tuple[str, ...] = (APPROVER.public_key,)) -> Request:
    envelope = open_envelope(envelope_frame)
    return Request(
        stage="run",
        job_id=envelope.job_id,
        subject_sha256=envelope_subject(envelope),
        capability=envelope.capability,
        submitter=envelope.submitter,
        args=envelope.args,
        expires_at=envelope.expires_at,
        waiting=WORKER.public_key,
        approvers=approvers,
        deadline_ms=envelope.expires_at,
        created_ms=envelope.issued_at,
    )


def envelope(args: dict[str, Any] | None = None, job_id: str = "job-approve-0001") -> bytes:
    _, frame = seal_envelope(
        SUBMITTER, "pay.send", args or {"cents": 5}, audience="mesh.cmd.pay.send", job_id=job_id, ttl_ms=60_000
    )
    return frame


# -- options ---------------------------------------------------------------------


def test_approval_options() -> None:
    gate = Approval(approvers=(APPROVER.public_key, APPROVER.public_key))
    assert gate.approvers == (APPROVER.public_key,)
    assert gate.keys(frozenset({STRANGER.public_key})) == {APPROVER.public_key}
    assert Approval(operators=True).keys(frozenset({STRANGER.public_key})) == {STRANGER.public_key}
    with pytest.raises(UsageError, match="needs approvers"):
        Approval()
    with pytest.raises(UsageError, match="not a user public key"):
        Approval(approvers=("Ubogus",))
    with pytest.raises(UsageError, match="not one string"):
        Approval(approvers=APPROVER.public_key)  # type: ignore[arg-type]


def test_app_capability_takes_approval_options() -> None:
    app = App("gates")

    @app.capability("a.one", approval=True)
    def one() -> int:
        return 1

    @app.capability("a.two", approvers=[APPROVER.public_key])
    def two() -> int:
        return 2

    @app.capability("a.three")
    def three() -> int:
        return 3

    assert app.capabilities["a.one"].approval == Approval(operators=True)
    assert app.capabilities["a.two"].approval == Approval(approvers=(APPROVER.public_key,))
    assert app.capabilities["a.three"].approval is None
    with pytest.raises(UsageError, match="capability 'a.four': give approval= or approvers="):
        app.capability("a.four", approval=True, approvers=[APPROVER.public_key])


# -- signed decisions --------------------------------------------------------------


def test_a_decision_round_trips_and_binds_job_and_request() -> None:
    request = request_for(envelope())
    frame = seal_decision(APPROVER, request, "approve", "looks fine")
    decision = check_decision(
        frame, stage="run", job_id=request.job_id, subject=request.subject_sha256, allowed=frozenset(request.approvers)
    )
    assert (decision.decision, decision.reason, decision.approver) == ("approve", "looks fine", APPROVER.public_key)
    other = request_for(envelope(job_id="job-approve-0002"))
    with pytest.raises(Rejected) as exc:
        check_decision(frame, stage="run", job_id=other.job_id, subject=other.subject_sha256, allowed=None)
    assert exc.value.reason == Reason.RESULT_MISMATCH
    with pytest.raises(Rejected):  # the same job, other arguments: another subject
        check_decision(frame, stage="run", job_id=request.job_id, subject="0" * 64, allowed=None)
    with pytest.raises(Rejected):  # a run approval is no result approval
        check_decision(frame, stage="result", job_id=request.job_id, subject=request.subject_sha256, allowed=None)


def test_a_decision_by_a_key_that_may_not_decide_is_refused() -> None:
    request = request_for(envelope(), approvers=(STRANGER.public_key, APPROVER.public_key))
    frame = seal_decision(STRANGER, request, "approve")
    with pytest.raises(Rejected) as exc:
        check_decision(
            frame,
            stage="run",
            job_id=request.job_id,
            subject=request.subject_sha256,
            allowed=frozenset({APPROVER.public_key}),
        )
    assert exc.value.reason == Reason.DENIED


def test_tampered_decisions_are_refused() -> None:
    request = request_for(envelope())
    frame = seal_decision(APPROVER, request, "reject", "no")
    flipped = frame.replace(b'"decision":"reject"', b'"decision":"approve"')
    assert flipped != frame
    with pytest.raises(Rejected) as exc:
        open_decision(flipped)
    assert exc.value.reason == Reason.BAD_SIGNATURE
    # The header names another key (the body still says the approver): signature fails first.
    swapped = frame[:5] + STRANGER.public_key.encode() + frame[5 + 56 :]
    with pytest.raises(Rejected) as exc:
        open_decision(swapped)
    assert exc.value.reason == Reason.BAD_SIGNATURE
    # A stranger re-signs the approver's body: the signer is not the approver the body names.
    body = frame[HEADER_LEN:]
    sig = base64.urlsafe_b64encode(STRANGER.sign(b"meshjobs/1 approval\x00" + body)).rstrip(b"=")
    resigned = b"MJ1A " + STRANGER.public_key.encode() + b" " + sig + b"\n" + body
    with pytest.raises(Rejected) as exc:
        open_decision(resigned)
    assert exc.value.reason == Reason.KEY_MISMATCH
    # Unknown fields are refused even when correctly signed.

    class Padded(Decision):
        extra: int

    padded = Padded(**open_decision(frame).model_dump(), extra=1)
    with pytest.raises(Rejected) as exc:
        open_decision(seal_statement(APPROVAL_MAGIC, APPROVER, padded))
    assert exc.value.reason == Reason.SCHEMA


def test_signatures_never_cross_kinds() -> None:
    """A result's signature cannot pass as a decision's, nor the other way round (domain separation)."""
    request = request_for(envelope())
    frame = seal_decision(APPROVER, request, "approve")
    as_result = b"MJ1R" + frame[4:]
    with pytest.raises(Rejected) as exc:
        open_result(as_result)
    assert exc.value.reason == Reason.BAD_SIGNATURE
    result = seal_result(APPROVER, request_digest="0" * 64, job_id=request.job_id, status="ok", value=1)
    with pytest.raises(Rejected):
        open_decision(b"MJ1A" + result[4:])
    with pytest.raises(Rejected):
        open_statement(RESULT_MAGIC, Decision, "approver", frame)


def test_an_inconsistent_record_is_not_signed() -> None:
    """The approver signs the subject recomputed from what the record shows, never the record's own claim."""
    request = request_for(envelope())
    forged = request.model_copy(update={"args": {"cents": 5_000_000}})
    with pytest.raises(Rejected, match="does not match"):
        seal_decision(APPROVER, forged, "approve")


def test_the_run_subject_binds_every_field() -> None:
    base = ("job-approve-0001", "pay.send", SUBMITTER.public_key, {"cents": 5}, 1000)
    subject = run_subject(*base)
    assert run_subject("job-approve-0001", "pay.send", SUBMITTER.public_key, {"cents": 5}, 1000) == subject
    for i, other in enumerate(("job-approve-0002", "pay.other", STRANGER.public_key, {"cents": 6}, 1001)):
        changed = list(base)
        changed[i] = other
        assert run_subject(*changed) != subject  # type: ignore[arg-type]


def test_results_without_provenance_keep_their_bytes() -> None:
    frame = seal_result(WORKER, request_digest="0" * 64, job_id="job-approve-0001", status="ok", value=1)
    assert b"provenance" not in frame
    assert open_result(frame).provenance is None


# -- execute() with a gate -----------------------------------------------------------


class FakeGate:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.asked: list[str] = []

    async def wait(self, capability: str, approval: Approval, envelope: Any) -> Verdict:
        self.asked.append(envelope.job_id)
        return self.verdict


def gated_app(runs: list[int]) -> App:
    app = App("gated")

    @app.capability("pay.send", approvers=[APPROVER.public_key])
    def send(cents: int) -> str:
        runs.append(cents)
        return f"sent {cents}"

    return app


async def test_a_gated_capability_without_a_gate_never_runs() -> None:
    runs: list[int] = []
    cap = gated_app(runs).capabilities["pay.send"]
    execution = await execute(cap, open_envelope(envelope()), WORKER.public_key)
    assert execution.status == "rejected" and execution.error is not None
    assert execution.error[0] == NOT_APPROVED
    assert runs == []


async def test_an_approved_job_runs_and_its_result_carries_the_approval() -> None:
    runs: list[int] = []
    cap = gated_app(runs).capabilities["pay.send"]
    frame = envelope()
    decision = seal_decision(APPROVER, request_for(frame), "approve")
    gate = FakeGate(Verdict(True, frame=decision))
    execution = await execute(cap, open_envelope(frame), WORKER.public_key, gate=gate)  # type: ignore[arg-type]
    assert (execution.status, execution.value, runs) == ("ok", "sent 5", [5])
    result_frame = seal(WORKER, "job-approve-0001", digest(frame), execution)
    result = open_result(result_frame)
    assert result.provenance is not None and result.provenance.approval == decision.decode()
    checked = check_provenance(result_frame, open_envelope(frame))
    assert checked is not None and checked.approver == APPROVER.public_key
    # Provenance cannot be moved to another job's result.
    other = envelope({"cents": 500})
    with pytest.raises(Rejected):
        check_provenance(result_frame, open_envelope(other))


async def test_refusals_never_run_the_handler() -> None:
    runs: list[int] = []
    cap = gated_app(runs).capabilities["pay.send"]
    frame = envelope()
    decision = seal_decision(APPROVER, request_for(frame), "reject", "over budget")
    for verdict in (
        Verdict(False, NOT_APPROVED, f"rejected by approver {APPROVER.public_key}: over budget", decision),
        Verdict(False, APPROVAL_TIMEOUT, "approval did not come before the deadline"),
    ):
        gate = FakeGate(verdict)
        execution = await execute(cap, open_envelope(frame), WORKER.public_key, gate=gate)  # type: ignore[arg-type]
        assert execution.status == "rejected"
        assert execution.error == (verdict.code, verdict.message)
    assert runs == []
