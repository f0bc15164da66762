"""Wire format of signed command envelopes and signed results. Pure: no network.

A frame is ASCII header, newline, UTF-8 JSON body::

    MJ1E <signer key, 56 chars> <Ed25519 signature, base64url, 86 chars>\\n{json body}

``MJ1E`` marks an envelope, ``MJ1R`` a result (and ``MJ1V`` evidence, ``MJ1Q``
a quarantine order, ``MJ1T`` a trust service's record, ``MJ1D`` an AI draft,
``MJ1A`` an approval, ``MJ1M`` a discovery manifest, ``MJ1S`` an attestation,
``MJ1H`` what a person's inbox holds).
The signature covers a fixed domain-separation prefix followed by the exact
body bytes that travel, so it is checked before the body is parsed at all; only then is the body decoded,
strictly (UTF-8, no duplicate keys, no NaN or Infinity, bounded depth, no
unknown fields, known version only), and the signer in the header must be the
key the body names.

Every failure raises :class:`~meshjobs.errors.Rejected` with a stable reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshjobs.errors import REASON_TEXT, Reason, Rejected
from meshjobs.identity import Identity, is_public_key, verify
from meshjobs.subjects import capability_problem

VERSION = 1
ENVELOPE_MAGIC = b"MJ1E"
RESULT_MAGIC = b"MJ1R"
EVIDENCE_MAGIC = b"MJ1V"
QUARANTINE_MAGIC = b"MJ1Q"
DRAFT_MAGIC = b"MJ1D"  # an AI persona's signed draft, carried inside a hybrid peer's result
#: A record of the trust service (a peer's reputation, or the service's own progress).
TRUST_MAGIC = b"MJ1T"
#: An approver's signed decision on a gated job or a held result (meshjobs.workflow.approval).
APPROVAL_MAGIC = b"MJ1A"
#: A worker's signed claim of one delivery of a durable job (meshjobs.jobrecords).
CLAIM_MAGIC = b"MJ1C"
#: A durable job's state, signed by whoever wrote it: its submitter or a claiming worker.
STATE_MAGIC = b"MJ1J"
#: A worker's signed discovery manifest, and an operator's attestation of a peer (meshjobs.manifest).
MANIFEST_MAGIC = b"MJ1M"
ATTESTATION_MAGIC = b"MJ1S"
#: What a person's inbox holds of one capability, announced to the other inboxes (meshjobs.peers.desk).
HOLDING_MAGIC = b"MJ1H"
#: One domain-separation prefix per kind of signed statement: a signature
#: made for one kind can never be passed off as another.
DOMAIN = {
    ENVELOPE_MAGIC: b"meshjobs/1 envelope\x00",
    RESULT_MAGIC: b"meshjobs/1 result\x00",
    EVIDENCE_MAGIC: b"meshjobs/1 evidence\x00",
    QUARANTINE_MAGIC: b"meshjobs/1 quarantine\x00",
    DRAFT_MAGIC: b"meshjobs/1 draft\x00",
    TRUST_MAGIC: b"meshjobs/1 trust record\x00",
    APPROVAL_MAGIC: b"meshjobs/1 approval\x00",
    CLAIM_MAGIC: b"meshjobs/1 job claim\x00",
    STATE_MAGIC: b"meshjobs/1 job state\x00",
    MANIFEST_MAGIC: b"meshjobs/1 manifest\x00",
    ATTESTATION_MAGIC: b"meshjobs/1 attestation\x00",
    HOLDING_MAGIC: b"meshjobs/1 desk holding\x00",
}
_KEY_LEN = 56
_SIG_LEN = 86
HEADER_LEN = 4 + 1 + _KEY_LEN + 1 + _SIG_LEN + 1
#: Default size cap for a whole frame; NATS' own default max_payload is 1 MiB.
MAX_FRAME_BYTES = 1024 * 1024
MAX_DEPTH = 32

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
NONCE_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"

Status = Literal["ok", "error", "invalid", "timeout", "rejected", "running"]
FINAL_STATUSES = frozenset({"ok", "error", "invalid", "timeout", "rejected"})


class Wire(BaseModel):
    """Base of every signed wire model: frozen, strict, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


W = TypeVar("W", bound=Wire)


def valid_capability(value: str) -> str:
    """A field validator: *value* is a capability name (:func:`~meshjobs.subjects.capability_problem`)."""
    if problem := capability_problem(value):
        raise ValueError(problem)
    return value


def valid_key(value: str) -> str:
    """A field validator: *value* is a user public key (Ed25519, NATS nkey form)."""
    if not is_public_key(value):
        raise ValueError("not a valid user public key")
    return value


