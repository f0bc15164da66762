"""Signed discovery manifests, and operators' attestations of what a peer is. Pure: no network.

A worker's discovery answer carries a **manifest** (``MJ1M``) signed by its own
key: its name, kind, region, community, the capabilities it offers (with their
tags and whether they are deterministic), its price and its free slots. A
reader keeps a peer only when the manifest verifies and names the key and
instance that answered, so nobody can advertise another peer's key, and the
capabilities a router acts on are the ones the peer signed for.

What a peer says about itself is still only a claim. An **attestation**
(``MJ1S``) is an operator's signed statement about one peer key: its kind,
region and/or community, optionally until an expiry. The worker carries it in
its manifest (``meshjobs worker --attestation FILE``; ``meshjobs attest`` makes
one); a reader counts it only when the signer is an operator of the reader's
own trust policy. A manifest signed by such an operator's own key is attested
as a whole. Routing that asks for a kind or a region (``--kind human``,
``--region eu``) takes attested peers only; discovery shows attested and
claimed values apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from meshjobs.compare import MAX_SPEC, valid_comparison
from meshjobs.envelope import (
    ATTESTATION_MAGIC,
    MANIFEST_MAGIC,
    Wire,
    now_ms,
    open_statement,
    seal_statement,
    valid_key,
)
from meshjobs.errors import Reason, Rejected, UsageError
from meshjobs.identity import Identity, is_public_key

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
KIND_PATTERN = r"^[a-z][a-z0-9-]{0,15}$"
#: The fields an attestation can vouch for.
ATTESTABLE = ("kind", "region", "community")
#: A manifest older than this (or this far in the future) is stale: a replay, or a clock gone wrong.
MANIFEST_MAX_AGE_MS = 10 * 60 * 1000
MAX_ATTESTATIONS = 8
MAX_ATTESTATION_BYTES = 4096


class Offer(Wire):
    """One capability as the manifest offers it."""

    name: str = Field(max_length=256)
    deterministic: bool = False
    tags: list[str] = Field(default_factory=list, max_length=32)
    compare: str | None = Field(None, max_length=MAX_SPEC)
    """When two results count as the same (:mod:`meshjobs.compare`); None: exact."""

    _compare = field_validator("compare")(valid_comparison)


class Manifest(Wire):
    """What a worker process says about itself, signed by its key."""

    version: int = Field(default=1, ge=1, le=1)
    peer: str
    instance: str = Field(max_length=64)
    name: str = Field(default="", max_length=128)
    kind: str = Field(pattern=KIND_PATTERN)
    region: str = Field(default="", max_length=63)
    community: str = Field(default="", max_length=63)
    capabilities: list[Offer] = Field(default_factory=list, max_length=1024)
    price: float = Field(default=0.0, ge=0.0, le=1e12)
    """What the peer asks per job, in whatever unit the mesh agrees on (0: free)."""
    slots: int = Field(default=0, ge=0, le=1_000_000)
    """Jobs it could start right now."""
    issued_at: int = Field(ge=0)
    attestations: list[str] = Field(default_factory=list, max_length=MAX_ATTESTATIONS)
    """Operators' ``MJ1S`` frames about this peer, as text."""

    _peer = field_validator("peer")(valid_key)

    @field_validator("region", "community")
    @classmethod
    def _label(cls, value: str) -> str:
        return check_label(value, "label") if value else value


class Attestation(Wire):
    """An operator's signed word on what one peer key is."""

    version: int = Field(default=1, ge=1, le=1)
    operator: str
    peer: str
    kind: str | None = Field(default=None, pattern=KIND_PATTERN)
    region: str | None = Field(default=None, max_length=63)
    community: str | None = Field(default=None, max_length=63)
    issued_at: int = Field(ge=0)
    expires_at: int | None = Field(default=None, ge=0)

    _keys = field_validator("operator", "peer")(valid_key)

    @field_validator("region", "community")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        return check_label(value, "label") if value is not None else value

    def vouches(self) -> dict[str, str]:
        """The fields this attestation sets: ``{"kind": "human", "region": "eu"}``."""
        return {f: v for f in ATTESTABLE if (v := getattr(self, f)) is not None}


def check_label(value: str, what: str) -> str:
    """A region or community label: letters, digits, ``_.-``, at most 63 characters."""
    if not re.match(LABEL_PATTERN, value):
        raise ValueError(f"{what} {value[:40]!r} must be 1-63 letters, digits, '_', '.' or '-'")
    return value


