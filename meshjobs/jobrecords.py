"""The records of a durable job that other peers must not forge, squat, overwrite or list.

Everything here is keyed by a secret only the holders of a job's envelope frame
know: its submitter, the workers it was delivered to, and operators (who can
read the queue). :class:`JobKeys` derives it from the frame with a fixed
domain prefix, so it exists only once the frame is signed and cannot be
predicted from anything public (the frame carries a random nonce and a
signature; the request digest, ``sha256(frame)``, is a different hash):

- **results** (``job_results``): one signed result per frame, under a key
  derived from the secret, sealed (``SecretBox``) with a key derived from it;
- **claims** (``job_claims``): one signed :class:`Claim` per JetStream delivery
  of the frame (``<claim key>.<delivery>``), sealed the same way. A claim binds
  job id, request digest, submitter, worker, stream sequence and delivery.

Both buckets are **write-once per key, enforced by the server**: one message
per subject, ``discard_new_per_subject`` (a second write is refused whoever
sends it), no rollups, no deletes. So a stored result or claim can be neither
replaced nor purged by a peer, and its key cannot be squatted in advance (it
is unknown until the frame exists). Peers may read them only by exact key
(direct get with the subject in the request subject); a wildcard in that
subject returns the bucket's newest message, which is why values are sealed:
a reader without the frame learns an opaque key it cannot write to and bytes
it cannot open.

Job states (``jobs``) are :class:`StateRecord` statements signed by their
writer, kept under ``<submitter key>.<job id>``, so a broker can let each key
read only its own namespace (see ``natsconf``). The submitter's own frames are
kept in its :class:`Journal`.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import nacl.exceptions
import nacl.secret
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from pydantic import Field

from meshjobs.envelope import (
    CLAIM_MAGIC,
    DIGEST_PATTERN,
    JOB_ID_PATTERN,
    STATE_MAGIC,
    Wire,
    digest,
    open_statement,
    seal_statement,
)
from meshjobs.errors import Rejected
from meshjobs.identity import Identity
from meshjobs.state import DOMAIN, FULL_STREAM_CODES, BucketSpec, publish_retrying

_WRONG_LAST_SEQUENCE = 10071
#: Deliveries a submitter looks through for the claim of a result's signer.
MAX_CLAIMS = 64


class WriteOnceBucketSpec(BucketSpec):
    """A KV bucket whose keys can be written once: the server refuses any later write, delete or rollup."""

    def config(self, replicas: int | None, placement: str | None) -> StreamConfig:
        return dataclasses.replace(
            super().config(replicas, placement),
            max_msgs_per_subject=1,
            discard_new_per_subject=True,
            allow_rollup_hdrs=False,
        )


class JobKeys:
    """Keys and the seal of one envelope frame's records, derived from a secret only frame holders know."""

    def __init__(self, frame: bytes) -> None:
        secret = hashlib.sha256(b"meshjobs/1 job secret\x00" + frame).digest()
        self.digest = digest(frame)
        self.result_key = hashlib.sha256(b"result\x00" + secret).hexdigest()[:48]
        self._claim = hashlib.sha256(b"claim\x00" + secret).hexdigest()[:48]
        self._box = nacl.secret.SecretBox(hashlib.sha256(b"seal\x00" + secret).digest())

    def claim_key(self, delivery: int) -> str:
        return f"{self._claim}.{delivery}"

    def seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def open(self, data: bytes) -> bytes | None:
        """The sealed bytes, or None for anything not sealed with this frame's key (junk)."""
        try:
            return bytes(self._box.decrypt(data))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None


class Claim(Wire):
    """A worker's signed statement: "I hold delivery *delivery* of this frame (stream sequence *stream_seq*)"."""

    version: Literal[1]
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    request_digest: str = Field(pattern=DIGEST_PATTERN)
    submitter: str
    worker: str
    stream_seq: int = Field(ge=0)
    delivery: int = Field(ge=1)
    issued_at: int = Field(ge=0)


STATES = ("queued", "running", "done", "failed", "dead")


class StateRecord(Wire):
    """A durable job's state as signed by its writer (the submitter, or a worker holding a claim)."""

    version: Literal[1]
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    state: Literal["queued", "running", "done", "failed", "dead"]
    capability: str = Field(max_length=256)
    submitter: str
    request_digest: str = Field(pattern=DIGEST_PATTERN)
    writer: str
    worker: str = Field(default="", max_length=64)
    attempts: int = Field(default=0, ge=0)
    detail: str = Field(default="", max_length=4096)
    updated_ms: int = Field(default=0, ge=0)


def seal_claim(identity: Identity, claim: Claim) -> bytes:
    return seal_statement(CLAIM_MAGIC, identity, claim)


def open_claim(data: bytes) -> Claim | None:
    """A claim that verifies (signed by the worker it names), or None."""
    try:
        return open_statement(CLAIM_MAGIC, Claim, "worker", data)
    except Rejected:
        return None


def seal_state(identity: Identity, record: StateRecord) -> bytes:
    return seal_statement(STATE_MAGIC, identity, record)