class Envelope(Wire):
    """A signed request to run one capability once."""

    version: Literal[1]
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    capability: str
    audience: str = Field(max_length=256)
    submitter: str
    nonce: str = Field(pattern=NONCE_PATTERN)
    issued_at: int = Field(ge=0, description="milliseconds since the Unix epoch")
    expires_at: int = Field(ge=0, description="milliseconds since the Unix epoch")
    args: dict[str, Any]
    reply: str | None = Field(default=None, max_length=256)
    """The subject the answer must go to (the submitter's own inbox). A worker
    answers a live envelope only there, so a captured envelope replayed with
    another reply subject gets nothing back. None: durable jobs, no answer."""

    _key = field_validator("submitter")(valid_key)

    _capability = field_validator("capability")(valid_capability)


class ErrorInfo(Wire):
    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)


class Provenance(Wire):
    """Signed statements a result rests on, embedded as frames anyone can verify again.

    ``approval``: the approver's ``MJ1A`` decision that let a gated job run
    (see :mod:`meshjobs.workflow.approval`).
    """

    approval: str | None = Field(default=None, max_length=16384)


class Result(Wire):
    """A worker's signed answer, bound to the job id and the request's digest."""

    version: Literal[1]
    job_id: str | None = Field(pattern=JOB_ID_PATTERN)
    request_digest: str = Field(pattern=DIGEST_PATTERN)
    worker: str
    status: Status
    value: Any = None
    error: ErrorInfo | None = None
    issued_at: int = Field(ge=0)
    provenance: Provenance | None = None
    """Absent (not null) on the wire when there is none, so such results keep their old bytes."""

    _key = field_validator("worker")(valid_key)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_job_id() -> str:
    """A random, time-ordered job id: 12 hex digits of milliseconds, 20 random."""
    return f"{now_ms():012x}{uuid.uuid4().hex[:20]}"


def new_nonce() -> str:
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


def digest(frame: bytes) -> str:
    """SHA-256 of a whole frame, as results bind it."""
    return hashlib.sha256(frame).hexdigest()


def _seal(magic: bytes, identity: Identity, body: bytes) -> bytes:
    signature = identity.sign(DOMAIN[magic] + body)
    sig = base64.urlsafe_b64encode(signature).rstrip(b"=")
    return b"".join((magic, b" ", identity.public_key.encode("ascii"), b" ", sig, b"\n", body))


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from exc


