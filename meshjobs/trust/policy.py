"""Who may run what on a worker; whose orders, records and results count. Pure but for reading a file.

The default policy trusts the worker's own key plus every key listed in the
trust file (``$MESHJOBS_HOME/trust.toml``, or ``--trust FILE``)::

    # Submitters this worker runs commands for. Its own key is always trusted.
    [[peer]]
    key = "UD3K..."                 # the submitter's public key, as `meshjobs id` prints it
    name = "alice"                  # optional, display only
    capabilities = ["demo.*"]       # optional: only these (default: every capability)

    # Operators: their signed quarantine orders are honoured.
    [[operator]]
    key = "UAOP..."
    name = "ops"

    # Trust services whose signed reputation records count (none listed: this peer's own key).
    [[trust_service]]
    key = "UTRU..."

    # For a trust service: keys whose evidence and votes count fully from the start
    # (EigenTrust's pre-trusted peers; operators count fully too).
    [[pretrusted]]
    key = "UPRE..."

    # For a submitter: accept results only from these workers or communities (none listed: anyone).
    [[accept]]
    key = "UWRK..."                 # a worker key
    [[accept]]
    community = "lab"               # or every worker of a community (as discovery reports it)

Capability patterns use NATS wildcards on dot-separated tokens: ``*`` is one
token, ``>`` (last) is one or more. Unknown fields are errors, so a typo never
silently changes who is trusted.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshjobs._files import read_local_file
from meshjobs.errors import PolicyFileError, Reason, Rejected
from meshjobs.identity import decode_public

TRUST_FILE = "trust.toml"
MAX_TRUST_FILE_BYTES = 1024 * 1024


def pattern_matches(pattern: str, capability: str) -> bool:
    """NATS-style match of a capability pattern (``*`` one token, ``>`` the rest)."""
    want, have = pattern.split("."), capability.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


@dataclass(frozen=True)
class TrustPolicy:
    """Submitter keys a worker accepts envelopes from (optionally per capability), and operators."""

    keys: frozenset[str] = frozenset()
    names: dict[str, str] = field(default_factory=dict, compare=False)
    capabilities: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    operators: frozenset[str] = frozenset()
    trust_services: frozenset[str] = frozenset()
    """Keys whose signed reputation records count; empty: the reader's own key."""
    pretrusted: frozenset[str] = frozenset()
    """Keys a trust service trusts fully from the start (as it does operators)."""
    accept_workers: frozenset[str] = frozenset()
    accept_communities: frozenset[str] = frozenset()
    """Whose results a submitter accepts; both empty: anyone's."""

    @property
    def restricts_results(self) -> bool:
        return bool(self.accept_workers or self.accept_communities)

    def accepts_result(self, worker: str, community: str = "") -> bool:
        """Whether a result from *worker* (of *community*) may be accepted under ``[[accept]]``."""
        if not self.restricts_results:
            return True
        return worker in self.accept_workers or bool(community and community in self.accept_communities)

    def check_result(self, worker: str, community: str = "") -> None:
        """Raise :class:`Rejected` (``untrusted``) unless :meth:`accepts_result`."""
        if not self.accepts_result(worker, community):
            where = f" of community {community}" if community else ""
            raise Rejected(Reason.UNTRUSTED, f"results from worker {worker[:12]}…{where} are not accepted here")

    def check(self, submitter: str, capability: str) -> None:
        """Raise :class:`Rejected` unless *submitter* may run *capability*."""
        if submitter not in self.keys:
            raise Rejected(Reason.UNTRUSTED, f"submitter {submitter[:12]}… is not in this worker's trust list")
        patterns = self.capabilities.get(submitter)
        if patterns is not None and not any(pattern_matches(p, capability) for p in patterns):
            raise Rejected(Reason.DENIED, f"submitter {submitter[:12]}… may not run {capability}")

    def with_key(self, key: str, name: str | None = None) -> TrustPolicy:
        """This policy plus *key*, trusted for every capability (a worker's own key)."""
        names = dict(self.names)
        if name:
            names[key] = name
        capabilities = {k: v for k, v in self.capabilities.items() if k != key}
        return dataclasses.replace(self, keys=self.keys | {key}, names=names, capabilities=capabilities)


