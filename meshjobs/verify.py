"""Adaptive verification of deterministic results: credibility-based spot checks with a trust-weighted tie-break.

After Sarmenta's credibility-based fault tolerance and BOINC's adaptive
replication: a job runs on one peer; whether its result is checked on an
independent peer depends on how much of that peer's record is *verified*
(results that other peers reproduced), not on how often it merely answered.

- A peer with fewer than :data:`VERIFIED_FLOOR` verified agreements is always
  checked; after that, a spot check with probability
  ``max(SPOT_MIN, 1 / (verified + 1))``, so the rate
  falls as the record grows but never to zero (a long con meets checks too).
- The checker is an independent peer: another community or region where the
  mesh has one, never the primary. An unproven primary is checked by a
  credible peer (drawn by trust); a credible primary by the least proven
  peers first, so a spot check also tests a newcomer at no risk to the value
  returned (see :func:`pick_checker`).
- The check runs beside the primary: both are sent at the same moment with the
  same validity, so no peer can tell whether it is checked or checking (a
  cheater cannot answer honestly only as a checker). A checker that hangs,
  refuses or fails is replaced; a primary that has not answered within its
  share of the timeout gets the next peer asked beside it (a hedged
  request); an unproven peer's result that nobody could check is refused
  unless no other peer is there at all.
- Whether to check reads only the signed record's ``verified`` count; who
  checks also counts the agreements this router settled itself (the record
  lags the evidence), so checker duty spreads over the newcomers at once, and
  over the peers this router has seen agree with credible ones instead of
  falling on the anchors alone (:func:`vouched`).
- Agreement is evidence for both peers, with both signed results as proof.
- A mismatch is never settled on one peer's word against another's: more
  peers are asked, the most trusted first (pre-trusted anchors), until the
  value whose supporters carry more trust (by a margin) wins, and each peer on
  the losing side gets ``wrong`` evidence carrying the winning side's signed
  results. A minority is not punished
  unless the agreeing side outweighs it by trust; an even split returns no
  value (``no_quorum``). The router stops routing to a peer it has proved
  wrong at once (:meth:`~meshjobs.router.Router.convict`), before the trust
  service's quarantine reaches it.

``--verify quorum:N/M`` (:meth:`Verifier.submit_quorum`) runs a job on M
peers from distinct communities and regions and settles a disagreement the
same way: a value whose peers are outweighed by trust is never returned, so
agreeing cheaters cannot outvote a credible peer; the headcount decides only
among peers nobody trusts more than the others (:func:`quorum_verdict`).

The policy functions are pure and unit-tested; :class:`Verifier` runs them
on a :class:`~meshjobs.router.Router`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshjobs.client import Outcome
from meshjobs.compare import EXACT, Comparison
from meshjobs.compare import parse as parse_comparison
from meshjobs.errors import NoPeerError, Reason, Rejected, UsageError
from meshjobs.router import (
    Attempt,
    Candidate,
    Constraints,
    JobRun,
    RoutedOutcome,
    Router,
    attempt_budget,
    result_digest,
)
from meshjobs.trust.record import wilson_lower

log = logging.getLogger("meshjobs.verify")

#: Verified agreements below which every result of a peer is checked.
VERIFIED_FLOOR = 2
#: The lowest spot-check rate, however long a peer's verified record.
SPOT_MIN = 0.1
#: How much more trust the winning side of a disagreement must carry: less is no verdict yet.
MARGIN = 0.2
#: Most runs of one job while a disagreement is being settled.
MAX_RUNS = 5


def check_probability(verified: int) -> float:
    """How likely a result from a peer with *verified* agreements is cross-checked."""
    if verified < VERIFIED_FLOOR:
        return 1.0
    return max(SPOT_MIN, 1.0 / (verified + 1))


def standing(candidate: Candidate) -> float:
    """The weight of a peer's word in a tie-break, as the trust service weighs it (1 for an anchor)."""
    if candidate.anchor:
        return 1.0
    record = candidate.record
    weigh = getattr(record, "trust", None)
    return max(float(weigh()) if callable(weigh) else record.score(), 0.0)


def vouched(candidate: Candidate) -> float:
    """:func:`standing`, or what the verified agreements this router settled itself prove, if more.

    Only who checks an unproven peer reads it: the record lags the evidence, and
    without it every such check would fall on the anchors. Verdicts, and what
    counts as verified, stay on the trust service's standing.
    """
    return max(standing(candidate), wilson_lower(candidate.witnessed, 0))


