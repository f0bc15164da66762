"""The trust model without a server: proof checking, tampering, the score bound, standing, minorities.

Every frame here is real: envelopes signed by the submitter, results signed
by each worker and bound to their request, as the live path makes them.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshjobs.envelope import (
    EVIDENCE_MAGIC,
    HEADER_LEN,
    digest,
    open_statement,
    seal_envelope,
    seal_result,
    seal_statement,
)
from meshjobs.errors import Rejected
from meshjobs.identity import Identity
from meshjobs.trust.evidence import (
    FRESH_STANDING,
    WINDOW_MS,
    Evidence,
    Kind,
    Standing,
    Verdict,
    assess,
    check_proof,
    make_evidence,
)
from meshjobs.trust.record import MINOR_CAP, Ledger, Record, wilson_lower

OPERATOR = Identity.generate()  # the submitter with full standing
HONEST, CHEAT, OTHER = (Identity.generate() for _ in range(3))
ANCHOR = Identity.generate()  # a pre-trusted worker
NOW = 1_700_000_000_000
JOB = "job-0000000000001"


def run(
    submitter: Identity,
    worker: Identity,
    value: Any,
    *,
    args: dict[str, Any] | None = None,
    job: str = JOB,
    status: str = "ok",
    capability: str = "math.square",
) -> tuple[bytes, bytes]:
    """One job on one worker: (the submitter's signed request, the worker's signed result)."""
    _, request = seal_envelope(
        submitter,
        capability,
        args or {"x": 3},
        audience=f"mesh.cmd.{capability}",
        job_id=job,
        ttl_ms=30_000,
        issued_at=NOW,
    )
    result = seal_result(worker, request_digest=digest(request), job_id=job, status=status, value=value)
    return request, result


def piece(
    kind: Kind,
    peer: Identity,
    value: Any = 9,
    *,
    by: Identity = OPERATOR,
    proof: list[tuple[Identity, Any]] = (),
    job: str = JOB,
    **kw: Any,
) -> Evidence:  # type: ignore[assignment]
    """Evidence by *by* about *peer*'s answer *value*, with other workers' answers as proof."""
    request, result = run(by, peer, value, job=job)
    others = [run(by, worker, other, job=job) for worker, other in proof]
    return make_evidence(
        kind,
        peer.public_key,
        by.public_key,
        job_id=job,
        capability="math.square",
        request=request,
        result=result,
        proof=others,
        at_ms=NOW,
        **kw,
    )


def standing(records: dict[str, Record] | None = None, anchors: frozenset[str] | None = None) -> Standing:
    known = records or {}
    default = frozenset({OPERATOR.public_key, ANCHOR.public_key})
    return Standing(default if anchors is None else anchors, lambda k: known[k].credibility(NOW) if k in known else 0.0)


def fold(record: Record, evidence: Evidence, standing_: Standing, seq: int = 1, **kw: Any) -> Record:
    verdict = assess(evidence, standing_, NOW)
    assert verdict.valid, verdict.problem
    return record.fold(verdict, evidence, received_ms=NOW, stream_seq=seq, **kw)


def good_record(identity: Identity, agreements: float) -> Record:
    """A record of *agreements* proven agreements (with an anchor, say)."""
    return Record(peer=identity.public_key, good=agreements, proven=agreements, updated_ms=NOW)


# -- proof --------------------------------------------------------------------------------


def test_each_kind_of_proof_verifies() -> None:
    success = check_proof(piece("success", HONEST))
    assert success.proven and success.result is not None and success.result.worker == HONEST.public_key
    agree = check_proof(piece("agree", HONEST, proof=[(ANCHOR, 9), (OTHER, 9)]))
    assert agree.others == (ANCHOR.public_key, OTHER.public_key)
    wrong = check_proof(piece("wrong", CHEAT, 10, proof=[(ANCHOR, 9)]))
    assert wrong.others == (ANCHOR.public_key,)
    assert not check_proof(
        make_evidence("timeout", HONEST.public_key, OPERATOR.public_key, job_id=JOB, capability="math.square")
    ).proven


def problem(evidence: Evidence) -> str:
    with pytest.raises(Rejected) as caught:
        check_proof(evidence)
    assert caught.value.code == "invalid_evidence"
    return caught.value.message


def swap(evidence: Evidence, **fields: Any) -> Evidence:
    return evidence.model_copy(update=fields)


def test_success_and_agreement_need_the_signed_frames() -> None:
    bare = make_evidence("success", HONEST.public_key, OPERATOR.public_key, job_id=JOB, capability="math.square")
    assert "must embed" in problem(bare)
    assert "other workers" in problem(piece("agree", HONEST))  # no proof
    assert "no proof" in problem(piece("success", HONEST, proof=[(ANCHOR, 9)]))


def test_tampered_frames_are_refused() -> None:
    evidence = piece("agree", HONEST, proof=[(ANCHOR, 9)])
    assert evidence.result is not None and evidence.proof[0].result
    flipped = evidence.result[:HEADER_LEN] + evidence.result[HEADER_LEN:].replace('"value":9', '"value":8')
    assert "does not verify" in problem(swap(evidence, result=flipped))
    item = evidence.proof[0].model_copy(update={"result": evidence.proof[0].result.replace('"value":9', '"value":7')})
    assert "does not verify" in problem(swap(evidence, proof=[item]))


def test_a_result_must_answer_its_own_request() -> None:
    evidence = piece("success", HONEST)
    other_request, _ = run(OPERATOR, HONEST, 9, args={"x": 4})
    assert "does not answer" in problem(swap(evidence, request=other_request.decode()))


def test_requests_must_be_signed_by_the_submitter_of_the_evidence() -> None:
    stranger = Identity.generate()
    request, result = run(stranger, HONEST, 9)  # someone else's job, claimed by OPERATOR
    evidence = make_evidence(
        "success",
        HONEST.public_key,
        OPERATOR.public_key,
        job_id=JOB,
        capability="math.square",
        request=request,
        result=result,
    )
    assert "not signed by the submitter" in problem(evidence)


def test_the_result_must_be_the_peers_own() -> None:
    request, result = run(OPERATOR, OTHER, 9)
    evidence = make_evidence(
        "success",
        HONEST.public_key,
        OPERATOR.public_key,
        job_id=JOB,
        capability="math.square",
        request=request,
        result=result,
    )
    assert "another worker" in problem(evidence)


def test_proof_must_be_the_same_job_with_the_same_arguments() -> None:
    evidence = piece("agree", HONEST, proof=[(ANCHOR, 9)])
    request, result = run(OPERATOR, ANCHOR, 9, args={"x": 4})
    changed = evidence.proof[0].model_copy(update={"request": request.decode(), "result": result.decode()})
    assert "other arguments" in problem(swap(evidence, proof=[changed]))
    request, result = run(OPERATOR, ANCHOR, 9, job="job-0000000000002")
    other_job = evidence.proof[0].model_copy(update={"request": request.decode(), "result": result.decode()})
    assert "another job" in problem(swap(evidence, proof=[other_job]))
    assert "another job" in problem(swap(evidence, job_id="job-0000000000009"))


def test_agreement_needs_equal_values_and_wrong_needs_one_other_value() -> None:
    assert "no agreement" in problem(piece("agree", HONEST, 9, proof=[(ANCHOR, 8)]))
    assert "other than the peer's" in problem(piece("wrong", CHEAT, 9, proof=[(ANCHOR, 9)]))
    assert "other than the peer's" in problem(piece("wrong", CHEAT, 10, proof=[(ANCHOR, 9), (OTHER, 8)]))
    assert "distinct worker" in problem(piece("agree", HONEST, 9, proof=[(ANCHOR, 9), (ANCHOR, 9)]))
    assert "distinct worker" in problem(piece("agree", HONEST, 9, proof=[(HONEST, 9)]))


def test_proof_is_checked_by_the_comparison_the_evidence_declares() -> None:
    """Noise within a declared tolerance agrees and cannot be called wrong; a real difference is still wrong."""
    tol = {"compare": "rel=1e-6"}
    assert check_proof(piece("agree", HONEST, 1.0, proof=[(ANCHOR, 1.0000001)], **tol)).proven
    assert "no agreement" in problem(piece("agree", HONEST, 1.0, proof=[(ANCHOR, 1.0000001)]))  # exact
    assert "other than the peer's" in problem(piece("wrong", HONEST, 1.0, proof=[(ANCHOR, 1.0000001)], **tol))
    assert "other than the peer's" in problem(
        piece("wrong", CHEAT, 2.0, proof=[(ANCHOR, 1.0), (OTHER, 1.5)], **tol)
    )  # the proof must itself agree
    assert check_proof(piece("wrong", CHEAT, 2.0, proof=[(ANCHOR, 1.0), (OTHER, 1.0000001)], **tol)).proven
    with pytest.raises(ValueError, match="unknown comparison term"):
        piece("agree", HONEST, 1.0, proof=[(ANCHOR, 1.0)], compare="everything-agrees")


def test_evidence_is_signed_by_its_submitter() -> None:
    evidence = piece("agree", HONEST, proof=[(ANCHOR, 9)])
    frame = seal_statement(EVIDENCE_MAGIC, OPERATOR, evidence)
    assert open_statement(EVIDENCE_MAGIC, Evidence, "submitter", frame) == evidence
    with pytest.raises(Rejected):
        open_statement(EVIDENCE_MAGIC, Evidence, "submitter", seal_statement(EVIDENCE_MAGIC, OTHER, evidence))
    forged = frame[:HEADER_LEN] + frame[HEADER_LEN:].replace(b'"agree"', b'"wrong"')
    with pytest.raises(Rejected):
        open_statement(EVIDENCE_MAGIC, Evidence, "submitter", forged)


def test_stale_and_future_evidence_is_refused() -> None:
    evidence = piece("success", HONEST)
    assert assess(evidence, standing(), NOW + WINDOW_MS).valid
    assert "stale" in assess(evidence, standing(), NOW + WINDOW_MS + 1).problem
    assert "future" in assess(evidence, standing(), NOW - 10 * 60_000).problem


# -- the score --------------------------------------------------------------------------


def test_an_unknown_peer_scores_far_below_half() -> None:
    unknown = Record(peer=HONEST.public_key)
    assert unknown.score(NOW) == 0.0 and unknown.mean(NOW) == 0.5
    assert not unknown.quarantined and not unknown.auto_quarantined()


def test_the_score_is_a_lower_bound_that_grows_with_evidence() -> None:
    scores = [wilson_lower(n, 0) for n in (1, 3, 10, 50)]
    assert scores == sorted(scores) and scores[0] < 0.3 < 0.5 < scores[1] and scores[-1] > 0.9
    for good, bad in [(1, 0), (3, 1), (10, 2), (0.4, 0.1)]:
        record = Record(peer=HONEST.public_key, good=good, bad=bad, updated_ms=NOW)
        assert record.score(NOW) < record.mean(NOW)
    assert wilson_lower(20, 0) > wilson_lower(20, 1) > wilson_lower(20, 5)


def test_old_evidence_fades() -> None:
    record = Record(peer=HONEST.public_key, good=10, bad=2, updated_ms=NOW)
    week = 7 * 86_400_000
    assert record.decayed(NOW + week) == pytest.approx((5, 1))
    assert record.score(NOW + 10 * week) < record.score(NOW)


def test_a_proven_agreement_counts_much_more_than_a_success() -> None:
    success = assess(piece("success", HONEST), standing(), NOW)
    agree = assess(piece("agree", HONEST, proof=[(ANCHOR, 9)]), standing(), NOW)
    assert agree.good >= 4 * success.good and agree.verified and not success.verified
    # Agreeing with nobody credible proves little: an unknown worker's agreement counts as a success.
    weak = assess(piece("agree", HONEST, proof=[(OTHER, 9)]), standing(), NOW)
    assert weak.good == pytest.approx(success.good) and not weak.verified


def test_weight_scales_with_the_submitters_standing_and_a_workers_record_is_none() -> None:
    peer_submitter = Identity.generate()  # a credible worker, submitting
    records = {peer_submitter.public_key: good_record(peer_submitter, 10)}
    assert records[peer_submitter.public_key].credibility(NOW) > 0.7
    weights = [
        assess(piece("failure", HONEST, by=by), standing(records), NOW).bad
        for by in (OPERATOR, peer_submitter, Identity.generate())
    ]
    assert weights == [1.0, FRESH_STANDING, FRESH_STANDING]


@pytest.mark.parametrize("history", [0.0, 0.5, 1.0, 1.2, 2.0, 3.0, 5.0, 10.0, 50.0])
def test_twenty_fresh_submitters_move_an_honest_peer_by_less_than_five_hundredths(history: float) -> None:
    honest = good_record(HONEST, history)
    record = honest
    for n in range(20):
        liar = Identity.generate()
        for k, kind in enumerate(("failure", "timeout", "rejected", "disputed")):
            job = f"job-{n:04d}-{k:08d}"
            evidence = make_evidence(
                kind, HONEST.public_key, liar.public_key, job_id=job, capability="math.square", at_ms=NOW
            )  # type: ignore[arg-type]
            record = fold(record, evidence, standing())
        # ... and a "wrong" report outvoted by twenty fresh sybil workers agreeing on another value.
        sybils = [(Identity.generate(), 10) for _ in range(MINOR_PROOF)]
        record = fold(record, piece("wrong", HONEST, 9, by=liar, proof=sybils, job=f"job-{n:04d}-wrong"), standing())
    assert honest.score(NOW) - record.score(NOW) < 0.05
    assert not record.quarantined and record.wrong == 0 and record.failures == 40


MINOR_PROOF = 8


@pytest.mark.parametrize("history", [(0.0, 0.0), (0.0, 5.0), (1.0, 1.0)])
def test_twenty_fresh_submitters_cannot_lift_a_cheater(history: tuple[float, float]) -> None:
    cheater = Record(peer=CHEAT.public_key, good=history[0], bad=history[1], updated_ms=NOW)
    record = cheater
    for n in range(20):
        fan = Identity.generate()
        record = fold(record, piece("success", CHEAT, by=fan, job=f"job-{n:04d}-succ"), standing())
        friends = [(Identity.generate(), 9) for _ in range(3)]
        record = fold(record, piece("agree", CHEAT, by=fan, proof=friends, job=f"job-{n:04d}-agre"), standing())
    assert record.score(NOW) - cheater.score(NOW) < 0.05 and record.verified == 0
    assert record.minor_good <= MINOR_CAP + 1e-9


def test_a_minority_is_not_punished_unless_outweighed() -> None:
    accused = good_record(HONEST, 4)  # score about 0.6
    records = {HONEST.public_key: accused}
    # One unknown worker disagrees with the honest peer: the peer is not outweighed.
    lone = assess(piece("wrong", HONEST, 9, proof=[(OTHER, 10)]), standing(records), NOW)
    assert lone.valid and lone.bad == 0 and not lone.quarantine and lone.side < lone.accused
    after = accused.fold(lone, piece("wrong", HONEST, 9, proof=[(OTHER, 10)]), received_ms=NOW, stream_seq=1)
    assert after.disputes == 1 and after.score(NOW) == pytest.approx(accused.score(NOW)) and not after.quarantined
    # A pre-trusted worker outweighs it: proven wrong, heavy, and quarantined at once.
    caught = assess(piece("wrong", CHEAT, 10, proof=[(ANCHOR, 9)]), standing(), NOW)
    assert caught.bad == 5.0 and caught.wrong and caught.quarantine and caught.side > caught.accused
    # Two credible peers together outweigh one more trusted than either.
    records |= {k.public_key: good_record(k, 3) for k in (OTHER, CHEAT)}
    pair = assess(piece("wrong", HONEST, 9, proof=[(OTHER, 10), (CHEAT, 10)]), standing(records), NOW)
    assert pair.side > pair.accused > records[OTHER.public_key].score(NOW) and pair.quarantine


def test_a_fresh_submitter_cannot_quarantine_even_with_a_valid_proof() -> None:
    stranger = Identity.generate()
    verdict = assess(piece("wrong", HONEST, 9, by=stranger, proof=[(ANCHOR, 10)]), standing(), NOW)
    assert verdict.valid and verdict.bad == pytest.approx(5 * FRESH_STANDING) and not verdict.quarantine


def test_quarantine_is_lifted_only_by_a_newer_release() -> None:
    evidence = piece("wrong", CHEAT, 10, proof=[(ANCHOR, 9)])
    record = fold(Record(peer=CHEAT.public_key), evidence, standing())
    assert record.quarantined and record.auto_quarantined() and record.wrong == 1 and "outweighed" in record.reason
    assert record.release(NOW - 1, OPERATOR.public_key, "old order") is None
    lifted = record.release(NOW + 5, OPERATOR.public_key, "appeal granted")
    assert lifted is not None and not lifted.quarantined and "appeal granted" in lifted.reason
    # Evidence older than the release does not quarantine again; newer evidence does.
    again = lifted.fold(assess(evidence, standing(), NOW), evidence, received_ms=NOW, stream_seq=2, released_ms=NOW + 5)
    assert not again.quarantined
    later = lifted.fold(
        assess(evidence, standing(), NOW), evidence, received_ms=NOW + 9, stream_seq=3, released_ms=NOW + 5
    )
    assert later.quarantined


def test_failures_and_timeouts_never_quarantine() -> None:
    record = Record(peer=HONEST.public_key)
    for n in range(200):
        kind: Kind = "failure" if n % 2 else "timeout"
        evidence = make_evidence(
            kind, HONEST.public_key, OPERATOR.public_key, job_id=f"job-{n:012d}", capability="math.square", at_ms=NOW
        )
        record = fold(record, evidence, standing(), seq=n + 1)
    assert record.score(NOW) == 0.0 and not record.quarantined and record.failures + record.timeouts == 200


def test_the_ledger_counts_a_report_once_and_an_upgrade_by_its_difference() -> None:
    ledger = Ledger()
    success, agree = piece("success", HONEST), piece("agree", HONEST, proof=[(ANCHOR, 9)])
    record = Record(peer=HONEST.public_key)
    for seq, evidence in enumerate([success, success, agree, agree], 1):
        verdict = assess(evidence, standing(), NOW)
        if ledger.seen(evidence):
            continue
        already = ledger.already(evidence)
        ledger.add(evidence, verdict)
        record = record.fold(verdict, evidence, received_ms=NOW, stream_seq=seq, already=already)
    assert record.jobs == 2 and record.good == pytest.approx(1.0) and record.verified == 1
    ledger.prune(NOW + WINDOW_MS + 1)
    assert len(ledger) == 0


def test_a_record_round_trips_signed() -> None:
    from meshjobs.envelope import TRUST_MAGIC

    record = fold(Record(peer=HONEST.public_key), piece("agree", HONEST, proof=[(ANCHOR, 9)]), standing())
    signed = record.stamped(OPERATOR.public_key, NOW)
    assert signed.seq == NOW and signed.stamped(OPERATOR.public_key, NOW).seq == NOW + 1
    frame = seal_statement(TRUST_MAGIC, OPERATOR, signed)
    assert open_statement(TRUST_MAGIC, Record, "service", frame) == signed
    with pytest.raises(Rejected):
        open_statement(EVIDENCE_MAGIC, Record, "service", b"MJ1V" + frame[4:])


def test_verdicts_explain_themselves() -> None:
    text = assess(piece("wrong", CHEAT, 10, proof=[(ANCHOR, 9)]), standing(), NOW).explain()
    assert "outweighed the peer's 0.00" in text and "quarantined" in text
    assert Verdict("success", problem="bad").explain() == "invalid: bad"


def test_credibility_flows_from_the_anchors_and_a_collective_cannot_make_its_own() -> None:
    friends = [Identity.generate() for _ in range(4)]
    records = {f.public_key: Record(peer=f.public_key) for f in friends}
    # The collective agrees among itself, job after job, reported by a fully trusted submitter.
    for n in range(30):
        for f in friends:
            others = [(o, 10) for o in friends if o is not f]
            evidence = piece("agree", f, 10, proof=others, job=f"job-{n:06d}-coll")
            records[f.public_key] = fold(records[f.public_key], evidence, standing(records), seq=n)
    assert all(r.score(NOW) > 0.6 and r.credibility(NOW) == 0.0 and r.verified == 0 for r in records.values())
    # So together they do not outweigh an unknown honest peer that answers differently.
    verdict = assess(piece("wrong", HONEST, 9, proof=[(f, 10) for f in friends]), standing(records), NOW)
    assert verdict.valid and verdict.side == 0.0 and verdict.bad == 0 and not verdict.quarantine
    # An honest peer that agrees with an anchor becomes credible, and then credible for others in turn.
    honest = Record(peer=HONEST.public_key)
    for n in range(4):
        honest = fold(honest, piece("agree", HONEST, proof=[(ANCHOR, 9)], job=f"job-{n:06d}-anch"), standing(), seq=n)
    assert honest.verified == 4 and honest.credibility(NOW) > 0.5
    other = fold(
        Record(peer=OTHER.public_key), piece("agree", OTHER, proof=[(HONEST, 9)]), standing({HONEST.public_key: honest})
    )
    assert 0 < other.credibility(NOW) and other.verified == 1


def test_credible_workers_cannot_frame_an_honest_peer_or_vouch_each_other_up() -> None:
    """Cheaters that earned credibility by honest work, then file evidence with their own worker keys.

    Their credibility is their weight as workers (in a vote, a tie-break), not
    as witnesses: a worker reporting on other workers has a stake in the
    outcome, so its reports weigh as little as a stranger's.
    """
    crew = [Identity.generate() for _ in range(4)]
    records = {c.public_key: good_record(c, 12) for c in crew}
    honest = good_record(HONEST, 4)
    records[HONEST.public_key] = honest
    assert all(records[c.public_key].credibility(NOW) > 0.7 for c in crew)
    assert honest.credibility(NOW) < 2 * records[crew[0].public_key].credibility(NOW)
    # Framing: one of them asks the honest peer, two others sign a different value for the same request.
    framed = honest
    for n in range(20):
        evidence = piece("wrong", HONEST, 9, by=crew[0], proof=[(crew[1], 10), (crew[2], 10)], job=f"job-{n:06d}-fram")
        verdict = assess(evidence, standing(records), NOW)
        assert verdict.valid and verdict.side > verdict.accused  # the proof itself verifies and outweighs
        assert not verdict.quarantine and not verdict.wrong
        framed = framed.fold(verdict, evidence, received_ms=NOW, stream_seq=n + 1)
    assert not framed.quarantined and framed.wrong == 0
    assert honest.score(NOW) - framed.score(NOW) < 0.05
    # Vouching: they report agreement among themselves, with fully signed proof.
    pumped = records[crew[3].public_key]
    for n in range(20):
        evidence = piece("agree", crew[3], 10, by=crew[0], proof=[(crew[1], 10)], job=f"job-{n:06d}-vouc")
        pumped = pumped.fold(assess(evidence, standing(records), NOW), evidence, received_ms=NOW, stream_seq=n + 1)
    before = records[crew[3].public_key]
    assert pumped.verified == before.verified
    assert pumped.credibility(NOW) - before.credibility(NOW) < 0.05
