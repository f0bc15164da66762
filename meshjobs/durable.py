"""Durable jobs on JetStream: none lost, none visibly run twice, poison jobs contained.

Interactive commands ride core request/reply; work that must not be lost goes
through the ``JOBS`` work-queue stream of the hub domain (subjects
``mesh.jobs.<capability>``, three replicas where the cluster has them). A full
queue refuses new jobs (discard-new) instead of dropping old ones; publishing
is deduplicated by job id and retried on 503 and timeouts.

All workers of a capability share one durable pull consumer, so the jobs are
load-balanced among them. A worker pulls no more than it can start, sends
in-progress acks while a job runs, and acknowledges only once the signed
result is stored — created once in the ``results`` bucket under the job id, so
a redelivered job whose result exists is acknowledged without running again.
An envelope that fails verification is terminated on first delivery; a job
whose handler fails is retried with backoff and, after ``max_attempts``,
moved to the ``JOBS_DLQ`` stream with the reason. Nonces of durable envelopes
are recorded mesh-wide (created once in the ``nonces`` bucket), so a replay
can never run a job, wherever it is delivered.

Job states (``queued``, ``running``, ``done``, ``failed``, ``dead``) are kept
in the ``jobs`` bucket for ``meshjobs jobs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from meshjobs.client import Outcome, settle
from meshjobs.envelope import digest, new_job_id, now_ms, open_result, seal_envelope
from meshjobs.errors import JobTimeout, KeyExists, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.state import (
    DOMAIN,
    FULL_STREAM_CODES,
    BucketSpec,
    MeshKV,
    StateSpec,
    StreamSpec,
    open_bucket,
    provision,
    publish_retrying,
    read_subject,
)
from meshjobs.subjects import check_capability

STREAM = "JOBS"
SUBJECT = "mesh.jobs"
DLQ_STREAM = "JOBS_DLQ"
DLQ_SUBJECT = "mesh.dlq"
RESULTS = "results"
NONCES = "nonces"
STATES = "jobs"
DEFAULT_MAX_JOBS = 1_000_000
DEFAULT_TTL_S = 24 * 3600.0


def state_specs(*, max_jobs: int = DEFAULT_MAX_JOBS, ttl_s: float = DEFAULT_TTL_S) -> tuple[StateSpec, ...]:
    """The streams and buckets durable jobs need (a full queue refuses new jobs: discard-new)."""
    return (
        StreamSpec(STREAM, (f"{SUBJECT}.>",), max_age_s=ttl_s, work_queue=True, max_msgs=max_jobs),
        StreamSpec(DLQ_STREAM, (f"{DLQ_SUBJECT}.>",), max_age_s=30 * 86400.0),
        BucketSpec(RESULTS),
        BucketSpec(NONCES),
        BucketSpec(STATES),
    )


STATE = state_specs()


def jobs_subject(capability: str) -> str:
    return f"{SUBJECT}.{capability}"


def consumer_name(capability: str) -> str:
    """The durable consumer every worker of *capability* shares."""
    return "jobs_" + capability.replace(".", "_")


def nonce_key(submitter: str, nonce: str) -> str:
    return hashlib.sha256(f"{submitter}\0{nonce}".encode()).hexdigest()[:40]


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Durable:
    """The durable-job streams and buckets, for submitters and workers alike."""

    def __init__(self, nc: NATS, results: MeshKV, nonces: MeshKV, states: MeshKV) -> None:
        self.nc = nc
        self.js = nc.jetstream(domain=DOMAIN, timeout=5.0)
        self.results = results
        self.nonces = nonces
        self.states = states

    @classmethod
    async def open(
        cls,
        nc: NATS,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        ttl_s: float = DEFAULT_TTL_S,
        replicas: int | None = None,
        placement: str | None = None,
    ) -> Durable:
        """Open (creating where missing) the job streams and buckets; existing ones keep their settings."""
        specs = state_specs(max_jobs=max_jobs, ttl_s=ttl_s)
        await provision(nc, specs, replicas=replicas, placement=placement)
        results, nonces, states = [await open_bucket(nc, name, create=False) for name in (RESULTS, NONCES, STATES)]
        return cls(nc, results, nonces, states)

    # -- submitting -------------------------------------------------------------

    async def submit(
        self,
        identity: Identity,
        capability: str,
        args: dict[str, Any],
        *,
        job_id: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        msg_id: str | None = None,
    ) -> str:
        """Queue a job; returns its id. Raises :class:`Rejected` (``queue_full``) when the queue is full."""
        check_capability(capability)
        job_id = job_id or new_job_id()
        subject = jobs_subject(capability)
        try:
            _, frame = seal_envelope(
                identity, capability, args, audience=subject, job_id=job_id, ttl_ms=int(ttl_s * 1000)
            )
        except ValueError as exc:
            raise UsageError(f"arguments cannot be sent: {exc}") from None
        state = JobState(job_id, "queued", capability, identity.public_key, digest(frame), updated_ms=now_ms())
        await self.put_state(state)
        await self._publish(subject, frame, msg_id or job_id)
        return job_id

    async def _publish(self, subject: str, frame: bytes, msg_id: str) -> None:
        try:
            await publish_retrying(self.js, subject, frame, {"Nats-Msg-Id": msg_id}, 30.0, "the job")
        except nats.js.errors.APIError as exc:
            if exc.err_code in FULL_STREAM_CODES:
                raise Rejected(Reason.QUEUE_FULL, "the job queue is full; nothing queued was dropped") from None
            raise

    async def put_state(self, state: JobState) -> None:
        state.updated_ms = now_ms()
        await self.states.put(state.job_id, json.dumps(state.as_dict()).encode())

    async def state(self, job_id: str) -> JobState | None:
        entry = await self.states.get(job_id)
        if entry is None:
            return None
        try:
            return JobState(**json.loads(entry.value))
        except (ValueError, TypeError):
            return None

    async def result(self, job_id: str, *, wait: float = 0.0) -> Any:
        """The verified signed result of a job (waits up to *wait* seconds), or None if not there yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            entry = await self.results.get(job_id)
            if entry is not None:
                result = open_result(entry.value)
                state = await self.state(job_id)
                if result.job_id != job_id or (state and result.request_digest != state.request_digest):
                    raise Rejected(Reason.RESULT_MISMATCH, f"the stored result does not belong to job {job_id}")
                return result, entry.value
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))

    async def wait(self, job_id: str, timeout: float) -> Any:
        found = await self.result(job_id, wait=timeout)
        if found is None:
            raise JobTimeout(f"job {job_id} has no result after {timeout:g} s (it stays queued)")
        return found

    async def list_states(self, limit: int = 50) -> list[JobState]:
        """The latest state of the most recent jobs (job ids sort by time), oldest first."""
        states = []
        for msg in await read_subject(self.js, f"KV_{STATES}", f"$KV.{STATES}.>", last_per_subject=True):
            if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
                continue
            try:
                states.append(JobState(**json.loads(msg.data)))
            except (ValueError, TypeError):
                continue
        states.sort(key=lambda s: s.job_id)
        return states[-limit:]

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs in the dead-letter stream: job id, capability, reason, attempts."""
        out = []
        for msg in await read_subject(self.js, DLQ_STREAM, f"{DLQ_SUBJECT}.>"):
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
        """Queue a dead job again, re-signed by its submitter with the same job id and arguments."""
        from meshjobs.envelope import open_envelope

        for item in await self.dead_letters(limit=100_000):
            if item["job_id"] != job_id:
                continue
            envelope = open_envelope(item["envelope"])
            if envelope.submitter != identity.public_key:
                raise UsageError(f"job {job_id} was submitted by another key; only its submitter can re-drive it")
            await self.results.delete(job_id)  # the dead-letter result, so the job runs again
            return await self.submit(
                identity, envelope.capability, envelope.args, job_id=job_id, msg_id=f"{job_id}.redrive.{now_ms()}"
            )
        raise UsageError(f"job {job_id} is not in the dead-letter queue")

    async def record_nonce(self, submitter: str, nonce: str, job_id: str) -> bool:
        """Record a durable envelope's nonce mesh-wide; False if it was used by another job."""
        key = nonce_key(submitter, nonce)
        try:
            await self.nonces.create(key, job_id.encode())
            return True
        except KeyExists:
            entry = await self.nonces.get(key)
            return entry is not None and entry.value == job_id.encode()

    async def store_result(self, job_id: str, frame: bytes) -> bool:
        """Store a job's signed result once; False when one was stored already."""
        try:
            await self.results.create(job_id, frame)
            return True
        except KeyExists:
            return False


def settle_stored(job_id: str, found: Any) -> Any:
    """Raise what a stored final result means, like :func:`meshjobs.client.settle`."""
    result, frame = found
    return settle(Outcome(result, frame, b"", f"job {job_id}", 1, 0.0))
