"""A worker's memory of what it has seen: nonces (replay) and jobs (dedupe).

Both are bounded. Nonces are kept until their envelope expires (plus clock
skew), never less; when the table is full of unexpired nonces the worker sheds
load (``overloaded``, retryable) rather than forget one. Jobs are remembered by
(submitter, job id) so a client's retry of the same job gets the first run's
result instead of a second run; old completed entries are evicted first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from meshjobs.errors import Reason, Rejected
from meshjobs.runtime.execute import Execution
from meshjobs.state import BucketSpec, StateSpec


class ReplayGuard:
    """Refuses a (submitter, nonce) pair seen within its validity window."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._seen: dict[int, int] = {}
        self._order: deque[tuple[int, int]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    @staticmethod
    def _key(submitter: str, nonce: str) -> int:
        # 64-bit keys keep the table small; a collision only costs one false
        # "replay" answer, at odds of about n / 2**64.
        raw = hashlib.blake2b(f"{submitter}\x00{nonce}".encode(), digest_size=8).digest()
        return int.from_bytes(raw, "little")

    def _sweep(self, now_ms: int) -> None:
        # Expiries are not monotonic in arrival order, so an entry may outlive
        # its expiry behind a longer-lived one: safe (kept longer, never less).
        order, seen = self._order, self._seen
        while order and order[0][0] < now_ms:
            expiry, key = order.popleft()
            if seen.get(key) == expiry:
                del seen[key]

    def check_and_record(self, submitter: str, nonce: str, keep_until_ms: int, now_ms: int) -> None:
        """Record the pair, or raise :class:`Rejected` (replay, or overloaded when full)."""
        key = self._key(submitter, nonce)
        self._sweep(now_ms)
        if key in self._seen:
            raise Rejected(Reason.REPLAY)
        if len(self._seen) >= self.max_entries:
            raise Rejected(Reason.OVERLOADED, "the replay table is full; try again shortly")
        self._seen[key] = keep_until_ms
        self._order.append((keep_until_ms, key))


@dataclass
class JobEntry:
    """One job a worker accepted: who waits for it and, once done, its signed result."""

    capability: str
    args: dict[str, Any]
    keep_until_ms: int
    replies: list[tuple[str, str]] = field(default_factory=list)
    """(reply subject, request digest) of everyone waiting for the result."""
    result: bytes | None = None
    execution: Execution | None = None

    def same_request(self, capability: str, args: dict[str, Any]) -> bool:
        return self.capability == capability and self.args == args


class JobTable:
    """Jobs by (submitter, job id): in flight, and done (bounded by count and result bytes)."""

    def __init__(self, max_entries: int = 100_000, max_result_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_result_bytes = max_result_bytes
        self._inflight: dict[tuple[str, str], JobEntry] = {}
        self._done: OrderedDict[tuple[str, str], JobEntry] = OrderedDict()
        self._bytes = 0

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def __len__(self) -> int:
        return len(self._inflight) + len(self._done)

    def get(self, key: tuple[str, str], now_ms: int) -> JobEntry | None:
        entry = self._inflight.get(key)
        if entry is not None:
            return entry
        entry = self._done.get(key)
        if entry is not None and entry.keep_until_ms < now_ms:
            self._drop(key)
            return None
        return entry

    def add(self, key: tuple[str, str], entry: JobEntry) -> None:
        self._inflight[key] = entry

    def complete(self, key: tuple[str, str], result: bytes, execution: Execution, now_ms: int) -> JobEntry:
        """Store the result; returns the entry, whose ``replies`` are still to be answered."""
        entry = self._inflight.pop(key)
        entry.result = result
        entry.execution = execution
        self._done[key] = entry
        self._bytes += len(result)
        self._evict(now_ms)
        return entry

    def forget(self, key: tuple[str, str]) -> None:
        """Drop an in-flight job that will never complete (worker shutting down)."""
        self._inflight.pop(key, None)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._done.pop(key)
        self._bytes -= len(entry.result or b"")

    def _evict(self, now_ms: int) -> None:
        # Completion order approximates expiry order; an entry stuck behind a
        # longer-lived one is kept a little longer, which is the safe side.
        done = self._done
        while done:
            key, entry = next(iter(done.items()))
            over = len(done) > self.max_entries or self._bytes > self.max_result_bytes
            if not over and entry.keep_until_ms >= now_ms:
                break
            self._drop(key)


#: Mesh-wide claims of live envelopes' nonces, so a replayed envelope never
#: runs twice anywhere in the mesh. Kept for two hours: longer than the
#: longest validity a worker accepts for a live envelope (one hour) plus skew.
CLAIMS = BucketSpec("claims", ttl_s=2 * 3600.0)
STATE: tuple[StateSpec, ...] = (CLAIMS,)


def claim_key(submitter: str, nonce: str) -> str:
    """One key per (submitter, nonce): a hash, so keys stay short and valid KV tokens."""
    return hashlib.sha256(f"{submitter}\0{nonce}".encode()).hexdigest()[:40]
