"""The simulation's pure parts: the plan, cheater behaviour, the numbers, and what the forgers forge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshjobs import envelope as wire
from meshjobs.errors import UsageError
from meshjobs.identity import Identity
from meshjobs.runtime.app import JobContext
from meshjobs.sim.forge import fabricate, forged_record
from meshjobs.sim.host import HostSpec, PeerSpec, behaviour_of, sim_app
from meshjobs.sim.report import JobResult, check, summarize
from meshjobs.sim.scenarios import CAPABILITY, Behaviour, RoleGuess, expected, honest_value, job_args, make_plan
from meshjobs.trust.evidence import check_proof, make_evidence
from meshjobs.trust.record import Record


def test_plan_is_reproducible_and_pretrusted_peers_are_honest() -> None:
    plan = make_plan(40, 0.3, "camouflage", 7, pretrusted=3)
    assert plan == make_plan(40, 0.3, "camouflage", 7, pretrusted=3)
    assert len(plan.malicious) == 12 and len(plan.honest) == 28
    assert len(plan.pretrusted) == 3 and plan.pretrusted <= plan.honest
    assert make_plan(40, 0.3, "camouflage", 8).malicious != plan.malicious
    assert job_args(7, 5) == job_args(7, 5) != job_args(7, 6)


@pytest.mark.parametrize(
    ("peers", "malicious", "anchors"), [(40, 0.3, 3), (200, 0.3, 3), (20, 0.3, 2), (8, 0.25, 1), (2, 0.5, 1)]
)
def test_a_plan_has_anchors_unless_told_otherwise(peers: int, malicious: float, anchors: int) -> None:
    # Issue 11's setting (3 of 40) in proportion, at least one: without anchors no trust can grow.
    plan = make_plan(peers, malicious, "always-wrong", 1)
    assert len(plan.pretrusted) == anchors and plan.pretrusted <= plan.honest
    assert make_plan(peers, malicious, "always-wrong", 1, pretrusted=0).pretrusted == frozenset()


@pytest.mark.parametrize(
    ("peers", "malicious", "scenario", "pretrusted"),
    [(40, 0.3, "nope", 0), (1, 0.0, "forge", 0), (40, 1.0, "forge", 0), (40, 0.3, "forge", 4), (4, 0.75, "forge", 2)],
)
def test_plan_refuses_what_makes_no_sense(peers: int, malicious: float, scenario: str, pretrusted: int) -> None:
    with pytest.raises(UsageError):
        make_plan(peers, malicious, scenario, 0, pretrusted=pretrusted)


def test_behaviours() -> None:
    right = honest_value(1, "a")
    assert Behaviour(True, "always-wrong").answer(0, 1, "a") == right
    assert Behaviour(False, "always-wrong", index=1).answer(0, 1, "a") != right
    assert Behaviour(False, "always-wrong", index=1).answer(0, 1, "a") != Behaviour(False, index=2).answer(0, 1, "a")
    collective = {Behaviour(False, "collective", index=i).answer(0, 1, "a") for i in range(5)}
    assert len(collective) == 1 and right not in collective
    con = Behaviour(False, "long-con", k=3)
    assert [con.answer(n, 1, "a") == right for n in range(5)] == [True, True, True, False, False]
    camo = Behaviour(False, "camouflage", p=0.3, seed=1, index=4)
    wrong = sum(camo.answer(0, x, "s") != honest_value(x, "s") for x in range(2000))
    assert 500 < wrong < 700  # about 30%
    assert Behaviour(False, "forge").forges and not Behaviour(True, "forge").forges


def test_colluding_cheaters_act_as_one() -> None:
    """--collude: one wrong value per job; camouflage cheaters cheat on the same jobs."""
    camo = [Behaviour(False, "camouflage", p=0.3, seed=1, index=i, collude=True) for i in range(4)]
    for x in range(300):
        answers = {c.answer(0, x, "s") for c in camo}
        assert len(answers) == 1  # all right or all the same wrong value
    cheated = sum(camo[0].answer(0, x, "s") != honest_value(x, "s") for x in range(2000))
    assert 500 < cheated < 700
    alone = [Behaviour(False, "camouflage", p=0.3, seed=1, index=i) for i in range(4)]
    assert any(len({c.answer(0, x, "s") for c in alone}) > 1 for x in range(50))
    turned = {Behaviour(False, "long-con", k=2, index=i, collude=True).answer(2, 1, "a") for i in range(4)}
    assert len(turned) == 1 and honest_value(1, "a") not in turned
    with pytest.raises(UsageError, match="collusion applies to camouflage and long-con"):
        make_plan(40, 0.3, "always-wrong", 0, collude=True)
    assert make_plan(40, 0.3, "long-con", 0, collude=True).behaviour(0).collude


def test_role_aware_cheaters_answer_honestly_when_a_request_looks_like_a_check() -> None:
    guess = RoleGuess()
    assert [guess.looks_checked(ms) for ms in (29_990, 29_998, 29_994, 29_992, 29_999)] == [
        False, False, False, True, False,
    ]  # fmt: skip  # 29_992 arrived 6 ms short of the most any request had left
    right = honest_value(1, "a")
    aware = Behaviour(False, "always-wrong", role_aware=True)
    assert aware.answer(0, 1, "a", looks_checked=True) == right != aware.answer(0, 1, "a")
    assert Behaviour(False, "always-wrong").answer(0, 1, "a", looks_checked=True) != right
    assert make_plan(40, 0.3, "long-con", 0, role_aware=True).behaviour(0).role_aware


async def test_the_role_aware_handler_guesses_from_the_validity_left(tmp_path: Path) -> None:
    """What the simulated worker does: the same cheater, a first request and then a late one."""
    spec = HostSpec(url="nats://127.0.0.1:1", trust_file="t", execution_log="e", scenario="always-wrong", seed=1,
                    p=0.3, k=5, role_aware=True, peers=[])  # fmt: skip
    cheater = behaviour_of(spec, PeerSpec(index=3, seed="s", honest=False))
    log = tmp_path / "executions.jsonl"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        compute = sim_app(cheater, fd).capabilities[CAPABILITY].func
        for left_ms in (30_000, 29_000):
            ctx = JobContext("job-1", CAPABILITY, "S", "W", wire.now_ms() + left_ms)
            await compute(task=1, x=7, salt="s", ctx=ctx)
    finally:
        os.close(fd)
    first, late = (json.loads(line) for line in log.read_text().splitlines())
    assert (first["looks_checked"], late["looks_checked"]) == (False, True)
    assert first["value"] != honest_value(7, "s") == late["value"]


def test_summary_numbers() -> None:
    plan = make_plan(4, 0.25, "always-wrong", 1, pretrusted=1)
    (bad,) = plan.malicious
    (anchor,) = plan.pretrusted
    others = sorted(plan.honest - plan.pretrusted)
    me = Identity.generate().public_key
    results = [
        JobResult(0, expected(1, 0), "w", 1),
        JobResult(1, "nonsense", "w", 2),
        JobResult(2, error="Rejected[no_quorum]: split"),
        JobResult(3, expected(1, 3), "w", 2),  # says 2, the log says 1
    ]
    runs = [(0, anchor), (1, bad), (1, others[0]), (2, others[0]), (3, anchor)]
    executions = [{"peer": p, "task": t, "submitter": me} for t, p in runs]
    executions.append({"peer": bad, "task": 0, "submitter": "someone else"})
    report = summarize(plan, results, executions, submitter=me, quarantined={bad}, jobs=4)
    assert report["wrong"] == 1 and report["wrong_rate"] == 0.25 and report["failed"] == 1
    assert report["errors"] == {"Rejected[no_quorum]": 1}
    assert report["executions"] == 5 and report["executions_per_job"] == 1.25
    assert report["other_executions"] == 1
    # Honest peers ran 4 of 5 (0.8) against a fair share of 3/4: ratio 1.0667, capped at 1.
    assert report["honest_work_ratio"] == pytest.approx(0.8 / 0.75, abs=1e-4) and report["honest_work_share"] == 1
    assert report["pretrusted_work_share"] == 0.4
    assert report["honest_peers_used"] == round(2 / 3, 4)
    assert (report["malicious_quarantined"], report["honest_quarantined"]) == (1, 0)
    assert report["execution_count_mismatches"] == 1 and report["executions_reported_per_job"] == round(5 / 3, 4)
    missed = check({**report, "scenario": "always-wrong"})
    assert any(m.startswith("wrong_rate") for m in missed)


def test_praise_is_fully_signed_but_comes_from_a_fresh_key() -> None:
    sybil, cheater, colluder = Identity.generate(), Identity.generate(), Identity.generate()
    job_id, pairs = fabricate(sybil, [cheater, colluder], "f" * 24, 1)
    (request, result), proof = pairs[0], pairs[1:]
    evidence = make_evidence(
        "agree", cheater.public_key, sybil.public_key, job_id=job_id, capability="sim.compute",
        request=request, result=result, proof=proof,
    )  # fmt: skip
    assert check_proof(evidence).proven  # nothing to catch in the signatures: only the key's standing


def test_forged_record_verifies_only_as_its_forger() -> None:
    cheater = Identity.generate()
    frame = forged_record(cheater, cheater.public_key, good=True)
    record = wire.open_statement(wire.TRUST_MAGIC, Record, "service", frame)
    assert record.service == cheater.public_key and record.good == 1000


def test_matrix_table_marks_missed_targets() -> None:
    from meshjobs.sim.matrix import markdown

    base = {
        "peers": 40, "malicious": 12, "pretrusted": 3, "jobs": 300, "wrong_rate": 0.0, "executions_per_job": 1.3,
        "honest_work_share": 1.0, "pretrusted_work_share": 0.1, "honest_peers_used": 1.0, "honest_quarantined": 0,
        "malicious_quarantined": 12, "failed_rate": 0.0,
    }  # fmt: skip
    reports = [
        {**base, "scenario": "always-wrong", "seed": 1},
        {**base, "scenario": "always-wrong", "seed": 2, "wrong_rate": 0.04},
        {**base, "scenario": "collective", "seed": 1, "malicious_quarantined": 0},
        {**base, "scenario": "camouflage", "seed": 1, "collude": True, "malicious_quarantined": 10},
        {**base, "scenario": "camouflage", "seed": 1, "collude": False},
        {**base, "scenario": "long-con", "seed": 1, "role_aware": True, "wrong_rate": 0.02},
        {**base, "scenario": "long-con", "seed": 1, "role_aware": True, "collude": True},
        {**base, "scenario": "long-con", "seed": 1},
    ]
    table = markdown(reports)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "2.0% ✗" in rows["always-wrong"] and "| 2 |" in rows["always-wrong"]
    assert "✗" not in rows["collective"]  # catching every colluder is not a target there
    assert "✗" not in rows["camouflage"] and "83.3% ✗" in rows["camouflage (colluding)"]  # a row of their own
    assert "✗" not in rows["long-con"] and "2.0% ✗" in rows["long-con (role-aware)"]
    assert "✗" not in rows["long-con (colluding, role-aware)"]


def test_matrix_refuses_collusion_where_no_scenario_has_it(capsys: pytest.CaptureFixture[str]) -> None:
    from meshjobs.sim.matrix import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "/nonexistent/runs.jsonl", "--collude", "--scenarios", "camouflage,forge"])
    assert exit_info.value.code == 2
    assert "--collude applies to camouflage and long-con, not forge" in capsys.readouterr().err
