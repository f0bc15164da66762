"""Reputation without a server: how evidence moves a score, when a peer is shut out, signed evidence."""

from __future__ import annotations

import pytest

from meshjobs.envelope import EVIDENCE_MAGIC, HEADER_LEN, QUARANTINE_MAGIC, now_ms, open_statement, seal_statement
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import Identity
from meshjobs.trust.reputation import (
    HALF_LIFE_S,
    RECENT_IDS,
    Evidence,
    Kind,
    Record,
    evidence_id,
    summary,
)

ALICE = Identity.generate()
MALLORY = Identity.generate()
PEER = Identity.generate().public_key
NOW = 1_700_000_000_000
DAY_MS = 86_400_000


def evidence(kind: Kind, job: str = "job-0000000001", latency_ms: float | None = None) -> Evidence:
    return Evidence(
        version=1,
        id=evidence_id(kind, PEER, job, ALICE.public_key),
        kind=kind,
        peer=PEER,
        submitter=ALICE.public_key,
        job_id=job,
        capability="demo.add",
        at_ms=NOW,
        latency_ms=latency_ms,
        detail="",
        result=None,
    )


def fold(*kinds: Kind) -> Record:
    record = Record(peer=PEER)
    for n, kind in enumerate(kinds):
        record = record.apply(evidence(kind, job=f"job-{n:010d}"), NOW)
    return record


def test_a_peer_without_evidence_scores_the_prior() -> None:
    record = Record(peer=PEER)
    assert record.score(NOW) == 0.5 and record.bad == 0 and not record.auto_quarantined(NOW)
    assert "no evidence" in record.explain(NOW)


@pytest.mark.parametrize(
    ("kind", "score"),
    [("success", 2 / 3), ("failure", 1 / 3), ("timeout", 1 / 3), ("disputed", 1 / 5), ("rejected", 1 / 7)],
)
def test_each_kind_of_evidence_moves_the_score_by_its_weight(kind: Kind, score: float) -> None:
    record = fold(kind)
    assert record.score(NOW) == pytest.approx(score)
    assert record.counts[kind] == 1 and record.updated_ms == NOW
    assert record.bad == (0 if kind == "success" else 1)


def test_bad_evidence_weighs_more_the_worse_it_is() -> None:
    scores = [fold("success", kind).score(NOW) for kind in ("success", "failure", "disputed", "rejected")]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4


def test_old_behaviour_fades_with_the_half_life() -> None:
    record = Record(peer=PEER, alpha=4.0, updated_ms=NOW)
    assert record.score(NOW) == pytest.approx(5 / 6)
    assert record.score(NOW + HALF_LIFE_S * 1000) == pytest.approx(3 / 4)  # alpha halved to 2
    assert record.score(NOW + 100 * HALF_LIFE_S * 1000) == pytest.approx(0.5)
    # Folding in new evidence decays the old first.
    later = record.apply(evidence("failure"), NOW + HALF_LIFE_S * 1000)
    assert later.alpha == pytest.approx(2.0) and later.beta == 1.0


def test_latency_averages_successes_only() -> None:
    record = Record(peer=PEER).apply(evidence("success", "job-0000000001", 100.0), NOW)
    assert record.latency_ms == 100.0
    record = record.apply(evidence("failure", "job-0000000002", 9000.0), NOW)
    assert record.latency_ms == 100.0
    record = record.apply(evidence("success", "job-0000000003", 200.0), NOW)
    assert record.latency_ms == pytest.approx(120.0)


def test_the_record_remembers_a_bounded_number_of_evidence_ids() -> None:
    successes: list[Kind] = ["success"] * (RECENT_IDS + 10)
    record = fold(*successes)
    assert len(record.recent) == RECENT_IDS
    assert record.recent[-1] == evidence_id("success", PEER, f"job-{RECENT_IDS + 9:010d}", ALICE.public_key)