def record_verified(candidate: Candidate) -> int:
    """The verified agreements in a peer's signed record: what decides whether its result is checked."""
    return int(getattr(candidate.record, "verified", 0))


def verified_count(candidate: Candidate) -> int:
    """Verified agreements: the signed record's, or what this router witnessed itself if more (evidence lags)."""
    return max(record_verified(candidate), candidate.witnessed)


def _independent(primary: Candidate, c: Candidate) -> int:
    p, o = primary.info, c.info
    return int(bool(o.community) and o.community != p.community) + int(bool(o.region) and o.region != p.region)


def pick_checker(primary: Candidate, others: list[Candidate], rng: random.Random) -> list[Candidate]:
    """Checkers for *primary*'s result, best first: independent (another community/region), then by need.

    When the primary is itself credible (its word outweighs an unproven peer's
    by :data:`MARGIN`), the check also tests the checker: the least proven
    peers come first, so newcomers earn a verified record (and a cheater among
    them is caught: a disagreement is settled by the most trusted) while the
    value returned rests on the credible primary. When the primary is not
    credible, the checker must be: a trust-weighted random sample, so checks
    spread over every credible peer instead of falling on the anchors alone;
    peers with no credibility come last (a collective vouching for itself
    gains nothing).
    """
    credible = standing(primary) >= MARGIN

    def key(c: Candidate) -> tuple[int, float]:
        weight = 1.0 / (1 + verified_count(c)) if credible else vouched(c) + 0.01
        return (-_independent(primary, c), -(rng.random() ** (1.0 / weight)))

    return sorted((c for c in others if c.peer != primary.peer), key=key)


def tie_breakers(primary: Candidate, others: list[Candidate]) -> list[Candidate]:
    """Who settles a disagreement, best first: the most trusted peers (anchors first), independent ones first."""
    return sorted(
        (c for c in others if c.peer != primary.peer), key=lambda c: (-standing(c), -_independent(primary, c))
    )


def _fresh(c: Candidate, chosen: list[Candidate]) -> int:
    """How many of *c*'s community and region none of *chosen* shares (unknown ones do not count)."""
    info = c.info
    community = bool(info.community) and all(x.info.community != info.community for x in chosen)
    region = bool(info.region) and all(x.info.region != info.region for x in chosen)
    return int(community) + int(region)


def spread(candidates: list[Candidate], n: int) -> list[Candidate]:
    """*candidates* reordered so the first *n* span as many communities and regions as they can, rank kept otherwise."""
    chosen: list[Candidate] = []
    rest = list(candidates)
    while rest and len(chosen) < n:
        best = max(rest, key=lambda c: _fresh(c, chosen))  # the first of the most independent: rank among equals
        chosen.append(best)
        rest.remove(best)
    return chosen + rest


Votes = dict[str, list[tuple[Candidate, Outcome]]]


@dataclass
class Verdict:
    """The settled value of a verified job and who stood where.

    ``by_trust``: the winners outweighed the losers by trust (they are proven
    wrong, and convicted); otherwise only a headcount decided (a quorum the
    submitter asked for, among peers nobody trusts more than the others).
    """

    outcome: Outcome
    agreeing: list[str]
    losers: list[tuple[str, Outcome]] = field(default_factory=list)
    by_trust: bool = True


def _weighed(votes: Votes) -> list[tuple[float, str]]:
    return sorted(((sum(standing(c) for c, _ in group), digest) for digest, group in votes.items()), reverse=True)


def _verdict(votes: Votes, digest: str, *, by_trust: bool = True) -> Verdict:
    winner = votes[digest]
    losers = [(c.peer, o) for d, group in votes.items() if d != digest for c, o in group]
    return Verdict(winner[0][1], [c.peer for c, _ in winner], losers, by_trust)


def undecided(votes: Votes) -> Rejected:
    """``no_quorum`` for a disagreement trust cannot settle; says what is missing when nobody asked has standing."""
    message = "the peers disagree and neither side outweighs the other by enough trust"
    if not any(standing(c) > 0 for group in votes.values() for c, _ in group):
        message += (
            f": none of the {_runs(votes)} peers asked has any standing yet, and trust grows only from anchors "
            "(list peers you vouch for as [[pretrusted]] in the trust file)"
        )
    return Rejected(Reason.NO_QUORUM, message)


