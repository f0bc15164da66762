"""What the simulated peers do: the plan of a run, the honest answer, and each cheater's behaviour. Pure.

Every peer offers one deterministic capability, :data:`CAPABILITY`, whose
honest answer is a pure function of the job's arguments
(:func:`honest_value`). Honest peers always return it; a malicious peer's
answer depends on the scenario:

- ``always-wrong``: a wrong value every time (its own, per job);
- ``camouflage``: the honest value, but a wrong one with probability ``p``;
- ``collective``: a wrong value every time, the *same* one for every cheater
  (they collude, so a cross-check between two cheaters agrees);
- ``long-con``: honest for its first ``k`` runs, then always wrong;
- ``forge``: always wrong, and besides it forges reputation records and files
  false evidence with fresh submitter keys (see :mod:`meshjobs.sim.forge`).

With ``collude``, ``camouflage`` and ``long-con`` cheaters act as one, as
``collective`` ones do: they return one wrong value per job, and camouflage
cheaters cheat on the same jobs, so a check between two of them agrees.

With ``role_aware``, cheaters answer honestly whenever a request looks like
a check (:class:`RoleGuess`: it arrives with less validity left than the
first requests of jobs do), so they build a verified record as checkers at
no risk and cheat only where they guess they are the first peer asked.

The plan (who cheats, who is pre-trusted, every job's arguments) follows from
the seed alone, so a run can be repeated; which peer runs which job is up to
the mesh.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from meshjobs.errors import UsageError

CAPABILITY = "sim.compute"
Scenario = Literal["always-wrong", "camouflage", "collective", "long-con", "forge"]
SCENARIOS: tuple[Scenario, ...] = ("always-wrong", "camouflage", "collective", "long-con", "forge")
MAX_PRETRUSTED = 3
#: Rounds of hashing per job: a little real work, far below the cost of the messaging.
ROUNDS = 64


def honest_value(x: int, salt: str) -> str:
    """The one right answer to a job: a pure function of its arguments."""
    value = f"{x}:{salt}".encode()
    for _ in range(ROUNDS):
        value = hashlib.sha256(value).digest()
    return value.hex()[:24]


def _wrong(*parts: object) -> str:
    # Shaped like an honest answer (24 hex digits), so nothing but the value gives a cheater away.
    return hashlib.sha256("\0".join(map(str, ("wrong", *parts))).encode()).hexdigest()[:24]


def _coin(*parts: object) -> float:
    """A reproducible number in [0, 1) from *parts*."""
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class Behaviour:
    """How one peer answers; :meth:`answer` is called once per run of its handler."""

    honest: bool
    scenario: Scenario = "always-wrong"
    p: float = 0.3
    k: int = 5
    seed: int = 0
    index: int = 0
    collude: bool = False
    """camouflage, long-con: cheat as one (the same wrong value; camouflage: on the same jobs)."""
    role_aware: bool = False
    """Answer honestly whenever the request looks like a check (see :class:`RoleGuess`)."""

    def answer(self, runs_before: int, x: int, salt: str, *, looks_checked: bool = False) -> str:
        """The value this peer returns for a job, given how many jobs it ran before."""
        right = honest_value(x, salt)
        if self.honest or (self.role_aware and looks_checked):
            return right
        one = self.collude or self.scenario == "collective"
        coin = _coin(self.seed, x, salt) if one else _coin(self.seed, self.index, x, salt)
        if self.scenario == "camouflage" and coin >= self.p:
            return right
        if self.scenario == "long-con" and runs_before < self.k:
            return right
        if one:
            return _wrong(x, salt)  # the same wrong value from every cheater
        return _wrong(self.index, x, salt)

    @property
    def forges(self) -> bool:
        return not self.honest and self.scenario == "forge"


@dataclass(frozen=True)
class Plan:
    """Who is who in a run, from the seed: indices of malicious and of pre-trusted peers."""

    peers: int
    malicious: frozenset[int]
    pretrusted: frozenset[int]
    scenario: Scenario
    seed: int
    p: float
    k: int
    collude: bool = False
    role_aware: bool = False

    def behaviour(self, index: int) -> Behaviour:
        honest = index not in self.malicious
        return Behaviour(honest, self.scenario, self.p, self.k, self.seed, index, self.collude, self.role_aware)

    @property
    def honest(self) -> frozenset[int]:
        return frozenset(range(self.peers)) - self.malicious


#: Scenarios whose cheaters can be told to collude (``collective`` always does).
COLLUDING = ("camouflage", "long-con")


def default_pretrusted(peers: int, bad: int) -> int:
    """Issue 11's setting, 3 anchors for 40 peers, in proportion (at least one, at most 3, honest only).

    A mesh without anchors has no root of trust: nobody's credibility can grow
    (a collective vouching for itself gains nothing), so no disagreement is
    settled and no cheater is quarantined. ``--pretrusted 0`` measures that.
    """
    return min(MAX_PRETRUSTED, peers - bad, max(1, round(peers * MAX_PRETRUSTED / 40)))


def make_plan(
    peers: int,
    malicious: float,
    scenario: str,
    seed: int,
    *,
    pretrusted: int | None = None,
    p: float = 0.3,
    k: int = 5,
    collude: bool = False,
    role_aware: bool = False,
) -> Plan:
    """Choose the cheaters (``round(peers * malicious)`` of them) and the pre-trusted honest peers.

    *pretrusted* None: :func:`default_pretrusted` of them.
    """
    if scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    if peers < 2:
        raise UsageError("a simulation needs at least 2 peers")
    if not 0 <= malicious < 1:
        raise UsageError("the malicious fraction must be at least 0 and below 1")
    if not 0 <= p <= 1:
        raise UsageError("p must be between 0 and 1")
    if k < 0:
        raise UsageError("k cannot be negative")
    if collude and scenario not in COLLUDING:
        raise UsageError(f"collusion applies to {' and '.join(COLLUDING)} (collective cheaters always collude)")
    bad = round(peers * malicious)
    if pretrusted is None:
        pretrusted = default_pretrusted(peers, bad)
    if not 0 <= pretrusted <= min(MAX_PRETRUSTED, peers - bad):
        raise UsageError(f"pre-trusted peers: at most {MAX_PRETRUSTED}, and only honest ones ({peers - bad} here)")
    rng = random.Random(f"meshjobs-sim:{seed}:plan")
    cheaters = frozenset(rng.sample(range(peers), bad))
    honest = sorted(set(range(peers)) - cheaters)
    anchors = frozenset(rng.sample(honest, pretrusted))
    chosen = next(s for s in SCENARIOS if s == scenario)
    return Plan(peers, cheaters, anchors, chosen, seed, p, k, collude, role_aware)


@dataclass
class RoleGuess:
    """A role-aware cheater's guess whether a request is a check rather than the first run of a job.

    A check sent after the first peer has answered carries less validity
    than a job's first request, by about the time the first run took: a
    request with at least :attr:`margin_ms` less left than the most any
    request had on arrival looks like one. (meshjobs sends a check beside the
    first run, with the same validity, so the guess finds nothing to go by.)
    """

    margin_ms: int = 5
    peak_ms: int = 0

    def looks_checked(self, left_ms: int) -> bool:
        self.peak_ms = max(self.peak_ms, left_ms)
        return left_ms < self.peak_ms - self.margin_ms


def job_args(seed: int, task: int) -> dict[str, Any]:
    """Fresh arguments for job number *task* of a run (reproducible from the seed)."""
    rng = random.Random(f"meshjobs-sim:{seed}:job:{task}")
    return {"task": task, "x": rng.randrange(2**31), "salt": f"{rng.getrandbits(64):016x}"}


def expected(seed: int, task: int) -> str:
    """The honest value of job number *task* of a run."""
    args = job_args(seed, task)
    return honest_value(args["x"], args["salt"])
