"""When two results of one job count as the same: a capability's declared comparison.

A capability declared ``deterministic=True`` is checked by running it on
another peer and comparing the results; by default they must be equal as
canonical JSON (``exact``). A capability that is not bit-for-bit deterministic
(floating point summed in another order, a list built from a set, a timing
field) declares how its results compare instead::

    @app.capability("stats.mean", compare="rel=1e-9")
    @app.capability("index.terms", compare="unordered,ignore=took_ms")

A comparison is a comma-separated list of terms, so it travels in manifests
and signed evidence as text and every party applies the same one:

==================  =========================================================
``exact``           equal as canonical JSON (the default; alone)
``rel=R``           numbers equal within R of the larger magnitude (0 <= R < 1)
``abs=A``           numbers equal within A (A >= 0); with ``rel``, either suffices
``unordered``       arrays equal in any order (sorted by a normal form, then
                    matched pairwise; small arrays are also matched greedily)
``ignore=K1|K2``    object keys left out of the comparison, at any depth
``strip``           strings equal once surrounding whitespace is removed and
                    inner runs of whitespace are one space
``casefold``        strings equal regardless of case
==================  =========================================================

Statuses always compare exactly, as do types: a number never equals a string,
``true`` never equals ``1``. The submitter checks a job among the peers that
declare the comparison the most trusted of them declare, and files evidence
carrying it; the trust service verifies the evidence's proof with it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from meshjobs.errors import UsageError

EXACT = "exact"
#: The longest comparison text accepted (manifests, evidence).
MAX_SPEC = 256
#: Nesting deeper than this is never "the same" (frames are refused past 32 levels anyway).
MAX_DEPTH = 64
#: Arrays up to this long are also matched greedily when sorting them does not pair them up.
GREEDY_MAX = 64

_KEY_RE = re.compile(r"^[^|,=\s]{1,64}$")
_FLAGS = ("unordered", "strip", "casefold")


@dataclass(frozen=True)
class Comparison:
    """A parsed comparison (see the module docstring); :attr:`spec` is its canonical text."""

    rel: float = 0.0
    abs: float = 0.0
    unordered: bool = False
    ignore: frozenset[str] = frozenset()
    strip: bool = False
    casefold: bool = False

    @property
    def spec(self) -> str:
        terms = [f"abs={self.abs!r}"] if self.abs else []
        terms += ["casefold"] if self.casefold else []
        terms += [f"ignore={'|'.join(sorted(self.ignore))}"] if self.ignore else []
        terms += [f"rel={self.rel!r}"] if self.rel else []
        terms += [name for name in ("strip", "unordered") if getattr(self, name)]
        return ",".join(terms) or EXACT

    @property
    def exact(self) -> bool:
        return self == Comparison()

    def same(self, a: Any, b: Any) -> bool:
        """Whether values *a* and *b* (parsed JSON) count as the same result."""
        return self._same(a, b, 0)

    def _same(self, a: Any, b: Any, depth: int) -> bool:
        if depth > MAX_DEPTH:
            return False
        if _number(a) and _number(b):
            return a == b or (
                math.isfinite(a) and math.isfinite(b) and abs(a - b) <= max(self.rel * max(abs(a), abs(b)), self.abs)
            )
        if isinstance(a, str) and isinstance(b, str):
            return self._text(a) == self._text(b)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = set(a) - self.ignore
            return keys == set(b) - self.ignore and all(self._same(a[k], b[k], depth + 1) for k in keys)
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return False
            if not self.unordered:
                return all(self._same(x, y, depth + 1) for x, y in zip(a, b, strict=True))
            key = self._sort_key
            if all(self._same(x, y, depth + 1) for x, y in zip(sorted(a, key=key), sorted(b, key=key), strict=True)):
                return True
            return len(a) <= GREEDY_MAX and self._matched(a, b, depth + 1)
        return type(a) is type(b) and a == b  # null, booleans; any mismatch of types

    def _matched(self, a: list[Any], b: list[Any], depth: int) -> bool:
        left = list(b)
        for x in a:
            for i, y in enumerate(left):
                if self._same(x, y, depth):
                    del left[i]
                    break
            else:
                return False
        return True

    def _text(self, s: str) -> str:
        if self.strip:
            s = " ".join(s.split())
        return s.casefold() if self.casefold else s

    def _sort_key(self, value: Any) -> tuple[int, float, str]:
        """Numbers by value, everything else by its normal form's JSON text."""
        if _number(value):
            return (0, float(value), "")
        return (1, 0.0, json.dumps(self._normal(value, 0), sort_keys=True, separators=(",", ":")))

    def _normal(self, value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            return None
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, dict):
            return {k: self._normal(v, depth + 1) for k, v in value.items() if k not in self.ignore}
        if isinstance(value, list):
            items = [self._normal(v, depth + 1) for v in value]
            if self.unordered:
                items.sort(key=lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")))
            return items
        return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tolerance(term: str, value: str, *, below_one: bool) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0 and (number < 1 or not below_one)):
        bound = "at least 0 and below 1" if below_one else "a finite number, at least 0"
        raise UsageError(f"comparison term {term!r}: the tolerance must be {bound}")
    return number


def parse(spec: str | None) -> Comparison:
    """The comparison *spec* names (None or ``exact``: exact). Raises :class:`UsageError`, one line, on bad text."""
    if spec is None or spec.strip() == EXACT:
        return Comparison()
    if len(spec) > MAX_SPEC:
        raise UsageError(f"a comparison is at most {MAX_SPEC} characters")
    found: dict[str, Any] = {}
    for raw in spec.split(","):
        term = raw.strip()
        name, _, value = term.partition("=")
        if name in found:
            raise UsageError(f"comparison term {name!r} is given twice")
        if name in ("rel", "abs") and value:
            found[name] = _tolerance(term, value, below_one=name == "rel")
        elif name == "ignore" and value:
            keys = value.split("|")
            if not all(_KEY_RE.fullmatch(k) for k in keys):
                raise UsageError(f"comparison term {term!r}: keys are 1-64 characters without '|', ',', '=' or spaces")
            found[name] = frozenset(keys)
        elif name in _FLAGS and not value:
            found[name] = True
        else:
            known = "exact, rel=R, abs=A, unordered, ignore=K1|K2, strip, casefold"
            raise UsageError(f"unknown comparison term {term!r} (one of: {known})")
    return Comparison(**found)


def spec_of(spec: str | None) -> str:
    """*spec*'s canonical text (validated): what manifests and evidence carry."""
    return parse(spec).spec


def valid_comparison(value: str | None) -> str | None:
    """A field validator: *value* is a comparison; kept as its canonical text (None for exact)."""
    if value is None:
        return None
    try:
        spec = spec_of(value)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return None if spec == EXACT else spec