def open_frame(magic: bytes, data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> tuple[str, bytes]:
    """Check size, header and signature of a frame. Returns (signer key, body bytes)."""
    if len(data) > max_bytes:
        raise Rejected(Reason.TOO_LARGE, f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    if (
        len(data) <= HEADER_LEN
        or data[:4] != magic
        or data[4:5] != b" "
        or data[5 + _KEY_LEN : 6 + _KEY_LEN] != b" "
        or data[HEADER_LEN - 1 : HEADER_LEN] != b"\n"
    ):
        if data[:2] == b"MJ" and data[2:3] != b"1" and data[2:3].isdigit():
            raise Rejected(Reason.UNKNOWN_VERSION, f"frame version {data[2:3]!r} is not supported")
        raise Rejected(Reason.MALFORMED)
    encoded = data[6 + _KEY_LEN : HEADER_LEN - 1]
    try:
        key = data[5 : 5 + _KEY_LEN].decode("ascii")
        signature = base64.urlsafe_b64decode(encoded + b"==")
    except (UnicodeDecodeError, binascii.Error, ValueError):
        raise Rejected(Reason.MALFORMED, "the frame header is not valid") from None
    # Only the canonical encoding is accepted: the last character carries 4
    # unused bits, and a frame must not have several valid spellings.
    if base64.urlsafe_b64encode(signature).rstrip(b"=") != encoded:
        raise Rejected(Reason.MALFORMED, "the signature is not canonically encoded")
    body = data[HEADER_LEN:]
    if len(signature) != 64 or not verify(key, DOMAIN[magic] + body, signature):
        raise Rejected(Reason.BAD_SIGNATURE)
    return key, body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        dupes = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dupes[0]!r}")
    return result


def _check_tree(value: Any, max_depth: int) -> None:
    # Iterative walk: bounded depth, and no lone surrogates (from "\ud800"
    # escapes), which would pass parsing but break every later encoding.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise ValueError(f"nesting deeper than {max_depth} levels")
            for key, child in item.items():
                key.encode("utf-8")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise ValueError(f"nesting deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            item.encode("utf-8")


def loads_strict(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON strictly. Raises ValueError with a short reason.

    UTF-8 only, no duplicate keys, no NaN/Infinity (nor numbers that overflow
    to them), depth at most *max_depth*.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not valid UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise ValueError(f"nesting deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    # Fast path: with few brackets the depth bound holds trivially; the walk
    # is still needed when escapes could have produced lone surrogates.
    if text.count("[") + text.count("{") > max_depth or "\\u" in text:
        try:
            _check_tree(value, max_depth)
        except UnicodeEncodeError:
            raise ValueError("string contains a lone surrogate") from None
    return value


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        obj = loads_strict(body)
    except ValueError as exc:
        raise Rejected(Reason.MALFORMED, f"body rejected: {exc}") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED, "body is not a JSON object")
    if obj.get("version") != VERSION:
        raise Rejected(Reason.UNKNOWN_VERSION, f"version {obj.get('version')!r} is not supported")
    return obj


def _schema_error(exc: ValidationError) -> Rejected:
    first = exc.errors()[0]
    if first["loc"][:1] == ("capability",):
        return Rejected(Reason.BAD_CAPABILITY, str(first["msg"]).removeprefix("Value error, "))
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return Rejected(Reason.SCHEMA, f"{REASON_TEXT[Reason.SCHEMA]}: {where}: {first['msg']}")


def seal_envelope(
    identity: Identity,
    capability: str,
    args: dict[str, Any],
    *,
    audience: str,
    job_id: str,
    ttl_ms: int,
    issued_at: int | None = None,
    reply: str | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Build and sign an envelope. Returns the body and the frame bytes to send.

    The body is checked by the same model a worker uses, so a submitter never
    sends what a worker would refuse for its shape.
    """
    issued = now_ms() if issued_at is None else issued_at
    body = {
        "version": VERSION,
        "job_id": job_id,
        "capability": capability,
        "audience": audience,
        "submitter": identity.public_key,
        "nonce": new_nonce(),
        "issued_at": issued,
        "expires_at": issued + ttl_ms,
        "args": args,
    }
    if reply is not None:
        body["reply"] = reply
    try:
        Envelope.model_validate(body)
    except ValidationError as exc:
        raise ValueError(str(_schema_error(exc))) from None
    return body, _seal(ENVELOPE_MAGIC, identity, _dumps(body))


def claimed_signer(data: bytes) -> str | None:
    """The key a frame's header names, unverified: for cheap triage before any crypto.

    Never trust it for anything but deciding how much work to spend on the
    frame (a stranger's frame is refused without verifying its signature).
    """
    if len(data) <= HEADER_LEN or data[4:5] != b" " or data[5 + _KEY_LEN : 6 + _KEY_LEN] != b" ":
        return None
    try:
        return data[5 : 5 + _KEY_LEN].decode("ascii")
    except UnicodeDecodeError:
        return None


def open_envelope(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Verify then strictly decode an envelope frame. Time and trust are checked elsewhere."""
    return _open(ENVELOPE_MAGIC, Envelope, "submitter", data, max_bytes)


def seal_statement(magic: bytes, identity: Identity, model: Wire) -> bytes:
    """Sign any wire model as a frame of kind *magic* (evidence, quarantine orders)."""
    return _seal(magic, identity, _dumps(model.model_dump(mode="json")))


def open_statement(magic: bytes, model: type[W], signer_field: str, data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> W:
    """Verify then strictly decode a frame of kind *magic* signed by the key in *signer_field*."""
    return _open(magic, model, signer_field, data, max_bytes)


def _open(magic: bytes, model: type[W], signer_field: str, data: bytes, max_bytes: int) -> W:
    signer, body = open_frame(magic, data, max_bytes)
    obj = _parse_body(body)
    try:
        value = model.model_validate(obj)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    if getattr(value, signer_field) != signer:
        raise Rejected(Reason.KEY_MISMATCH)
    return value


def check_window(envelope: Envelope, now: int, skew_ms: int, max_ttl_ms: int) -> None:
    """Refuse envelopes outside their validity window (with clock-skew tolerance)."""
    if envelope.expires_at <= envelope.issued_at:
        raise Rejected(Reason.SCHEMA, "expires_at must be after issued_at")
    if envelope.expires_at - envelope.issued_at > max_ttl_ms:
        raise Rejected(Reason.SCHEMA, f"validity longer than the {max_ttl_ms // 1000} s this worker accepts")
    if envelope.issued_at > now + skew_ms:
        raise Rejected(Reason.NOT_YET_VALID)
    if now > envelope.expires_at + skew_ms:
        raise Rejected(Reason.EXPIRED)


def seal_result(
    identity: Identity,
    *,
    request_digest: str,
    job_id: str | None,
    status: str,
    value: Any = None,
    error: tuple[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> bytes:
    """Build and sign a result frame (*provenance*: a :class:`Provenance` as a dict, or None)."""
    body: dict[str, Any] = {
        "version": VERSION,
        "job_id": job_id,
        "request_digest": request_digest,
        "worker": identity.public_key,
        "status": status,
        "value": value,
        "error": {"code": error[0], "message": error[1][:4096]} if error else None,
        "issued_at": now_ms(),
    }
    if provenance is not None:
        body["provenance"] = Provenance.model_validate(provenance).model_dump(mode="json", exclude_none=True)
    return _seal(RESULT_MAGIC, identity, _dumps(body))


def open_result(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Result:
    """Verify then strictly decode a result frame."""
    return _open(RESULT_MAGIC, Result, "worker", data, max_bytes)


def result_body(data: bytes) -> dict[str, Any]:
    """The JSON body of an already verified frame, for ``--json`` output."""
    body: dict[str, Any] = json.loads(data[HEADER_LEN:])
    return body
