"""Hybrid peers: an AI persona drafts, a person approves, edits or rejects; the result carries both signatures.

``meshjobs hybrid PERSONA_FILE`` serves a persona file's capabilities (kind
``hybrid``) through the human inbox. For each job the persona is asked first
(:class:`~meshjobs.peers.ai.PersonaPeer`, the same model call an AI peer
makes); its answer is signed by the *persona's own key* as a draft statement
(:data:`~meshjobs.envelope.DRAFT_MAGIC`, domain ``meshjobs/1 draft``: a draft
signature can never pass for a result or any other statement) and shown to
the person with the answer editor prefilled. Whatever the person sends is the
job's result, signed by the *person's key* as the worker, with the value::

    {"output":   <the final answer (None when rejected)>,
     "decision": "approved" | "edited" | "rejected" | "written",
     "changed":  <whether the output differs from the draft's (canonical JSON)>,
     "draft":    "<the persona-signed MJ1D frame>" | None}

``written``: the model failed (the person saw why) and the person answered
alone; ``draft`` is then None. A rejection is a failure for the submitter
(``Declined: declined: rejected the AI draft: <reason>``) whose signed result
still carries the value above, so the provenance of refusals is kept too.
:func:`check_hybrid` verifies all of it: both signatures, the draft's binding to
the job (job id, capability, submitter and a digest of the arguments) and
that ``decision``/``changed`` tell the truth about the two outputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from meshjobs.envelope import (
    DIGEST_PATTERN,
    DRAFT_MAGIC,
    JOB_ID_PATTERN,
    Result,
    Wire,
    now_ms,
    open_statement,
    seal_statement,
)
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import Identity
from meshjobs.runtime.app import JobContext

from .ai import PersonaPeer
from .human import Decision, Declined, HumanPeer, Inbox, Job, Score, Task, no_score, settle_decision, task_from_spec
from .persona import ModelError, Persona

Verdict = Literal["approved", "edited", "rejected", "written"]


class Draft(Wire):
    """An AI persona's draft answer to one job, signed by the persona's key."""

    version: Literal[1]
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    capability: str = Field(max_length=256)
    submitter: str = Field(max_length=56)
    args_sha256: str = Field(pattern=DIGEST_PATTERN)
    persona: str = Field(max_length=56)
    persona_name: str = Field(max_length=64)
    output: Any
    model: str = Field(max_length=256)
    prompt_sha256: str = Field(pattern=DIGEST_PATTERN)
    usage: dict[str, int | None]
    issued_at: int = Field(ge=0)


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: how outputs and arguments are compared and digested."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def args_digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(args).encode("utf-8")).hexdigest()


def seal_draft(persona: Identity, draft: Draft) -> bytes:
    return seal_statement(DRAFT_MAGIC, persona, draft)


def open_draft(frame: str | bytes) -> Draft:
    """Verify a draft frame's signature (by the persona key it names) and decode it strictly."""
    data = frame.encode("utf-8") if isinstance(frame, str) else frame
    return open_statement(DRAFT_MAGIC, Draft, "persona", data)


class HybridDrafter:
    """The :class:`~meshjobs.peers.human.Drafter` of a hybrid peer: the persona drafts, the person decides."""

    def __init__(self, persona: PersonaPeer, persona_key: Identity) -> None:
        self.persona = persona
        self.key = persona_key
        self._drafts: dict[str, tuple[Draft, str]] = {}

    async def prepare(self, job: Job, task: Task, context: JobContext) -> None:
        spec = task.spec
        if spec is None:  # every hybrid task comes from the persona file
            return
        try:
            record = await self.persona.run(spec, job.args, context)
        except ModelError as exc:
            job.note = f"no AI draft ({exc}); write the answer yourself"
            return
        draft = Draft(
            version=1,
            job_id=job.job_id,
            capability=job.capability,
            submitter=job.submitter,
            args_sha256=args_digest(job.args),
            persona=self.key.public_key,
            persona_name=self.persona.persona.name,
            output=record["output"],
            model=str(record["model"])[:256],
            prompt_sha256=record["prompt_sha256"],
            usage=record["usage"],
            issued_at=now_ms(),
        )
        self._drafts[job.job_id] = (draft, seal_draft(self.key, draft).decode("utf-8"))
        job.text = json.dumps(draft.output, indent=2, ensure_ascii=False)
        job.note = (
            f"AI draft by {draft.persona_name} ({draft.persona[:8]}…, model {draft.model}): "
            "send it as it is to approve, edit it, or decline to reject it"
        )

    def finish(self, job: Job, decision: Decision) -> Any:
        draft, frame = self._drafts.pop(job.job_id, (None, None))
        if decision.kind == "release":
            return settle_decision(decision)
        if decision.kind == "decline":
            job.failure_value = {"output": None, "decision": "rejected", "changed": False, "draft": frame}
            if draft is not None:
                raise Declined(f"declined: rejected the AI draft: {decision.reason}")
            return settle_decision(decision)
        changed = draft is None or canonical(decision.value) != canonical(draft.output)
        verdict: Verdict = "written" if draft is None else "edited" if changed else "approved"
        return {"output": decision.value, "decision": verdict, "changed": changed, "draft": frame}


def hybrid_peer(
    persona: Persona,
    api_key: str,
    persona_key: Identity,
    *,
    inbox: Inbox | None = None,
    live: bool = False,
    score: Score = no_score,
) -> tuple[HumanPeer, PersonaPeer]:
    """A hybrid peer for *persona*: its capabilities answered by a person, drafted by the model.

    Close the returned :class:`PersonaPeer` (``aclose``) when done.
    """
    model = PersonaPeer(persona, api_key)
    tasks = {spec.name: task_from_spec(spec) for spec in persona.capabilities}
    peer = HumanPeer(
        persona.name,
        tasks,
        kind="hybrid",
        description=persona.description or f"hybrid peer {persona.name}: AI drafts, a person decides",
        inbox=inbox,
        live=live,
        drafter=HybridDrafter(model, persona_key),
        score=score,
    )
    return peer, model


def check_hybrid(result: Result, args: dict[str, Any]) -> Draft | None:
    """Verify a hybrid result's value against the job's *args*; the persona's draft (None if there was none).

    *result* must already be verified (:func:`~meshjobs.envelope.open_result`:
    the person's signature). Raises :class:`~meshjobs.errors.Rejected`
    (``result_mismatch``) when the draft's signature, its binding to the job,
    or the ``decision``/``changed`` claims do not hold.
    """
    value = result.value
    if not isinstance(value, dict) or set(value) != {"output", "decision", "changed", "draft"}:
        raise Rejected(Reason.RESULT_MISMATCH, "not a hybrid result: expected output, decision, changed and draft")
    frame, verdict, changed = value["draft"], value["decision"], value["changed"]
    if frame is None:
        if verdict not in ("written", "rejected"):
            raise Rejected(Reason.RESULT_MISMATCH, f"decision {verdict!r} without an AI draft")
        return None
    if not isinstance(frame, str):
        raise Rejected(Reason.RESULT_MISMATCH, "the draft is not a signed frame")
    draft = open_draft(frame)
    if draft.job_id != result.job_id or draft.args_sha256 != args_digest(args):
        raise Rejected(Reason.RESULT_MISMATCH, "the AI draft belongs to another job")
    differs = canonical(value["output"]) != canonical(draft.output)
    expected = "rejected" if verdict == "rejected" else ("edited" if differs else "approved")
    if verdict != expected or changed is not (differs and verdict != "rejected"):
        raise Rejected(Reason.RESULT_MISMATCH, f"decision {verdict!r} / changed {changed!r} do not match the outputs")
    return draft