def settle_votes(votes: Votes, margin: float = MARGIN) -> Verdict:
    """The value whose supporters carry at least *margin* more trust wins; less is no verdict (yet)."""
    weighed = _weighed(votes)
    if len(weighed) > 1 and weighed[0][0] - weighed[1][0] < margin:
        raise undecided(votes)
    return _verdict(votes, weighed[0][1])


def quorum_verdict(votes: Votes, quorum: int, *, final: bool) -> Verdict:
    """The value at least *quorum* peers agree on, never one that more trusted peers contradict.

    A disagreement is settled by trust as :func:`settle_votes` settles it (the
    winners must still number *quorum*). Only when trust cannot tell the sides
    apart and nobody more trusted is left to ask (*final*) does the headcount
    decide, and then only for a value whose supporters carry at least as much
    trust as any other's. Raises ``no_quorum`` (with why) when there is no
    verdict (yet).
    """
    sizes = sorted((len(group) for group in votes.values()), reverse=True)
    best = sizes[0] if sizes else 0
    if len(votes) > 1 and (verdict := _by_trust(votes)) is not None:
        if len(verdict.agreeing) >= quorum:
            return verdict
        raise Rejected(
            Reason.NO_QUORUM,
            f"the most trusted value has {len(verdict.agreeing)} agreeing peer(s); a quorum needs {quorum}",
        )
    if best < quorum:
        raise Rejected(Reason.NO_QUORUM, f"{best} of the peers agreed; a quorum needs {quorum}")
    if len(votes) == 1:
        return _verdict(votes, next(iter(votes)))
    if not final:
        raise Rejected(Reason.NO_QUORUM, "the peers disagree: more trusted peers are still to be asked")
    if sizes[1] == best:  # a tie is no verdict: nobody was outvoted, so nobody is disputed
        raise Rejected(Reason.NO_QUORUM, f"two different results have {best} agreeing peers each")
    digest = next(d for d, group in votes.items() if len(group) == best)
    weighed = dict((d, w) for w, d in _weighed(votes))
    if any(w > weighed[digest] for d, w in weighed.items() if d != digest):
        raise Rejected(
            Reason.NO_QUORUM, f"the {best} agreeing peers are outweighed by the trust of peers that disagree"
        )
    return _verdict(votes, digest, by_trust=False)


def vote(votes: Votes, ran: tuple[Candidate, Outcome], comparison: Comparison) -> None:
    """Add *ran* to *votes*: grouped by digest, or, under a declared comparison, around the most central results.

    A tolerance need not be transitive (1 - d and 1 + d can each be within it
    of 1 and not of each other), so the groups are rebuilt from every run:
    the result the same as the most others leads a group of all those the
    same as it, and so on with the rest. Which order the answers came in
    does not matter, and the value returned is the most central one.
    """
    if comparison.exact:
        votes[result_digest(ran[1])].append(ran)
        return

    def same(a: tuple[Candidate, Outcome], b: tuple[Candidate, Outcome]) -> bool:
        x, y = a[1].result, b[1].result
        return x.status == y.status and comparison.same(x.value, y.value)

    runs = [r for group in votes.values() for r in group] + [ran]
    votes.clear()
    while runs:
        lead = max(runs, key=lambda r: sum(same(r, other) for other in runs))  # the first of the most central
        group = [lead] + [r for r in runs if r is not lead and same(lead, r)]
        votes[result_digest(lead[1])] = group
        runs = [r for r in runs if all(r is not g for g in group)]


def _runs(votes: Votes) -> int:
    return sum(len(group) for group in votes.values())


def _settled(votes: Votes) -> bool:
    """Checked and nothing left to settle: two or more runs that agree, or a disagreement trust has decided."""
    return _runs(votes) > 1 and (len(votes) == 1 or _by_trust(votes) is not None)


def _by_trust(votes: Votes) -> Verdict | None:
    """The verdict the votes settle by trust, or None: never a conviction on one peer's word against another's."""
    if len(votes) > 1 and _runs(votes) < 3:
        return None
    try:
        return settle_votes(votes)
    except Rejected:
        return None


