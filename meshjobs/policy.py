"""Who may run what on a worker. Pure: loading a file is the only I/O here.

The default policy trusts the worker's own key plus every key listed in the
trust file (``$MESHJOBS_HOME/trust.toml``, or ``--trust FILE``)::

    # Submitters this worker runs commands for. Its own key is always trusted.
    [[peer]]
    key = "UD3K..."     # the submitter's public key, as `meshjobs id` prints it
    name = "alice"      # optional, display only

Unknown keys in the file are errors, so a typo never silently trusts nobody.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyFileError, Reason, Rejected
from .identity import decode_public

TRUST_FILE = "trust.toml"
MAX_TRUST_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TrustPolicy:
    """The set of submitter keys a worker accepts envelopes from."""

    keys: frozenset[str]
    names: dict[str, str] = field(default_factory=dict, compare=False)

    def check(self, submitter: str, capability: str) -> None:
        """Raise :class:`Rejected` unless *submitter* may run *capability*."""
        if submitter not in self.keys:
            raise Rejected(Reason.UNTRUSTED, f"submitter {submitter[:12]}… is not in this worker's trust list")

    def with_key(self, key: str, name: str | None = None) -> TrustPolicy:
        names = dict(self.names)
        if name:
            names[key] = name
        return TrustPolicy(self.keys | {key}, names)


def _entry(path: Path, index: int, raw: Any) -> tuple[str, str | None]:
    where = f"{path}: peer #{index + 1}"
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{where}: each [[peer]] must be a table")
    unknown = set(raw) - {"key", "name"}
    if unknown:
        raise PolicyFileError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: key, name)")
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
    return key, name


def parse_trust(text: str, path: Path) -> TrustPolicy:
    """Parse the trust file format documented in this module."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"peer"}
    if unknown:
        raise PolicyFileError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected [[peer]] entries)")
    peers = data.get("peer", [])
    if not isinstance(peers, list):
        raise PolicyFileError(f"{path}: 'peer' must be an array of tables ([[peer]])")
    keys: set[str] = set()
    names: dict[str, str] = {}
    for index, raw in enumerate(peers):
        key, name = _entry(path, index, raw)
        keys.add(key)
        if name:
            names[key] = name
    return TrustPolicy(frozenset(keys), names)


def load_trust(path: Path, *, required: bool) -> TrustPolicy:
    """Read a trust file. A missing file is an empty policy unless *required*."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TRUST_FILE_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise PolicyFileError(f"trust file {path} does not exist") from None
        return TrustPolicy(frozenset())
    except OSError as exc:
        raise PolicyFileError(f"cannot read trust file {path}: {exc.strerror}") from None
    if len(data) > MAX_TRUST_FILE_BYTES:
        raise PolicyFileError(f"trust file {path} is larger than {MAX_TRUST_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFileError(f"trust file {path} is not UTF-8 text") from None
    return parse_trust(text, path)
