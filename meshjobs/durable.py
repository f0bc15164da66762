"""Durable jobs on JetStream: none lost, none visibly run twice, poison jobs contained.

Interactive commands ride core request/reply; work that must not be lost goes
through the ``JOBS`` work-queue stream of the hub domain (subjects
``mesh.jobs.<capability>``, three replicas where the cluster has them). A full
queue refuses new jobs (discard-new) instead of dropping old ones.

Publishing is deduplicated by the request digest (``sha256`` of the signed
frame) as ``Nats-Msg-Id``: nobody can predict it before the frame is signed,
so nobody can squat it, and retries of one publish reuse it.

All workers of a capability share one durable pull consumer, so the jobs are
load-balanced among them. A worker first **claims** the delivery it got (a
signed, write-once :class:`~meshjobs.jobrecords.Claim` per delivery), runs the
job, stores the signed result (write-once, under a key only holders of the
frame can derive; see :mod:`meshjobs.jobrecords`), then acknowledges. A
redelivery after a crash is claimed anew by whoever gets it; if a result of a
claimant exists it is acknowledged without running again. A second copy of a
frame in the queue (a replay) finds the first delivery claimed for another
stream message and is terminated. An envelope that fails verification is
terminated on first delivery; a job whose handler fails is retried with
backoff and, after ``max_attempts``, moved to ``JOBS_DLQ`` with the reason.

The submitter keeps each frame it signed in its :class:`Journal` and accepts
a result only if it verifies, names its job id and request digest, and its
signer holds a claim of that frame. Junk under the key is never an outcome.
Job states are signed by their writer and kept in the submitter's namespace
of the ``jobs`` bucket (``<submitter>.<job id>``), which a closed broker lets
only that key (and operators) read; the dead-letter queue is operators' only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from meshjobs._nats import denied
from meshjobs.client import Outcome, settle
from meshjobs.envelope import Envelope, digest, now_ms, open_envelope, open_result, seal_envelope
from meshjobs.errors import JobTimeout, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.jobrecords import (
    MAX_CLAIMS,
    Claim,
    JobKeys,
    Journal,
    Records,
    StateRecord,
    WriteOnceBucketSpec,
    get_quietly,
    open_claim,
    open_state,
    seal_claim,
    seal_state,
    state_key,
)
from meshjobs.state import (
    DOMAIN,
    FULL_STREAM_CODES,
    BucketSpec,
    MeshKV,
    StateSpec,
    StreamSpec,
    provision,
    publish_retrying,
    read_subject,
    retrying,
)
from meshjobs.subjects import check_capability

__all__ = ["Durable", "JobState", "Journal", "settle_stored"]

log = logging.getLogger("meshjobs.durable")

STREAM = "JOBS"
SUBJECT = "mesh.jobs"
DLQ_STREAM = "JOBS_DLQ"
DLQ_SUBJECT = "mesh.dlq"
RESULTS = "job_results"
CLAIMS = "job_claims"
STATES = "jobs"
#: The submitter's journal under ``MESHJOBS_HOME`` (the CLI's).
JOURNAL_FILE = "jobs.journal"
DEFAULT_MAX_JOBS = 1_000_000
DEFAULT_TTL_S = 24 * 3600.0

#: What a worker does with a delivery (:meth:`Durable.admit`).
RUN, DONE, REPLAY, BUSY = "run", "done", "replay", "busy"

T = TypeVar("T")


def state_specs(*, max_jobs: int = DEFAULT_MAX_JOBS, ttl_s: float = DEFAULT_TTL_S) -> tuple[StateSpec, ...]:
    """The streams and buckets durable jobs need (a full queue refuses new jobs: discard-new).

    ``JOBS`` comes last: where it exists, the rest was provisioned with it.
    """
    return (
        WriteOnceBucketSpec(RESULTS),
        WriteOnceBucketSpec(CLAIMS),
        BucketSpec(STATES),
        StreamSpec(DLQ_STREAM, (f"{DLQ_SUBJECT}.>",), max_age_s=30 * 86400.0),
        StreamSpec(STREAM, (f"{SUBJECT}.>",), max_age_s=ttl_s, work_queue=True, max_msgs=max_jobs),
    )


STATE = state_specs()


def jobs_subject(capability: str) -> str:
    return f"{SUBJECT}.{capability}"


def consumer_name(capability: str) -> str:
    """The durable consumer every worker of *capability* shares."""
    return "jobs_" + capability.replace(".", "_")


_SORTABLE = "0123456789abcdefghijklmnopqrstuv"  # base32 in ASCII order


def new_job_id() -> str:
    """A durable job id of 31 characters: milliseconds (9, so ids sort by time), then 132 random bits (22).

    Knowing a job id is what lets a submitter's tools find the job, so it is
    unguessable; it still fits the listings' column whole.
    """
    ms = now_ms()
    stamp = "".join(_SORTABLE[(ms >> (5 * i)) & 31] for i in range(8, -1, -1))
    return stamp + base64.urlsafe_b64encode(secrets.token_bytes(17)).decode()[:22]


@dataclass
class JobState:
    job_id: str
    state: str
    capability: str
    submitter: str
    request_digest: str
    worker: str = ""
    attempts: int = 0
    detail: str = ""
    updated_ms: int = 0
    writer: str = ""
    """Who signed this state (empty: not read from the mesh)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, record: StateRecord) -> JobState:
        return cls(
            record.job_id, record.state, record.capability, record.submitter, record.request_digest,
            record.worker, record.attempts, record.detail, record.updated_ms, record.writer,
        )  # fmt: skip