_FIELDS = {
    "peer": {"key", "name", "capabilities"},
    "operator": {"key", "name"},
    "trust_service": {"key", "name"},
    "pretrusted": {"key", "name"},
    "accept": {"key", "community", "name"},
}
_COMMUNITY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _accept(where: str, raw: dict[str, Any]) -> tuple[str | None, str | None]:
    """An [[accept]] entry: exactly one of a worker key or a community name."""
    key, community = raw.get("key"), raw.get("community")
    if (key is None) == (community is None):
        raise PolicyFileError(f"{where}: give exactly one of 'key' (a worker) or 'community'")
    if community is not None and not (isinstance(community, str) and _COMMUNITY.match(community)):
        raise PolicyFileError(f"{where}: 'community' must be a community name like \"lab\"")
    return key, community


def _entry(path: Path, section: str, index: int, raw: Any) -> tuple[str, str | None, tuple[str, ...] | None]:
    where = f"{path}: {section} #{index + 1}"
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{where}: each [[{section}]] must be a table")
    unknown = set(raw) - _FIELDS[section]
    if unknown:
        allowed = ", ".join(sorted(_FIELDS[section]))
        raise PolicyFileError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: {allowed})")
    if section == "accept":
        _, community = _accept(where, raw)
        if community is not None:
            return f"community:{community}", None, None
    key = raw.get("key")
    if not isinstance(key, str):
        raise PolicyFileError(f"{where}: 'key' is required and must be a string")
    try:
        decode_public(key)
    except ValueError as exc:
        raise PolicyFileError(f"{where}: key {key[:16]!r}: {exc}") from None
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyFileError(f"{where}: 'name' must be a string")
    patterns = raw.get("capabilities")
    if patterns is not None:
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise PolicyFileError(f"{where}: 'capabilities' must be a list of patterns like \"demo.*\"")
        for pattern in patterns:
            tokens = pattern.split(".")
            if ">" in tokens[:-1] or any(not t for t in tokens):
                raise PolicyFileError(f"{where}: bad capability pattern {pattern!r}")
        patterns = tuple(patterns)
    return key, name, patterns


def parse_trust(text: str, path: Path) -> TrustPolicy:
    """Parse the trust file format documented in this module."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - set(_FIELDS)
    if unknown:
        expected = ", ".join(f"[[{s}]]" for s in _FIELDS)
        raise PolicyFileError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected {expected})")
    keys: dict[str, set[str]] = {section: set() for section in _FIELDS}
    names: dict[str, str] = {}
    capabilities: dict[str, tuple[str, ...]] = {}
    for section in _FIELDS:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise PolicyFileError(f"{path}: '{section}' must be an array of tables ([[{section}]])")
        for index, raw in enumerate(entries):
            key, name, patterns = _entry(path, section, index, raw)
            if name and not key.startswith("community:"):
                names[key] = name
            keys[section].add(key)
            if section == "peer" and patterns is not None:
                capabilities[key] = patterns
    accept = keys["accept"]
    return TrustPolicy(
        frozenset(keys["peer"]),
        names,
        capabilities,
        frozenset(keys["operator"]),
        trust_services=frozenset(keys["trust_service"]),
        pretrusted=frozenset(keys["pretrusted"]),
        accept_workers=frozenset(k for k in accept if not k.startswith("community:")),
        accept_communities=frozenset(k.removeprefix("community:") for k in accept if k.startswith("community:")),
    )


def load_trust(path: Path, *, required: bool) -> TrustPolicy:
    """Read a trust file. A missing file is an empty policy unless *required*.

    The file decides who may run what, so it must be a regular file (a
    symbolic link is followed to one) owned by this user or root that others
    may not write, nor its group unless that is the owner's private group;
    others may read it (it holds public keys only). FIFOs and devices are
    refused without waiting on them (see :mod:`meshjobs._files`).
    """
    try:
        data = read_local_file(
            path, what="trust file", max_bytes=MAX_TRUST_FILE_BYTES, care="protected", error=PolicyFileError
        )
    except FileNotFoundError:
        if required:
            raise PolicyFileError(f"trust file {path} does not exist") from None
        return TrustPolicy(frozenset())
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFileError(f"trust file {path} is not UTF-8 text") from None
    return parse_trust(text, path)
