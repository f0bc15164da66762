"""Capability names and the NATS subjects they map to.

All mesh traffic lives under ``mesh.``:

- ``mesh.cmd.<capability>`` — load-balanced through the queue group
  ``mesh.cmd.<capability>`` shared by every worker that offers it;
- ``mesh.peer.<peer key>.cmd.<capability>`` — one chosen peer (all processes
  of that peer share the queue group ``mesh.peer``, so none runs a job twice).

A capability is one or more dot-separated tokens of ``[a-z0-9_-]``. Names that
would be wildcards, contain spaces or empty tokens, or start with a reserved
first token are rejected before anything is published.
"""

from __future__ import annotations

import functools
import re

from meshjobs.errors import UsageError
from meshjobs.identity import is_public_key

MAX_CAPABILITY_LENGTH = 128
_TOKEN_RE = re.compile(r"[a-z0-9_-]+")
_CAPABILITY_RE = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
#: First tokens that belong to NATS or to meshjobs itself.
RESERVED_PREFIXES = frozenset({"mesh", "meshjobs", "sys", "srv", "js", "kv", "obj", "inbox", "nats"})

CMD_PREFIX = "mesh.cmd."
PEER_PREFIX = "mesh.peer."
PEER_QUEUE = "mesh.peer"


@functools.lru_cache(maxsize=4096)
def _valid(name: str) -> bool:
    return _problem(name) is None


def capability_problem(name: object) -> str | None:
    """Why *name* is not a valid capability, or None when it is."""
    if isinstance(name, str) and _valid(name):
        return None
    return _problem(name)


def _problem(name: object) -> str | None:
    if not isinstance(name, str):
        return "a capability name must be a string"
    if not name:
        return "a capability name cannot be empty"
    if len(name) > MAX_CAPABILITY_LENGTH:
        return f"a capability name is at most {MAX_CAPABILITY_LENGTH} characters"
    if not _CAPABILITY_RE.fullmatch(name):
        return (
            f"invalid capability {name!r}: use dot-separated tokens of a-z, 0-9, '_' and '-' "
            "(no wildcards, spaces, upper case or empty tokens)"
        )
    first = name.split(".", 1)[0]
    if first.lstrip("_$") in RESERVED_PREFIXES or first.startswith("_"):
        return f"invalid capability {name!r}: the prefix {first!r} is reserved"
    return None


def check_capability(name: str) -> str:
    """Return *name* if it is a valid capability, else raise :class:`UsageError`."""
    problem = capability_problem(name)
    if problem:
        raise UsageError(problem)
    return name


def queue_subject(capability: str) -> str:
    """The load-balanced subject for *capability* (also its queue group name)."""
    return CMD_PREFIX + capability


def peer_subject(peer: str, capability: str) -> str:
    """The subject that reaches *capability* on exactly one peer."""
    if not is_public_key(peer):
        raise UsageError(f"invalid peer id {peer!r}: expected a 56-character key starting with U")
    return f"{PEER_PREFIX}{peer}.cmd.{capability}"


def audience_for(capability: str, peer: str | None = None) -> str:
    """The audience an envelope is signed for: the subject it must arrive on."""
    return peer_subject(peer, capability) if peer else queue_subject(capability)