def decode_state(value: bytes) -> JobState | None:
    """A signed state from the ``jobs`` bucket (signature checked, writer not judged), or None for junk."""
    record = open_state(value) if value else None
    return JobState.from_record(record) if record is not None else None


class Durable:
    """The durable-job streams and buckets, for submitters and workers alike.

    *journal* holds the frames this submitter signed (in memory unless given
    a file); results and states are checked against it.
    """

    def __init__(self, nc: NATS, *, journal: Journal | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(domain=DOMAIN, timeout=5.0)
        self.journal = journal or Journal()
        self.results = Records(nc, self.js, RESULTS)
        self.claims = Records(nc, self.js, CLAIMS)
        self.state_records = Records(nc, self.js, STATES)
        # For watchers that may list the bucket (operators): built by hand, as
        # nats-py's key_value() asks for stream info, which peers may not.
        kv = KeyValue(name=STATES, stream=f"KV_{STATES}", pre=f"$KV.{STATES}.", js=self.js, direct=True)
        self.states = MeshKV(self.js, kv, STATES, DOMAIN, nc=nc)

    @classmethod
    async def open(
        cls,
        nc: NATS,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        ttl_s: float = DEFAULT_TTL_S,
        replicas: int | None = None,
        placement: str | None = None,
        journal: Journal | None = None,
    ) -> Durable:
        """Open (creating where missing) the job streams and buckets; existing ones keep their settings."""
        specs = state_specs(max_jobs=max_jobs, ttl_s=ttl_s)
        js = nc.jetstream(domain=DOMAIN, timeout=2.0)

        async def queue_exists() -> bool:
            try:
                await js.stream_info(STREAM)
                return True
            except nats.js.errors.NotFoundError:
                return False

        info = f"$JS.{DOMAIN}.API.STREAM.INFO.{STREAM}"
        refused = (lambda: info if denied(nc, info) else None) if hasattr(nc, "meshjobs_denied") else None
        exists = await retrying(queue_exists, timeout=10.0, what="opening the job queue", refused=refused)
        # Peers may not read the jobs bucket's stream info (it would list every
        # job): where the queue exists, the bucket was provisioned before it.
        wanted = [s for s in specs if not (exists and isinstance(s, BucketSpec) and s.name == STATES)]
        await provision(nc, wanted, replicas=replicas, placement=placement)
        return cls(nc, journal=journal)

    # -- submitting -------------------------------------------------------------

    async def submit(
        self,
        identity: Identity,
        capability: str,
        args: dict[str, Any],
        *,
        job_id: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> str:
        """Queue a job; returns its id. Raises :class:`Rejected` (``queue_full``) when the queue is full.

        A *job_id* this journal knows already means that job: its frame is
        published again (deduplicated, or refused as a replay), nothing new runs.
        """
        check_capability(capability)
        if job_id is not None and (known := self.journal.get(job_id)) is not None:
            await self._publish(jobs_subject(known.capability), known.frame)
            return job_id
        job_id = job_id or new_job_id()
        await self._queue(identity, capability, job_id, self._seal(identity, capability, args, job_id, ttl_s))
        return job_id

    @staticmethod
    def _seal(identity: Identity, capability: str, args: dict[str, Any], job_id: str, ttl_s: float) -> bytes:
        try:
            _, frame = seal_envelope(
                identity, capability, args, audience=jobs_subject(capability), job_id=job_id, ttl_ms=int(ttl_s * 1000)
            )
        except ValueError as exc:
            raise UsageError(f"arguments cannot be sent: {exc}") from None
        return frame

    async def _queue(self, identity: Identity, capability: str, job_id: str, frame: bytes) -> None:
        self.journal.record(job_id, capability, now_ms(), frame)  # first: whatever happens next, we can verify
        await self.put_state(JobState(job_id, "queued", capability, identity.public_key, digest(frame)), identity)
        await self._publish(jobs_subject(capability), frame)

    async def _publish(self, subject: str, frame: bytes) -> None:
        # The message id is the frame's digest: unknown until the frame is
        # signed, so it cannot be squatted; the same for every retry.
        try:
            await publish_retrying(self.js, subject, frame, {"Nats-Msg-Id": digest(frame)}, 30.0, "the job")
        except nats.js.errors.APIError as exc:
            if exc.err_code in FULL_STREAM_CODES:
                raise Rejected(Reason.QUEUE_FULL, "the job queue is full; nothing queued was dropped") from None
            raise

    async def put_state(self, state: JobState, identity: Identity) -> None:
        """Write *state*, signed by *identity* (the submitter, or the worker holding the job's claim)."""
        state.updated_ms = now_ms()
        state.writer = identity.public_key
        record = StateRecord(
            version=1, job_id=state.job_id, state=state.state, capability=state.capability,  # type: ignore[arg-type]
            submitter=state.submitter, request_digest=state.request_digest, writer=identity.public_key,
            worker=state.worker, attempts=state.attempts, detail=state.detail[:4096], updated_ms=state.updated_ms,
        )  # fmt: skip
        await self.state_records.put(state_key(state.submitter, state.job_id), seal_state(identity, record))

    # -- the submitter's view -----------------------------------------------------

    def _own(self, job_id: str) -> tuple[Envelope, JobKeys]:
        entry = self.journal.get(job_id)
        if entry is None:
            raise UsageError(
                f"job {job_id} is not in this submitter's journal: only its submitter can check its result"
            )
        return open_envelope(entry.frame), JobKeys(entry.frame)

    async def result(self, job_id: str, *, wait: float = 0.0) -> Any:
        """The verified signed result of one of our jobs (waits up to *wait* seconds), or None if not there yet.

        Only a result that verifies, names this job id and the digest of the
        frame we signed, and is signed by a worker holding a claim of that
        frame counts; anything else stored under the key is ignored.
        """
        envelope, keys = self._own(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.005  # quick jobs are seen quickly; a long wait backs off to a get every 0.2 s
        while True:
            data = await self.results.get(keys.result_key)
            if data is not None and (found := await self._accept(keys, envelope, data)) is not None:
                return found
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 1.5, 0.2)

    async def wait(self, job_id: str, timeout: float) -> Any:
        found = await self.result(job_id, wait=timeout)
        if found is None:
            raise JobTimeout(f"job {job_id} has no result after {timeout:g} s (it stays queued)")
        return found

    async def _accept(self, keys: JobKeys, envelope: Envelope, data: bytes) -> tuple[Any, bytes] | None:
        frame = keys.open(data)
        if frame is None:
            return None
        try:
            result = open_result(frame)
        except Rejected:
            return None
        if result.job_id != envelope.job_id or result.request_digest != keys.digest:
            return None
        if not await self._holds_claim(keys, envelope, result.worker):
            return None
        return result, frame

    def _claim(self, keys: JobKeys, envelope: Envelope, data: bytes | None) -> Claim | None:
        """A claim of this very frame, signed by the worker it names; None for nothing or junk."""
        opened = keys.open(data) if data is not None else None
        claim = open_claim(opened) if opened is not None else None
        if claim is None or (claim.job_id, claim.request_digest, claim.submitter) != (
            envelope.job_id, keys.digest, envelope.submitter,
        ):  # fmt: skip
            return None
        return claim

    async def _holds_claim(self, keys: JobKeys, envelope: Envelope, worker: str) -> bool:
        missing = 0
        for delivery in range(1, MAX_CLAIMS + 1):
            data = await self.claims.get(keys.claim_key(delivery))
            if data is None:
                missing += 1  # a worker may die before it claims: look a little further
                if missing > 3:
                    return False
                continue
            missing = 0
            claim = self._claim(keys, envelope, data)
            if claim is not None and claim.worker == worker and claim.delivery == delivery:
                return True
        return False

    async def state(self, job_id: str) -> JobState | None:
        """Where one of our jobs is; for a job not in the journal, an operator's look at the bucket.

        The state is the signed one in the mesh if its writer is the submitter
        or holds a claim of the submitter's frame; otherwise "queued", as the
        journal knows it.
        """
        entry = self.journal.get(job_id)
        if entry is None:
            try:
                found = await self._everyone(f"$KV.{STATES}.*.{job_id}", limit=1)
            except Rejected as exc:
                if exc.reason != Reason.DENIED:
                    raise
                return None  # not ours, and we may not look at others' jobs
            return found[-1] if found else None
        envelope, keys = open_envelope(entry.frame), JobKeys(entry.frame)
        data = await get_quietly(self.state_records, state_key(envelope.submitter, job_id))
        record = open_state(data) if data else None
        if (
            record is not None
            and (record.job_id, record.request_digest, record.submitter) == (job_id, keys.digest, envelope.submitter)
            and (record.writer == envelope.submitter or await self._holds_claim(keys, envelope, record.writer))
        ):
            return JobState.from_record(record)
        queued = entry.submitted_ms
        return JobState(job_id, "queued", envelope.capability, envelope.submitter, keys.digest, updated_ms=queued)

    async def list_states(self, limit: int = 50, *, everyone: bool = False) -> list[JobState]:
        """The latest states of our most recent jobs (from the journal), oldest first.

        ``everyone``: every job in the bucket (operators only; others get
        :class:`Rejected` ``denied``). Signatures are checked; ``writer`` says who signed.
        """
        if everyone:
            return await self._everyone(f"$KV.{STATES}.>", limit)
        states = [await self.state(entry.job_id) for entry in self.journal.recent(limit)]
        return [s for s in states if s is not None]

    async def _everyone(self, subject: str, limit: int) -> list[JobState]:
        msgs = await self._operator_read(f"KV_{STATES}", lambda: read_subject(self.js, f"KV_{STATES}", subject,
                                                                          last_per_subject=True))  # fmt: skip
        states = [s for s in (decode_state(m.data) for m in msgs if not _deleted(m)) if s is not None]
        states.sort(key=lambda s: s.job_id)
        return states[-limit:]

    async def _operator_read(self, stream: str, read: Callable[[], Awaitable[T]]) -> T:
        """Run a read only operators may make; a broker's refusal fails at once with ``denied``."""
        subject = f"$JS.{DOMAIN}.API.CONSUMER.CREATE.{stream}"
        started = time.monotonic()
        task = asyncio.ensure_future(read())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.02)
                if done:
                    return task.result()
                if denied(self.nc, subject, within=time.monotonic() - started + 1.0):
                    raise Rejected(Reason.DENIED, f"only operators may list {stream}")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs in the dead-letter stream: job id, capability, reason, attempts (operators only)."""
        out = []
        for msg in await self._operator_read(DLQ_STREAM, lambda: read_subject(self.js, DLQ_STREAM, f"{DLQ_SUBJECT}.>")):
            headers = msg.headers or {}
            out.append(
                {
                    "job_id": headers.get("Meshjobs-Job", ""),
                    "capability": msg.subject[len(DLQ_SUBJECT) + 1 :],
                    "reason": headers.get("Meshjobs-Reason", ""),
                    "attempts": int(headers.get("Meshjobs-Attempts", "0") or 0),
                    "envelope": msg.data,
                }
            )
        return out[-limit:]

    async def redrive(self, identity: Identity, job_id: str) -> str:
        """Queue one of our dead jobs again: the same job id and arguments, in a newly signed frame."""
        entry = self.journal.get(job_id)
        if entry is None:
            raise UsageError(f"job {job_id} is not in this submitter's journal: only its submitter can re-drive it")
        envelope = open_envelope(entry.frame)
        if envelope.submitter != identity.public_key:
            raise UsageError(f"job {job_id} was submitted by another key; only its submitter can re-drive it")
        found = await self.result(job_id)
        error = found[0].error if found is not None else None
        if error is None or error.code != "DeadLetter":
            raise UsageError(f"job {job_id} is not in the dead-letter queue")
        ttl_s = (envelope.expires_at - envelope.issued_at) / 1000
        frame = self._seal(identity, envelope.capability, envelope.args, job_id, ttl_s)
        await self._queue(identity, envelope.capability, job_id, frame)
        return job_id

    # -- the worker's side --------------------------------------------------------

    async def admit(self, identity: Identity, envelope: Envelope, frame: bytes, stream_seq: int, delivery: int) -> str:
        """Claim delivery *delivery* of *frame* for *identity*: ``RUN``, ``DONE``, ``REPLAY`` or ``BUSY``.

        ``DONE``: a claimant's result is stored (a redelivery after a crash):
        acknowledge without running. ``REPLAY``: this is another copy of a frame
        already claimed for another stream message: terminate it. ``BUSY``: the
        claim of this delivery holds something else: hand the job back.
        """
        keys = JobKeys(frame)
        if delivery > 1:
            first = self._claim(keys, envelope, await self.claims.get(keys.claim_key(1)))
            if first is not None and first.stream_seq != stream_seq:
                return REPLAY
            data = await self.results.get(keys.result_key)
            if data is not None and await self._accept(keys, envelope, data) is not None:
                return DONE
        claim = Claim(
            version=1, job_id=envelope.job_id, request_digest=keys.digest, submitter=envelope.submitter,
            worker=identity.public_key, stream_seq=stream_seq, delivery=delivery, issued_at=now_ms(),
        )  # fmt: skip
        if await self.claims.create(keys.claim_key(delivery), keys.seal(seal_claim(identity, claim))):
            return RUN
        held = self._claim(keys, envelope, await self.claims.get(keys.claim_key(delivery)))
        if held is not None and held.stream_seq != stream_seq:
            return REPLAY
        if held is not None and held.worker == identity.public_key:
            return RUN  # our own claim, written by an earlier try of this delivery
        return BUSY

    async def store_result(self, envelope: Envelope, frame: bytes, result: bytes) -> bool:
        """Store the signed *result* of *frame*'s job once; False when a result was stored already."""
        keys = JobKeys(frame)
        if await self.results.create(keys.result_key, keys.seal(result)):
            return True
        data = await self.results.get(keys.result_key)
        if data is None or await self._accept(keys, envelope, data) is None:
            log.warning("job %s: its result slot holds no valid result and cannot be written", envelope.job_id)
        return False


def _deleted(msg: Msg) -> bool:
    return bool(msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"))


def settle_stored(job_id: str, found: Any) -> Any:
    """Raise what a stored final result means, like :func:`meshjobs.client.settle`."""
    result, frame = found
    return settle(Outcome(result, frame, b"", f"job {job_id}", 1, 0.0))