def attest(
    operator: Identity,
    peer: str,
    *,
    kind: str | None = None,
    region: str | None = None,
    community: str | None = None,
    valid_for_s: float | None = None,
) -> bytes:
    """Sign an attestation of *peer* (an ``MJ1S`` frame). Raises :class:`UsageError` on bad input."""
    if not is_public_key(peer):
        raise UsageError(f"{peer[:20]!r} is not a peer public key (as `meshjobs id` prints it)")
    if kind is None and region is None and community is None:
        raise UsageError("an attestation must vouch for at least one of --kind, --region, --community")
    issued = now_ms()
    expires = issued + int(valid_for_s * 1000) if valid_for_s is not None else None
    try:
        statement = Attestation(
            operator=operator.public_key,
            peer=peer,
            kind=kind,
            region=region,
            community=community,
            issued_at=issued,
            expires_at=expires,
        )
    except ValueError as exc:
        raise UsageError(f"bad attestation: {_first_error(exc)}") from None
    return seal_statement(ATTESTATION_MAGIC, operator, statement)


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(exc)


def open_attestation(frame: bytes | str, *, now: int | None = None) -> Attestation:
    """Verify an attestation frame: signature, shape, not expired. Raises :class:`Rejected`."""
    data = frame.encode() if isinstance(frame, str) else frame
    statement = open_statement(ATTESTATION_MAGIC, Attestation, "operator", data, MAX_ATTESTATION_BYTES)
    if statement.expires_at is not None and statement.expires_at <= (now if now is not None else now_ms()):
        raise Rejected(Reason.EXPIRED, "the attestation has expired")
    return statement


def check_attestations(frames: Iterable[bytes], peer: str) -> tuple[str, ...]:
    """Attestation frames a worker was given, checked before it starts: each valid and about *peer*."""
    out = []
    for frame in frames:
        try:
            statement = open_attestation(frame)
        except Rejected as exc:
            raise UsageError(f"attestation refused: {exc}") from None
        if statement.peer != peer:
            raise UsageError(f"the attestation is for peer {statement.peer[:12]}…, not this worker's key {peer[:12]}…")
        out.append(frame.decode())
    if len(out) > MAX_ATTESTATIONS:
        raise UsageError(f"at most {MAX_ATTESTATIONS} attestations")
    return tuple(out)


def seal_manifest(identity: Identity, manifest: dict[str, Any]) -> bytes:
    """Sign a manifest for *identity* (fields as :class:`Manifest`; ``peer`` and ``issued_at`` filled in)."""
    model = Manifest(**{**manifest, "peer": identity.public_key, "issued_at": now_ms()})
    return seal_statement(MANIFEST_MAGIC, identity, model)


@dataclass(frozen=True)
class Checked:
    """A verified manifest, and which of its fields an operator this reader trusts has attested."""

    manifest: Manifest
    attested: dict[str, str]
    """Field -> attested value (the operator's word wins over the peer's claim)."""
    attesters: tuple[str, ...]


def open_manifest(frame: str | bytes, operators: frozenset[str], *, now: int | None = None) -> Checked:
    """Verify a manifest and count the attestations signed by *operators*. Raises :class:`Rejected`."""
    data = frame.encode() if isinstance(frame, str) else frame
    manifest = open_statement(MANIFEST_MAGIC, Manifest, "peer", data)
    now = now if now is not None else now_ms()
    if abs(now - manifest.issued_at) > MANIFEST_MAX_AGE_MS:
        raise Rejected(Reason.EXPIRED, "the manifest is stale (or the clocks disagree by over 10 minutes)")
    attested: dict[str, str] = {}
    attesters: list[str] = []
    if manifest.peer in operators:
        # An operator's own worker: its word is an operator's word.
        attested.update({f: getattr(manifest, f) for f in ATTESTABLE if getattr(manifest, f)})
        attesters.append(manifest.peer)
    for text in manifest.attestations:
        try:
            statement = open_attestation(text, now=now)
        except Rejected:
            continue
        if statement.peer != manifest.peer or statement.operator not in operators:
            continue
        attested.update(statement.vouches())
        attesters.append(statement.operator)
    return Checked(manifest, attested, tuple(dict.fromkeys(attesters)))


def expiry_text(expires_at: int | None) -> str:
    """When an attestation runs out, for people."""
    if expires_at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires_at / 1000))
