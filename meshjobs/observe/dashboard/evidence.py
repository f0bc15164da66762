"""Rows of the dashboard's jobs panel: from signed evidence and from durable job states.

A row is a plain dict: ``key`` (one row per piece of evidence, one per
durable job, updated as it moves), ``source``, ``job_id``, ``capability``,
``status``, ``latency_ms``, ``peer`` (who ran it), ``by`` (who reported it),
``at_ms`` and ``detail``.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from meshjobs.state import DOMAIN, read_subject
from meshjobs.trust.reputation import STREAM, SUBJECT, Evidence

#: Durable jobs whose queueing time is remembered (to tell their latency when they finish).
MAX_QUEUED_REMEMBERED = 10_000
FINAL_STATES = frozenset({"done", "failed", "dead"})


def evidence_row(evidence: Evidence) -> dict[str, Any]:
    """A verified piece of evidence as a row: the outcome its submitter saw and signed."""
    return {
        "key": f"evidence:{evidence.id}",
        "source": "evidence",
        "job_id": evidence.job_id,
        "capability": evidence.capability,
        "status": evidence.kind,
        "latency_ms": None if evidence.latency_ms is None else round(evidence.latency_ms, 3),
        "peer": evidence.peer,
        "by": evidence.submitter,
        "at_ms": evidence.at_ms,
        "detail": evidence.detail,
    }


def _text(data: dict[str, Any], key: str, limit: int = 1000) -> str:
    value = data.get(key, "")
    return value[:limit] if isinstance(value, str) else ""


def state_row(key: str, value: bytes, queued_at: dict[str, int]) -> dict[str, Any] | None:
    """A durable job's state (``jobs`` bucket, signed by its writer) as a row, or None for junk.

    *queued_at* remembers when jobs were queued, so a finished job's row tells
    how long it took from queueing to its final state.
    """
    from meshjobs.durable import decode_state

    decoded = decode_state(value)  # signed by its writer; keyed <submitter>.<job id>
    if decoded is None or key.rsplit(".", 1)[-1] != decoded.job_id:
        return None
    data = decoded.as_dict()
    key = decoded.job_id
    updated = data.get("updated_ms")
    at_ms = updated if isinstance(updated, int) and not isinstance(updated, bool) else 0
    state = _text(data, "state", 32)
    latency = None
    if state == "queued":
        queued_at.pop(key, None)
        queued_at[key] = at_ms
        while len(queued_at) > MAX_QUEUED_REMEMBERED:
            del queued_at[next(iter(queued_at))]
    elif state in FINAL_STATES and key in queued_at and at_ms >= queued_at[key]:
        latency = float(at_ms - queued_at.pop(key))
    attempts = data.get("attempts")
    return {
        "key": f"durable:{key}",
        "source": "durable",
        "job_id": key,
        "capability": _text(data, "capability", 128),
        "status": state,
        "latency_ms": latency,
        "peer": _text(data, "worker", 64),
        "by": _text(data, "submitter", 64),
        "at_ms": at_ms,
        "detail": _text(data, "detail"),
        "attempts": attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None,
    }


async def recent_evidence(nc: NATS, count: int) -> list[bytes]:
    """The last *count* pieces of evidence in the evidence stream (unverified frames), oldest first."""
    js = nc.jetstream(domain=DOMAIN, timeout=5.0)
    info = await js.stream_info(STREAM)
    state = info.state
    if not state.messages or count <= 0:
        return []
    start = max(state.first_seq, state.last_seq - count + 1)
    msgs = await read_subject(js, STREAM, f"{SUBJECT}.>", start_seq=start, limit=count)
    return [m.data for m in msgs]