class Verifier:
    """Runs deterministic jobs with adaptive verification on one router."""

    def __init__(self, router: Router, rng: random.Random | None = None) -> None:
        self.router = router
        self.rng = rng or random.Random()

    async def submit(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        constraints: Constraints = Constraints(),  # noqa: B008 - frozen, shared safely
        timeout: float = 30.0,
        job_id: str | None = None,
    ) -> RoutedOutcome:
        """Run on a ranked peer (its check, if drawn, beside it), settle disagreements; executions are in the trace.

        A first peer that has not answered within its share of the timeout
        gets the next one (and its check, if drawn) asked beside it; the
        first answer counts (see :meth:`_together`).

        A result that must be checked (its peer has no verified record yet) is
        returned unchecked only when no other peer could be reached at all;
        when other peers were there but none checked it in time (a checker
        that hangs, refuses or fails is replaced by the next, within the
        deadline), the job is refused (``no_quorum``), so a hung or late peer
        cannot wave a result through.
        """
        job = JobRun.start(self.router, capability, args, job_id, timeout)
        candidates = await self._checkable(job, constraints)
        if not candidates:
            raise NoPeerError(f"no capable peer offers {capability!r} as deterministic and meets the constraints")
        pending = list(candidates)
        votes: Votes = defaultdict(list)
        drawn: dict[str, bool] = {}  # the first runs' peers, in the order asked: whether a check was drawn

        def first_run() -> list[Candidate]:
            """The next peer along the ranking, and its checker if one is drawn (by its record alone)."""
            if not pending:
                return []
            primary = pending.pop(0)
            drawn[primary.peer] = self.rng.random() < check_probability(record_verified(primary))
            seats = [primary]
            if drawn[primary.peer] and (chosen := pick_checker(primary, pending, self.rng)):
                seats.append(chosen[0])
                pending.remove(chosen[0])
            return seats

        answers, took = await self._together(job, first_run(), hedge=first_run)
        if not answers:
            raise job.failure()
        for answer in answers:
            vote(votes, answer, job.comparison)
        # The earliest asked first peer's result, or a checker's if no first peer answered.
        order = list(drawn)
        first, outcome = min(answers, key=lambda a: order.index(a[0].peer) if a[0].peer in drawn else len(order))
        checked = len(answers) > 1 or drawn.get(first.peer, True)
        if not checked:
            job.report("success", first.peer, outcome)
            return RoutedOutcome(outcome, job.trace, [first.peer])
        # A check that failed is run again; on a disagreement, the most trusted
        # peers settle it, one at a time until one side outweighs the other.
        settling = len(votes) > 1
        checkers = tie_breakers(first, pending) if settling else pick_checker(first, pending, self.rng)
        while not _settled(votes) and checkers and job.left() > 0 and _runs(votes) < MAX_RUNS:
            # A checker that hangs must leave time for the next: twice what the job took, or a third of the timeout.
            budget = attempt_budget(job.left(), timeout, last=len(checkers) == 1, expected=took)
            ran = await job.run(checkers.pop(0), budget)
            if ran is None:
                continue
            vote(votes, ran, job.comparison)
            if len(votes) > 1 and not settling:  # the check disagreed: the most trusted settle it from now on
                settling = True
                asked = {c.peer for group in votes.values() for c, _ in group}
                checkers = [c for c in tie_breakers(first, pending) if c.peer not in asked]
        if _runs(votes) == 1:
            return self._unchecked(job, first, outcome, candidates, required=record_verified(first) < VERIFIED_FLOOR)
        if (verdict := _by_trust(votes)) is None:
            raise undecided(votes)
        return self._file(job, verdict, votes)

    async def _checkable(self, job: JobRun, constraints: Constraints) -> list[Candidate]:
        """The peers that can check each other on *job*: those declaring the comparison the most trusted declare.

        The job's results are compared, and its evidence filed, by that
        comparison (:attr:`JobRun.comparison`). A peer that declares another one
        promises another notion of "the same result" (another version of the
        capability, or a cheater loosening the check), so it is left out of
        this job rather than judged by a rule it did not declare.
        """
        candidates = await self.router.candidates(job.capability, constraints, deterministic=True)
        specs = [c.info.compare_of(job.capability) for c in candidates]
        declared: defaultdict[str, float] = defaultdict(float)
        for c, spec in zip(candidates, specs, strict=True):
            declared[spec] += standing(c) + 1e-3  # trust first, then headcount
        if not declared:
            return candidates
        chosen = max(sorted(declared), key=lambda s: (declared[s], s == EXACT))
        job.comparison = parse_comparison(chosen)
        return [c for c, spec in zip(candidates, specs, strict=True) if spec == chosen]

    async def _together(
        self,
        job: JobRun,
        seats: list[Candidate],
        budget: float | None = None,
        hedge: Callable[[], list[Candidate]] | None = None,
    ) -> tuple[list[tuple[Candidate, Outcome]], float]:
        """Run *seats* at once: a job and its check, so that no peer can tell which it is, or a quorum's replicas.

        All are sent at the same moment, in random order, with the same
        validity: a cheater cannot answer honestly only when it is checking.
        Once one has answered (after *d* seconds), the others sent with it
        have until twice that and a second, or a third of the timeout,
        whichever is longer; then they count as timed out.

        With *hedge* (the next seats, or none), seats that have not answered
        within their share of the timeout (:func:`attempt_budget`) get the
        next ones beside them instead of being cut (the tail at scale's hedged
        request): a peer that hangs cannot hold the job, and a long job still
        finishes where it runs. The first answer decides which seats count;
        the others are cut, and only those that had their share are timed out.
        Returns the answers and how long the first took.
        """
        tasks: dict[asyncio.Future[tuple[Candidate, Outcome] | None], tuple[Candidate, int]] = {}
        starts: list[float] = []  # per group of seats: when it was sent
        due: list[float] = []  # per group: when its share ends
        waiting: set[asyncio.Future[tuple[Candidate, Outcome] | None]] = set()
        cut: dict[asyncio.Future[tuple[Candidate, Outcome] | None], float] = {}  # when each seat cut was cut

        def send(group: list[Candidate]) -> None:
            now = time.perf_counter()
            group = list(group)
            self.rng.shuffle(group)  # sent one after the other: which goes first must say nothing about who checks
            for c in group:
                task = asyncio.ensure_future(job.run(c, budget))
                tasks[task] = (c, len(starts))
                waiting.add(task)
            share = attempt_budget(job.left(), job.timeout, last=False, expected=max(c.expected for c in group))
            starts.append(now)
            due.append(now + share)

        send(seats)
        answers: list[tuple[Candidate, Outcome]] = []
        until: float | None = None  # when the grace after the first answer ends
        took, answered = 0.0, -1
        try:
            while True:
                now = time.perf_counter()
                if hedge is not None and until is None and (not waiting or now >= due[-1]) and job.left() > 0:
                    if more := hedge():
                        send(more)
                        continue
                    hedge = None
                if not waiting:
                    break
                wait = job.left()
                if until is not None:
                    wait = min(wait, until - now)
                elif hedge is not None:
                    wait = min(wait, due[-1] - now)
                if wait <= 0 and (until is not None or job.left() <= 0):
                    break
                done, still = await asyncio.wait(waiting, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED)
                waiting.clear()
                waiting.update(still)
                for task in done:
                    if (ran := task.result()) is not None:
                        answers.append(ran)
                if answers and until is None:
                    answered = tasks[next(t for t in done if t.result() is not None)][1]
                    took = time.perf_counter() - starts[answered]
                    share = attempt_budget(job.left() + took, job.timeout, last=False, expected=took)
                    until = starts[answered] + share
                    # Seats of other groups were hedged against or hedges: the answer makes them moot.
                    moot = {t for t in waiting if tasks[t][1] != answered}
                    for task in moot:
                        task.cancel()
                        cut[task] = time.perf_counter()
                    waiting -= moot
        finally:
            for task in waiting:
                task.cancel()
                cut[task] = time.perf_counter()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task, (late, group) in tasks.items():
            if not task.cancelled():
                continue
            ms = (cut[task] - starts[group]) * 1000
            if group == answered or cut[task] >= due[group]:
                detail = "no answer in time, when the peer it ran beside had answered long before"
                job.trace.append(Attempt(late.peer, "timeout", detail, ms))
                job.report("timeout", late.peer, None, detail=detail)
            else:  # a hedge cut before its share was up: no fault of its own
                job.trace.append(Attempt(late.peer, "cancelled", "another peer answered first", ms))
        return answers, took

    def _unchecked(
        self, job: JobRun, primary: Candidate, outcome: Outcome, candidates: list[Candidate], *, required: bool
    ) -> RoutedOutcome:
        """Nobody checked the result: returned as unverified (said so in the trace), unless that is a loophole."""
        others = {c.peer for c in candidates} - {primary.peer} - job.absent
        if required and others:
            error = Rejected(
                Reason.NO_QUORUM,
                f"the result of {primary.peer[:12]}…, which has no verified record yet, could not be checked: "
                f"{len(others)} other peer(s) did not check it within {job.timeout:g} s "
                "(raise --timeout; --verify off accepts unchecked results)",
            )
            error.trace = job.trace
            raise error
        job.trace.append(Attempt(primary.peer, "unverified", "no independent peer could check it in time"))
        job.report("success", primary.peer, outcome)
        return RoutedOutcome(outcome, job.trace, [primary.peer])

    def _file(self, job: JobRun, verdict: Verdict, votes: Votes) -> RoutedOutcome:
        """Evidence for all who voted: ``agree`` for the winners, ``wrong`` for the losers (convicted if outweighed)."""
        winners = [o for group in votes.values() for c, o in group if c.peer in verdict.agreeing]
        backers = [c for group in votes.values() for c, _ in group if c.peer in verdict.agreeing]
        count, same = len(verdict.agreeing), job.comparison.same
        for group in votes.values():
            for candidate, ran in group:
                if candidate.peer in verdict.agreeing:
                    # Only results the same as its own: a tolerance need not be transitive.
                    proof = [o for o in winners if o is not ran and same(o.result.value, ran.result.value)]
                    job.report("agree", candidate.peer, ran, proof=proof)
                    # Verified only by credible company: peers that vouch only for each other gain nothing.
                    if sum(standing(c) for c in backers if c.peer != candidate.peer) >= MARGIN:
                        self.router.witnessed[candidate.peer] += 1
                    continue
                if verdict.by_trust:
                    detail = f"outweighed by {count} peer(s) that agree"
                    self.router.convict(candidate.peer)
                else:  # a headcount: the trust service weighs it, and punishes only if the trust is there
                    detail = f"outvoted by {count} agreeing peers"
                job.report("wrong", candidate.peer, ran, proof=winners, detail=detail)
        return RoutedOutcome(verdict.outcome, job.trace, sorted(verdict.agreeing), sorted(p for p, _ in verdict.losers))

    async def submit_quorum(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        replicas: int,
        quorum: int,
        constraints: Constraints = Constraints(),  # noqa: B008 - frozen, shared safely
        timeout: float = 30.0,
        job_id: str | None = None,
    ) -> RoutedOutcome:
        """Run on *replicas* distinct peers at once; return the value at least *quorum* of them agree on.

        The replicas come from distinct communities and regions where the mesh
        has them. A peer that fails is replaced by the next one. A disagreement
        is settled as :meth:`submit` settles it: more peers are asked, the most
        trusted first, and a value whose peers are outweighed by trust is never
        returned (see :func:`quorum_verdict`), so agreeing cheaters cannot
        outvote a credible peer.
        """
        if not 1 <= quorum <= replicas:
            raise UsageError("quorum must be between 1 and the number of replicas")
        job = JobRun.start(self.router, capability, args, job_id, timeout)
        candidates = await self._checkable(job, constraints)
        if len(candidates) < quorum:
            raise NoPeerError(
                f"no capable peer: {len(candidates)} peer(s) offer {capability!r} as deterministic and qualify; "
                f"a quorum needs {quorum}"
            )
        pending = spread(candidates, replicas)
        batch, pending = pending[:replicas], pending[replicas:]
        votes: Votes = defaultdict(list)
        limit = replicas + MAX_RUNS - 2  # runs, while a disagreement is being settled
        consulted = False  # a disagreement goes to the most trusted peer left before anyone is convicted
        while batch:
            # Replicas at once (one that hangs is cut a while after the others answer); a refill within a budget.
            budget = None
            if len(batch) == 1:
                budget = attempt_budget(job.left(), timeout, last=not pending, expected=batch[0].expected)
            for done in (await self._together(job, batch, budget))[0]:
                vote(votes, done, job.comparison)
            settling = False
            if len(votes) > 1 and _runs(votes) < limit:
                # The most trusted settle it from now on, one at a time, as in submit().
                pending = sorted(pending, key=lambda c: -standing(c))
                settling = bool(pending) and standing(pending[0]) > 0
            if consulted or not settling:
                try:
                    quorum_verdict(votes, quorum, final=not settling)
                    break
                except Rejected:
                    pass
            if not pending or job.left() <= 0:
                break
            consulted = consulted or settling
            best = max((len(group) for group in votes.values()), default=0)
            batch = [pending.pop(0) for _ in range(1 if settling else min(max(quorum - best, 0), len(pending)))]
        try:
            verdict = quorum_verdict(votes, quorum, final=True)
        except Rejected as exc:
            exc.trace = job.trace
            raise
        return self._file(job, verdict, votes)
