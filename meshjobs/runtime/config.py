"""How a worker runs: one validated, frozen settings object shared by both runners.

Durations carry their unit in the name (``_s``: seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshjobs.envelope import MAX_FRAME_BYTES
from meshjobs.errors import UsageError
from meshjobs.manifest import check_label


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs. Every field has a sensible default."""

    concurrency: int = 16
    max_pending: int = 1024
    clock_skew_s: float = 60.0
    max_validity_s: float = 3600.0
    max_message_bytes: int = MAX_FRAME_BYTES
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    name: str | None = None
    region: str = ""
    community: str = ""
    durable: bool = True
    """Also consume durable jobs (JetStream), when the broker has JetStream."""
    max_attempts: int = 5
    """Runs of a durable job whose handler fails before it goes to the dead-letter queue."""
    retry_delay_s: float = 1.0
    """First delay before a failed durable job runs again; doubles each time."""
    max_durable_validity_s: float = 7 * 86400.0
    sender_rate: float = 2000.0
    """Envelopes per second one submitter key may send this worker (burst: twice that)."""
    refusal_rate: float = 100.0
    """Signed rejections per second this worker sends at most; further junk is dropped unanswered."""
    price: float = 0.0
    """What this worker asks per job, shown in its signed manifest (submitters filter with ``max_price``)."""
    attestations: tuple[bytes, ...] = ()
    """Operators' signed attestations of this worker's kind, region or community (``meshjobs attest``)."""

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_pending", "max_message_bytes", "sender_rate", "refusal_rate"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        for name in ("clock_skew_s", "max_validity_s", "heartbeat_interval_s", "drain_timeout_s", "price"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} cannot be negative")
        if not math.isfinite(self.price) or self.price > 1e12:
            raise UsageError("price must be a finite number of at most 1e12")
        for name in ("region", "community"):
            if value := getattr(self, name):
                try:
                    check_label(value, name)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
