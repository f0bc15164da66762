"""Adaptive verification policy, without a network: check rates, checker choice, the trust-weighted tie-break."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from meshjobs.errors import Reason, Rejected
from meshjobs.verify import SPOT_MIN, VERIFIED_FLOOR, check_probability, pick_checker, settle_votes


@dataclass
class Rec:
    value: float
    verified: int = 0

    def score(self) -> float:
        return self.value


@dataclass
class Info:
    community: str = ""
    region: str = ""


@dataclass
class Cand:
    peer: str
    record: Rec
    info: Info
    anchor: bool = False
    witnessed: int = 0


def cand(peer: str, score: float, community: str = "", region: str = "", verified: int = 0, witnessed: int = 0) -> Any:
    return Cand(peer, Rec(score, verified), Info(community, region), witnessed=witnessed)


def test_unverified_peers_are_always_checked_and_the_rate_falls_but_never_to_zero() -> None:
    assert all(check_probability(v) == 1.0 for v in range(VERIFIED_FLOOR))
    rates = [check_probability(v) for v in range(VERIFIED_FLOOR, 400)]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] < 1.0 and rates[-1] == SPOT_MIN > 0


def test_the_checker_is_independent_of_the_primary_where_the_mesh_allows() -> None:
    primary = cand("p", 0.9, community="lab", region="eu")
    same = cand("s", 0.95, community="lab", region="eu")
    other = cand("o", 0.3, community="garage", region="us")
    for seed in range(20):
        order = pick_checker(primary, [same, other, primary], random.Random(seed))
        assert [c.peer for c in order] == ["o", "s"]  # never the primary, another community first


def test_an_unproven_primary_gets_a_trusted_checker_but_work_spreads() -> None:
    primary = cand("p", 0.1)  # its word does not outweigh anyone's: the checker must be credible
    others = [cand("hi", 0.9), cand("mid", 0.6), cand("lo", 0.05)]
    firsts = [pick_checker(primary, others, random.Random(seed))[0].peer for seed in range(400)]
    assert firsts.count("hi") > firsts.count("mid") > firsts.count("lo") > 0


def test_peers_seen_agreeing_with_credible_ones_share_checks_before_their_record_says_so() -> None:
    """The signed record lags the evidence; without this every check of a newcomer would fall on the anchors."""
    primary = cand("p", 0.0)
    others = [cand("anchor", 0.9), cand("seen", 0.0, witnessed=4), cand("stranger", 0.0)]
    firsts = [pick_checker(primary, others, random.Random(seed))[0].peer for seed in range(400)]
    assert firsts.count("anchor") > firsts.count("seen") > 10 * max(firsts.count("stranger"), 1)


def test_a_credible_primary_is_checked_by_the_least_proven_peers_first() -> None:
    """The check then tests the newcomer too; the value returned rests on the credible primary."""
    primary = cand("p", 0.6, verified=9)
    others = [cand("old", 0.9, verified=20), cand("some", 0.3, verified=3), cand("new", 0.0, verified=0)]
    firsts = [pick_checker(primary, others, random.Random(seed))[0].peer for seed in range(400)]
    assert firsts.count("new") > firsts.count("some") > firsts.count("old") > 0


def votes(*groups: list[Any]) -> dict[str, list[tuple[Any, Any]]]:
    return {f"d{i}": [(c, f"outcome-{c.peer}") for c in group] for i, group in enumerate(groups)}


def test_the_side_with_more_trust_wins_and_the_other_side_loses() -> None:
    cheater, honest, anchor = cand("cheater", 0.2), cand("honest", 0.4), cand("anchor", 0.95)
    verdict = settle_votes(votes([cheater], [honest, anchor]))
    assert verdict.agreeing == ["honest", "anchor"] and [p for p, _ in verdict.losers] == ["cheater"]


def test_a_minority_is_not_punished_unless_outweighed_by_trust() -> None:
    # Two colluding fresh keys agree against one well-trusted peer: trust, not headcount, decides.
    trusted, fake1, fake2 = cand("trusted", 0.9), cand("fake1", 0.1), cand("fake2", 0.1)
    verdict = settle_votes(votes([trusted], [fake1, fake2]))
    assert verdict.agreeing == ["trusted"]
    assert sorted(p for p, _ in verdict.losers) == ["fake1", "fake2"]


def test_an_anchor_outweighs_newcomers_before_it_has_any_record() -> None:
    anchor = Cand("anchor", Rec(0.0), Info(), anchor=True)
    verdict = settle_votes(votes([cand("cheater", 0.0)], [anchor]))
    assert verdict.agreeing == ["anchor"]


def test_an_even_split_is_no_verdict() -> None:
    with pytest.raises(Rejected) as info:
        settle_votes(votes([cand("a", 0.5)], [cand("b", 0.5)]))
    assert info.value.reason == Reason.NO_QUORUM
    assert "[[pretrusted]]" not in str(info.value)  # trust is there: the sides are just even


def test_a_disagreement_among_peers_nobody_trusts_says_trust_needs_anchors() -> None:
    # A mesh with no anchors: however many agree, nobody's word counts, so the user is told what is missing.
    with pytest.raises(Rejected) as info:
        settle_votes(votes([cand("a", 0.0)], [cand("b", 0.0), cand("c", 0.0)]))
    assert info.value.reason == Reason.NO_QUORUM
    assert "none of the 3 peers asked has any standing yet" in str(info.value)
    assert "[[pretrusted]]" in str(info.value) and "\n" not in str(info.value)
