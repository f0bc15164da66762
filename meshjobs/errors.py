"""The one exception tree of meshjobs.

Everything meshjobs raises on purpose derives from :class:`MeshError`. Each
class carries the exit code the CLI uses for it, so the CLI never has to guess::

    MeshError                      exit 2 unless a subclass says otherwise
    ├── UsageError                 2  bad input: arguments, capability names, JSON
    │   └── InvalidArguments       2  arguments do not match a handler's signature
    ├── IdentityError              2  key file missing, malformed, too open, too large
    │   └── InvalidKey             2  text that is not a valid nkey (also a ValueError)
    ├── PolicyFileError            2  trust file malformed
    ├── BrokerError                2  the embedded nats-server could not start
    ├── ImageError                 2  a container image could not be built
    ├── ConnectError               3  no broker reachable at the given URL
    ├── KeyExists                  2  a create or compare-and-set on mesh state lost the race
    ├── NoPeerError                3  nobody offers the capability
    ├── JobTimeout                 4  no final answer before the deadline
    ├── HandlerError               1  the handler ran and failed
    └── Rejected                   5  refused: signature, trust, policy, replay, expiry
        └── (reason codes in :class:`Reason`)

NATS exceptions are translated to these in :mod:`meshjobs._nats`, always with
``raise ... from`` so the original stays visible when debugging.
"""

from __future__ import annotations

import enum
from typing import Any


class Reason(enum.StrEnum):
    """Stable, machine-readable reason codes for every rejection.

    The values are part of the wire format and of ``--json`` output: never
    rename one, only add.
    """

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_VERSION = "unknown_version"
    SCHEMA = "schema"
    BAD_CAPABILITY = "bad_capability"
    WRONG_AUDIENCE = "wrong_audience"
    KEY_MISMATCH = "key_mismatch"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAY = "replay"
    UNTRUSTED = "untrusted"
    UNKNOWN_CAPABILITY = "unknown_capability"
    JOB_CONFLICT = "job_conflict"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    RESULT_MISMATCH = "result_mismatch"
    DENIED = "denied"
    QUARANTINED = "quarantined"
    NO_QUORUM = "no_quorum"
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"
    NOT_APPROVED = "not_approved"
    APPROVAL_TIMEOUT = "approval_timeout"


#: Rejections a client may answer by trying again with the same job id.
RETRYABLE_REASONS = frozenset({Reason.OVERLOADED, Reason.SHUTTING_DOWN, Reason.UNAVAILABLE})

#: One human sentence per reason, used when nothing more specific is known.
REASON_TEXT: dict[Reason, str] = {
    Reason.TOO_LARGE: "the message is larger than the size limit",
    Reason.MALFORMED: "the message is not a well-formed meshjobs frame",
    Reason.BAD_SIGNATURE: "the signature does not match the signed bytes",
    Reason.UNKNOWN_VERSION: "the message uses a version this peer does not know",
    Reason.SCHEMA: "the message has missing, unknown or ill-typed fields",
    Reason.BAD_CAPABILITY: "the capability name is not valid",
    Reason.WRONG_AUDIENCE: "the message arrived on a subject it was not signed for",
    Reason.KEY_MISMATCH: "the signing key does not match the key named in the body",
    Reason.EXPIRED: "the message has expired",
    Reason.NOT_YET_VALID: "the message is dated in the future beyond the allowed clock skew",
    Reason.REPLAY: "this nonce was already used",
    Reason.UNTRUSTED: "the submitter is not trusted by this worker",
    Reason.UNKNOWN_CAPABILITY: "this worker does not offer that capability",
    Reason.JOB_CONFLICT: "the job id was already used for a different request",
    Reason.OVERLOADED: "the worker is overloaded",
    Reason.SHUTTING_DOWN: "the worker is shutting down",
    Reason.RESULT_MISMATCH: "the result is not bound to the request that was sent",
    Reason.DENIED: "the submitter may not run this capability on this worker",
    Reason.QUARANTINED: "the peer is quarantined",
    Reason.NO_QUORUM: "not enough peers agreed on the result",
    Reason.QUEUE_FULL: "the job queue is full",
    Reason.NOT_APPROVED: "an approver rejected the job",
    Reason.APPROVAL_TIMEOUT: "the approval did not come before the deadline",
    Reason.UNAVAILABLE: "the worker cannot reach mesh state right now; try again",
}


class MeshError(Exception):
    """Base of every error meshjobs raises on purpose."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: For routed submissions: every peer tried (router Attempts), for ``--trace``.
        self.trace: list[Any] = []

    def __str__(self) -> str:
        return self.message


class UsageError(MeshError):
    """Bad input from the caller: arguments, names, JSON."""

    exit_code = 2


class InvalidArguments(UsageError):
    """The arguments did not match the handler's signature (exit 2 for the submitter)."""


class IdentityError(MeshError):
    """A key file is missing, malformed, too large or readable by others."""

    exit_code = 2


class InvalidKey(IdentityError, ValueError):
    """Text that is not a well-formed nkey. Also a ValueError, so pydantic validators report it as one."""


class PolicyFileError(MeshError):
    """A trust file cannot be read or does not follow the documented format."""

    exit_code = 2


class BrokerError(MeshError):
    """The embedded nats-server could not be started or stopped."""

    exit_code = 2


class ImageError(MeshError):
    """A container image could not be built (no Docker engine, a failed build, no wheel for the base)."""

    exit_code = 2


class ConnectError(MeshError):
    """No NATS server could be reached."""

    exit_code = 3


class KeyExists(MeshError):
    """A create or compare-and-set lost: the key is not at the expected revision.

    Callers catch it to retry or dedupe; it reaches a user only as a bug.
    """

    exit_code = 2


class NoPeerError(MeshError):
    """No peer answered for the capability."""

    exit_code = 3


class JobTimeout(MeshError):
    """No final answer arrived before the deadline."""

    exit_code = 4


class HandlerError(MeshError):
    """The handler ran on a peer and failed; ``result`` is the signed record."""

    exit_code = 1

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class Rejected(MeshError):
    """A message was refused. ``reason`` is a stable :class:`Reason` code."""

    exit_code = 5

    def __init__(self, reason: Reason | str, message: str | None = None, result: Any = None) -> None:
        # A newer peer may send a code we do not know yet: keep it as a string.
        try:
            reason = Reason(reason)
        except ValueError:
            pass
        default = REASON_TEXT[reason] if isinstance(reason, Reason) else "rejected"
        super().__init__(message or default)
        self.reason: Reason | str = reason
        self.result = result

    @property
    def code(self) -> str:
        return self.reason.value if isinstance(self.reason, Reason) else self.reason

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"