def test_auto_quarantine_needs_a_low_score_and_three_bad_outcomes() -> None:
    two = fold("rejected", "rejected")
    assert two.score(NOW) < 0.3 and not two.auto_quarantined(NOW)
    three = fold("rejected", "rejected", "failure")
    assert three.auto_quarantined(NOW)
    # Many failures among many more successes: bad often, but not a bad peer.
    kinds: list[Kind] = ["success"] * 20
    kinds += ["failure"] * 3
    mostly_good = fold(*kinds)
    assert mostly_good.bad == 3 and not mostly_good.auto_quarantined(NOW)
    # Time forgives: once the bad evidence has faded, the peer is routed to again.
    assert not three.auto_quarantined(NOW + 30 * DAY_MS)


def test_explain_shows_the_arithmetic() -> None:
    text = fold("success", "success", "failure").explain(NOW)
    assert text.startswith("score 0.600 = (α+1)/(α+β+2) with α=2.00 (good), β=1.00 (bad)")
    assert "after 2 success, 1 failure;" in text and "half-life 7 days" in text


def test_summary_is_what_the_cli_shows() -> None:
    # summary() scores as of now: date the record now so nothing has decayed yet.
    record = fold("rejected", "rejected", "rejected").model_copy(
        update={"latency_ms": 12.34567, "updated_ms": now_ms()}
    )
    shown = summary(record)
    assert set(shown) == {"score", "counts", "latency_ms", "auto_quarantined", "explanation"}
    assert shown["auto_quarantined"] is True and shown["counts"]["rejected"] == 3
    assert shown["latency_ms"] == 12.346 and 0 < shown["score"] < 0.3
    assert summary(Record(peer=PEER))["latency_ms"] is None


def test_evidence_ids_are_one_per_observation() -> None:
    one = evidence_id("failure", PEER, "j1", ALICE.public_key)
    assert one == evidence_id("failure", PEER, "j1", ALICE.public_key)
    others = [
        evidence_id("success", PEER, "j1", ALICE.public_key),
        evidence_id("failure", PEER, "j2", ALICE.public_key),
        evidence_id("failure", PEER, "j1", MALLORY.public_key),
        evidence_id("failure", MALLORY.public_key, "j1", ALICE.public_key),
    ]
    assert one not in others and len(set(others)) == 4


# -- signed evidence -------------------------------------------------------------------


def test_evidence_round_trips_signed() -> None:
    piece = evidence("disputed", latency_ms=3.5)
    frame = seal_statement(EVIDENCE_MAGIC, ALICE, piece)
    assert frame.startswith(b"MJ1V " + ALICE.public_key.encode())
    assert open_statement(EVIDENCE_MAGIC, Evidence, "submitter", frame) == piece


def test_every_flipped_byte_is_refused() -> None:
    frame = seal_statement(EVIDENCE_MAGIC, ALICE, evidence("failure"))
    for i in range(len(frame)):
        tampered = bytearray(frame)
        tampered[i] ^= 0x01
        with pytest.raises(Rejected):
            open_statement(EVIDENCE_MAGIC, Evidence, "submitter", bytes(tampered))


def test_turning_a_failure_into_a_success_breaks_the_signature() -> None:
    frame = seal_statement(EVIDENCE_MAGIC, ALICE, evidence("failure"))
    forged = frame[:HEADER_LEN] + frame[HEADER_LEN:].replace(b'"failure"', b'"success"')
    with pytest.raises(Rejected) as caught:
        open_statement(EVIDENCE_MAGIC, Evidence, "submitter", forged)
    assert caught.value.reason is Reason.BAD_SIGNATURE


def test_evidence_signed_by_someone_else_than_its_submitter_is_refused() -> None:
    frame = seal_statement(EVIDENCE_MAGIC, MALLORY, evidence("rejected"))
    with pytest.raises(Rejected) as caught:
        open_statement(EVIDENCE_MAGIC, Evidence, "submitter", frame)
    assert caught.value.reason is Reason.KEY_MISMATCH


def test_a_signature_for_another_kind_of_statement_does_not_pass_as_evidence() -> None:
    frame = seal_statement(QUARANTINE_MAGIC, ALICE, evidence("failure"))
    with pytest.raises(Rejected) as caught:
        open_statement(EVIDENCE_MAGIC, Evidence, "submitter", b"MJ1V" + frame[4:])
    assert caught.value.reason is Reason.BAD_SIGNATURE