def open_state(data: bytes) -> StateRecord | None:
    """A state record that verifies (signed by the writer it names), or None for junk."""
    try:
        return open_statement(STATE_MAGIC, StateRecord, "writer", data)
    except Rejected:
        return None


def state_key(submitter: str, job_id: str) -> str:
    """Job states live in their submitter's namespace, which a broker lets only that key read."""
    return f"{submitter}.{job_id}"


class Records:
    """Write-once creates and exact-key reads of one bucket through the hub domain (works from leaves).

    No listing, no wildcard reads, no fallback to the stream leader's
    ``STREAM.MSG.GET`` (peers may not use it on these buckets).
    """

    def __init__(self, nc: NATS, js: JetStreamContext, bucket: str, domain: str = DOMAIN) -> None:
        self.nc, self.js, self.bucket = nc, js, bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$JS.{domain}.API.$KV.{bucket}."
        self.write_timeout = 30.0

    async def get(self, key: str) -> bytes | None:
        try:
            msg = await self.js.get_msg(self.stream, subject=f"$KV.{self.bucket}.{key}", direct=True)
        except nats.js.errors.NotFoundError:
            return None
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return msg.data or b""

    async def create(self, key: str, value: bytes) -> bool:
        """Write *value* if the key was never written; False if it was (by anyone)."""
        # One message id per logical write: a retry whose first attempt was
        # stored is answered with the first ack instead of failing.
        headers = {"Nats-Msg-Id": uuid.uuid4().hex, "Nats-Expected-Last-Subject-Sequence": "0"}
        try:
            await publish_retrying(
                self.js, self._prefix + key, value, headers, self.write_timeout, f"write to {self.bucket}", nc=self.nc
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE or exc.err_code in FULL_STREAM_CODES:
                return False
            raise
        return True

    async def put(self, key: str, value: bytes) -> None:
        """Write *value* whatever was there (mutable buckets only)."""
        headers = {"Nats-Msg-Id": uuid.uuid4().hex}
        await publish_retrying(
            self.js, self._prefix + key, value, headers, self.write_timeout, f"write to {self.bucket}", nc=self.nc
        )


async def get_quietly(records: Records, key: str) -> bytes | None:
    """Like :meth:`Records.get`, but a read the broker refuses or never answers is "nothing there"."""
    try:
        return await records.get(key)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None


@dataclasses.dataclass
class JournalEntry:
    job_id: str
    capability: str
    submitted_ms: int
    frame: bytes


class Journal:
    """The submitter's own record of its durable jobs: each job id and the envelope frame it signed.

    The submitter checks results against its own frame (never against shared
    state), lists its own jobs and re-drives dead ones from here. With a
    *path* the journal is a JSON-lines file (mode 0600, locked while written,
    bounded to *max_entries* jobs and *max_bytes*: the oldest are dropped);
    without, it lives in memory for one :class:`~meshjobs.durable.Durable`.
    """

    def __init__(self, path: Path | None = None, *, max_entries: int = 10_000, max_bytes: int = 64 << 20) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memory: dict[str, JournalEntry] = {}

    def record(self, job_id: str, capability: str, submitted_ms: int, frame: bytes) -> None:
        entry = JournalEntry(job_id, capability, submitted_ms, frame)
        if self.path is None:
            self._memory.pop(job_id, None)
            self._memory[job_id] = entry
            while len(self._memory) > self.max_entries:
                del self._memory[next(iter(self._memory))]
            return
        line = json.dumps(
            {"job_id": job_id, "capability": capability, "at": submitted_ms, "frame": base64.b64encode(frame).decode()}
        )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(line + "\n")
            out.flush()
            if out.tell() > self.max_bytes or self._too_many():
                self._compact()

    def _too_many(self) -> bool:
        return len(self._load()) > self.max_entries

    def _compact(self) -> None:
        # Called with the lock held: keep the newest jobs within both bounds.
        if self.path is None:
            return
        kept: list[str] = []
        size = 0
        for entry in reversed(list(self._load().values())):
            line = json.dumps(
                {"job_id": entry.job_id, "capability": entry.capability, "at": entry.submitted_ms,
                 "frame": base64.b64encode(entry.frame).decode()}
            )  # fmt: skip
            if len(kept) >= self.max_entries or size + len(line) > self.max_bytes // 2:
                break
            kept.append(line)
            size += len(line) + 1
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("".join(line + "\n" for line in reversed(kept)))
        os.replace(tmp, self.path)

    def _load(self) -> dict[str, JournalEntry]:
        if self.path is None:
            return dict(self._memory)
        out: dict[str, JournalEntry] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return out
        with os.fdopen(fd) as src:
            for line in src:
                try:
                    item: dict[str, Any] = json.loads(line)
                    entry = JournalEntry(
                        str(item["job_id"]), str(item["capability"]), int(item["at"]), base64.b64decode(item["frame"])
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line (a crash mid-write): skip it
                out.pop(entry.job_id, None)
                out[entry.job_id] = entry  # the latest frame of a job id wins (a re-drive)
        return out

    def get(self, job_id: str) -> JournalEntry | None:
        return self._load().get(job_id)

    def recent(self, limit: int) -> list[JournalEntry]:
        """The most recent jobs, oldest first."""
        return list(self._load().values())[-limit:]
