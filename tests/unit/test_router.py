"""Trust routing without a server: who qualifies, in what order, fallback, and the redundancy vote.

The router gets in-memory peers, records and a quarantine board fed real
signed orders. Its client is a stand-in that is honest about what matters:
each job is a real signed envelope, each "worker" verifies it and signs its
answer with its own key, and the answer is verified and settled by the real
code before the router sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from meshjobs.client import Outcome, settle
from meshjobs.discovery import PeerInfo
from meshjobs.envelope import (
    QUARANTINE_MAGIC,
    digest,
    now_ms,
    open_envelope,
    open_result,
    seal_envelope,
    seal_result,
    seal_statement,
)
from meshjobs.errors import JobTimeout, MeshError, NoPeerError, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.router import Constraints, Router, result_digest
from meshjobs.subjects import audience_for
from meshjobs.submit import Submitted
from meshjobs.trust.evidence import check_proof
from meshjobs.trust.quarantine import Order, QuarantineBoard
from meshjobs.trust.reputation import Evidence, Record, ReputationBook
from meshjobs.verify import Verifier

ALICE = Identity.generate()
OPERATOR = Identity.generate()
KEYS = {name: Identity.generate() for name in "abcde"}
PEERS = {name: key.public_key for name, key in KEYS.items()}
NAMES = {key: name for name, key in PEERS.items()}
HANG = object()


@dataclass
class Slow:
    value: Any
    seconds: float


def info(
    name: str,
    *,
    region: str = "eu",
    kind: str = "system",
    deterministic: bool = True,
    attested: tuple[str, ...] = ("kind", "region"),
    price: float = 0.0,
    slots: int = 4,
    community: str = "",
    compare: str | None = None,
) -> PeerInfo:
    caps = ("demo.add",)
    return PeerInfo(
        PEERS[name], name, kind, region, community, f"i-{name}", "1", caps, caps if deterministic else (),
        attested=attested, price=price, slots=slots, comparisons=(("demo.add", compare),) if compare else (),
    )  # fmt: skip


def quarantined_record(name: str) -> Record:
    return Record(peer=PEERS[name], bad=10, wrong=1, quarantined=True, reason="wrong results")


def record(name: str, alpha: float = 0.0, beta: float = 0.0, latency: float | None = None, bad: int = 0) -> Record:
    # updated_ms=0 and a fixed "now" in score(): no decay.
    return Record(peer=PEERS[name], good=alpha, bad=beta, latency_ms=latency, failures=bad)


class FakeClient:
    """Runs each job "on" the named peer: real envelope, real worker signature, real verification."""

    def __init__(self, peers: list[PeerInfo], answers: dict[str, Any]) -> None:
        self.identity = ALICE
        self._peers = peers
        self.answers = answers  # name -> value, ("error", message), JobTimeout, NoPeerError or HANG
        self.asked: list[str] = []
        self.sent: dict[str, tuple[float, float]] = {}  # name -> (when, the validity it was given)

    async def peers(self, *, timeout: float, capability: str | None = None, **_: Any) -> list[PeerInfo]:
        return self._peers

    async def submit(self, capability: str, args: dict[str, Any], *, peer: str, job_id: str, **kw: Any) -> Outcome:
        name = NAMES[peer]
        self.asked.append(name)
        self.sent[name] = (time.monotonic(), kw["valid_for"])
        _, request = seal_envelope(ALICE, capability, args, audience=audience_for(capability, peer), job_id=job_id,
                                   ttl_ms=30_000)  # fmt: skip
        envelope = open_envelope(request)  # what the worker checks first
        answer = self.answers[name]
        if isinstance(answer, Slow) and answer.seconds > kw["timeout"]:  # as the real client: no longer than that
            answer = HANG
        if isinstance(answer, Slow):
            await asyncio.sleep(answer.seconds)
            answer = answer.value
        if answer is HANG:  # a peer that never answers: the caller's timeout ends the wait
            await asyncio.sleep(kw["timeout"])
            raise JobTimeout(f"{capability}: no result within {kw['timeout']:g} s")
        if answer is JobTimeout:
            raise JobTimeout(f"{capability}: no result")
        if answer is NoPeerError:  # nobody listens for the peer any more
            raise NoPeerError(f"no capable peer: {capability!r} is not offered by {peer[:12]}…")
        failed = isinstance(answer, tuple)
        frame = seal_result(
            KEYS[name],
            request_digest=digest(request),
            job_id=envelope.job_id,
            status="error" if failed else "ok",
            value=None if failed else answer,
            error=("RuntimeError", answer[1]) if failed else None,
        )
        return settle(Outcome(open_result(frame), frame, request, capability, 1, 0.004))


class FakeBook:
    """Records in memory; evidence built by the real method, kept instead of stored."""

    def __init__(self, records: list[Record]) -> None:
        self.identity = ALICE
        self._records = {r.peer: r for r in records}
        self.stored: list[Evidence] = []

    async def records(self, peers: list[str]) -> dict[str, Record]:
        return {p: self._records.get(p) or Record(peer=p) for p in peers}

    def cached(self, peer: str) -> Record | None:
        return self._records.get(peer)

    def evidence_for(self, *args: Any, **kw: Any) -> Evidence:
        return ReputationBook.evidence_for(self, *args, **kw)  # type: ignore[arg-type]  # needs only .identity

    async def store(self, batch: list[Evidence]) -> dict[str, Record]:
        self.stored.extend(batch)
        return {}


def ranked(*names: str) -> list[Record]:
    """Records that rank *names* in this order: scores 0.9, 0.7, 0.5, 0.3."""
    return [record(n, *ab) for n, ab in zip(names, [(9, 0), (1, 0), (0, 0), (0, 1)], strict=False)]


def router(
    peers: list[PeerInfo],
    records: Sequence[Record] = (),
    answers: dict[str, Any] | None = None,
    *,
    by_name: bool = True,
    **orders: str,
) -> Router:
    board = QuarantineBoard(frozenset({OPERATOR.public_key}))  # no bucket: orders are applied by hand
    for name, signer in orders.items():
        order = Order(
            version=1, peer=PEERS[name], action="quarantine", reason="test", operator=signer, at_ms=now_ms(), seq=1
        )
        signing_key = OPERATOR if signer == OPERATOR.public_key else ALICE
        # As the bucket watch delivers it: verified, and honoured only from an operator.
        board.apply(PEERS[name], seal_statement(QUARANTINE_MAGIC, signing_key, order))
    client = FakeClient(peers, answers or {})
    r = Router(client, FakeBook(list(records)), board)  # type: ignore[arg-type]
    if by_name:  # the ranking is a weighted random order (tested on its own); pin it where order is the point
        r.rank = lambda found: sorted(found, key=lambda c: NAMES[c.peer])  # type: ignore[method-assign]
    return r


def stored(r: Router) -> list[Evidence]:
    return r.book.stored  # type: ignore[attr-defined, no-any-return]  # the FakeBook's


def asked(r: Router) -> list[str]:
    return r.client.asked  # type: ignore[attr-defined, no-any-return]  # the FakeClient's


def evidence(r: Router) -> list[tuple[str, str]]:
    return sorted((NAMES[e.peer], e.kind) for e in stored(r))


# -- who qualifies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraints", "peer", "reason"),
    [
        (Constraints(), info("a"), None),
        (Constraints(region="eu"), info("a"), None),
        (Constraints(region="us"), info("a"), "region eu is not us"),
        (Constraints(region="us"), info("a", region=""), "region - is not us"),
        (Constraints(kind="ai"), info("a"), "kind system is not ai"),
        (
            Constraints(kind="system"),
            info("a", attested=("region",)),
            "kind system is only claimed; no operator attested it",
        ),
        (Constraints(region="eu"), info("a", attested=("kind",)), "region eu is only claimed; no operator attested it"),
        (Constraints(max_price=0.5), info("a", price=0.5), None),
        (Constraints(max_price=0.5), info("a", price=0.75), "price 0.75 is above 0.5"),
        (Constraints(peer=PEERS["b"]), info("a"), "not the requested peer"),
        (Constraints(peer=PEERS["a"]), info("a"), None),
        (Constraints(min_trust=0.0), info("a"), None),
        (Constraints(min_trust=0.01), info("a"), "score 0.00 is below 0.01"),
    ],
)
def test_constraints_admit(constraints: Constraints, peer: PeerInfo, reason: str | None) -> None:
    assert constraints.admits(peer, record("a")) == reason


async def test_candidates_are_filtered_and_ranked() -> None:
    peers = [info("a"), info("b"), info("c"), info("d", region="us"), info("a")]
    peers.append(PeerInfo(PEERS["e"], "e", "system", "eu", "", "i-e", "1", ("other.cap",)))
    records = [record("a", alpha=9, latency=50), record("b"), record("c", alpha=5, latency=5)]
    found = await router(peers, records).candidates("demo.add", Constraints(region="eu"))
    assert sorted(NAMES[c.peer] for c in found) == ["a", "b", "c"]  # one entry per peer, d and e left out


async def test_prefer_region_tries_attested_local_peers_first_and_falls_back() -> None:
    peers = [info("a", region="us"), info("b", region="eu"), info("c", region="eu", attested=("kind",)), info("d")]
    r = router(peers, by_name=False)
    for _ in range(50):
        order = [NAMES[c.peer] for c in await r.candidates("demo.add", Constraints(prefer_region="eu"))]
        assert sorted(order[:2]) == ["b", "d"]  # attested in eu; c only claims eu, a is elsewhere
        assert sorted(order[2:]) == ["a", "c"]  # still there: the fallback when eu does not answer


async def test_peers_without_free_slots_go_last() -> None:
    r = router([info("a", slots=0), info("b"), info("c")], by_name=False)
    for _ in range(50):
        assert NAMES[(await r.candidates("demo.add", Constraints()))[-1].peer] == "a"


async def test_ranking_prefers_trust_and_load_without_lock_in() -> None:
    r = router([info("a"), info("b")], [record("a", alpha=40)], by_name=False)  # b is unknown (score 0)
    firsts = [NAMES[(await r.candidates("demo.add", Constraints()))[0].peer] for _ in range(400)]
    assert firsts.count("a") > 1.5 * firsts.count("b") > 0  # the trusted peer leads, the newcomer still works
    r.inflight[PEERS["a"]] = 8  # a is busy with this router's jobs: the load evens it out
    firsts = [NAMES[(await r.candidates("demo.add", Constraints()))[0].peer] for _ in range(400)]
    assert firsts.count("b") > firsts.count("a")


async def test_quarantined_peers_are_never_candidates() -> None:
    peers = [info(n) for n in "abcd"]
    records = [record("a", alpha=50), quarantined_record("b"), record("c", beta=10, bad=2)]
    # a: ordered out by an operator; d: an order signed by a non-operator is ignored.
    r = router(peers, records, a=OPERATOR.public_key, d=ALICE.public_key)
    found = await r.candidates("demo.add", Constraints())
    assert sorted(NAMES[c.peer] for c in found) == ["c", "d"]  # b quarantined by its signed record
    with pytest.raises(Rejected) as caught:  # asked for by name: said so, not "nobody qualified"
        await r.candidates("demo.add", Constraints(peer=PEERS["a"]))
    assert caught.value.reason is Reason.QUARANTINED


def release(name: str, seq: int) -> bytes:
    order = Order(version=1, peer=PEERS[name], action="release", reason="appeal", operator=OPERATOR.public_key,
                  at_ms=now_ms(), seq=seq)  # fmt: skip
    return seal_statement(QUARANTINE_MAGIC, OPERATOR, order)


async def test_a_peer_proven_wrong_gets_no_more_work_from_that_submitter_until_released() -> None:
    """Before the trust service's quarantine arrives: the submitter holds the signed proof itself."""
    r = router([info(n) for n in "abcd"], answers={"a": 5, "b": 6, "c": 5, "d": 5})
    r.anchors = frozenset({PEERS["a"]})
    r.rank = lambda found: sorted(found, key=lambda c: (c.peer != PEERS["b"], NAMES[c.peer]))  # type: ignore[method-assign]
    done = await Verifier(r).submit("demo.add", {"x": 1})
    await r.flush()
    assert done.outcome.value == 5 and done.dissenting == [PEERS["b"]] and "b" in asked(r)[:2]
    assert ("b", "wrong") in evidence(r)
    assert PEERS["b"] not in {c.peer for c in await r.candidates("demo.add", Constraints())}
    with pytest.raises(Rejected) as caught:
        await r.candidates("demo.add", Constraints(peer=PEERS["b"]))
    assert caught.value.reason is Reason.QUARANTINED and "proven wrong" in str(caught.value)
    convicted = r.convicted[PEERS["b"]]
    r.board.apply(PEERS["b"], release("b", convicted - 1))  # a release older than the proof lifts nothing
    assert PEERS["b"] not in {c.peer for c in await r.candidates("demo.add", Constraints())}
    r.board.apply(PEERS["b"], release("b", convicted + 1))
    assert PEERS["b"] in {c.peer for c in await r.candidates("demo.add", Constraints())}


async def test_a_checker_that_hangs_is_replaced_within_the_deadline() -> None:
    r = router([info(n) for n in "abc"], answers={"a": 5, "b": HANG, "c": 5})
    r.witnessed[PEERS["b"]] = 50  # vouched for by this submitter: drawn as a's checker first
    done = await Verifier(r).submit("demo.add", {"x": 1}, timeout=6)
    assert done.outcome.value == 5 and done.agreeing == sorted([PEERS["a"], PEERS["c"]])
    assert [(NAMES[t.peer], t.outcome) for t in done.trace] == [("a", "success"), ("b", "timeout"), ("c", "success")]
    assert done.trace[1].ms < 4000  # a third of the timeout (2 s), not all that was left


async def test_a_job_and_its_check_are_sent_together_so_no_peer_can_tell_which_it_is() -> None:
    """A cheater that answered honestly only when checking would never be caught: it cannot know."""
    r = router([info(n) for n in "ab"], answers={"a": Slow(5, 0.3), "b": 5})  # a has no verified record
    done = await Verifier(r).submit("demo.add", {"x": 1})
    assert done.outcome.value == 5 and done.agreeing == sorted([PEERS["a"], PEERS["b"]])
    (a_sent, a_valid), (b_sent, b_valid) = r.client.sent["a"], r.client.sent["b"]  # type: ignore[attr-defined]
    assert abs(a_sent - b_sent) < 0.1  # not after a's 0.3 s
    # Whole seconds, the same for both: the time spent choosing the checker does not show.
    assert a_valid == b_valid == 30


async def test_a_primary_that_hangs_beside_its_checker_is_cut_and_the_answer_checked_again() -> None:
    r = router([info(n) for n in "abc"], answers={"a": HANG, "b": 5, "c": 5})
    started = time.monotonic()
    done = await Verifier(r).submit("demo.add", {"x": 1}, timeout=6)
    assert done.outcome.value == 5 and done.agreeing == sorted([PEERS["b"], PEERS["c"]])
    assert time.monotonic() - started < 5  # a third of the timeout for a, not all of it
    assert ("a", "timeout") in [(NAMES[t.peer], t.outcome) for t in done.trace]
    await r.flush()
    assert ("a", "timeout") in evidence(r)


class CheckEverything(random.Random):
    def random(self) -> float:
        return 0.0


class CheckNothing(random.Random):
    def random(self) -> float:
        return 0.99


async def test_a_primary_that_hangs_alone_gets_the_next_peer_beside_it() -> None:
    proven = [Record(peer=PEERS[n], verified=10) for n in "ab"]  # spot-checked at 10%: here, not at all
    r = router([info(n) for n in "ab"], proven, {"a": HANG, "b": 5})
    started = time.monotonic()
    done = await Verifier(r, rng=CheckNothing()).submit("demo.add", {"x": 1}, timeout=6)
    assert done.outcome.value == 5 and done.agreeing == [PEERS["b"]]
    assert time.monotonic() - started < 3  # b was asked after a third of the timeout, not after all of it
    assert sorted((NAMES[t.peer], t.outcome) for t in done.trace) == [("a", "timeout"), ("b", "success")]
    await r.flush()
    assert ("a", "timeout") in evidence(r)  # it had its share


async def test_a_long_job_finishes_where_it_runs_while_the_next_peer_is_asked_beside_it() -> None:
    """Past its share the first peer is not cut: the first answer wins, and a hedge cut early is not at fault."""
    proven = [Record(peer=PEERS[n], verified=10) for n in "ab"]
    r = router([info(n) for n in "ab"], proven, {"a": Slow(5, 1.3), "b": Slow(5, 2.5)})
    done = await Verifier(r, rng=CheckNothing()).submit("demo.add", {"x": 1}, timeout=3)  # a share: 1 s
    assert done.outcome.value == 5 and done.agreeing == [PEERS["a"]]
    assert asked(r) == ["a", "b"]  # b was asked at 1 s
    assert sorted((NAMES[t.peer], t.outcome) for t in done.trace) == [("a", "success"), ("b", "cancelled")]
    assert Submitted(done.outcome, done.trace).executions == 2  # b ran it too: the hedge has a cost
    await r.flush()
    assert evidence(r) == [("a", "success")]  # b was cut after 0.3 s of its 1 s share: no timeout against it


async def test_hedges_cut_early_are_not_at_fault_even_when_the_check_takes_longer() -> None:
    """a answers at 1.3 s, its checker at 2.5 s; the hedge and its checker, asked at 1 s, are cut at 1.3 s."""
    proven = [Record(peer=PEERS[n], verified=10) for n in "abcd"]
    slow = {"a": Slow(5, 1.3), **dict.fromkeys("bcd", Slow(5, 2.5))}
    r = router([info(n) for n in "abcd"], proven, slow)
    done = await Verifier(r, rng=CheckEverything()).submit("demo.add", {"x": 1}, timeout=3)
    assert done.outcome.value == 5 and PEERS["a"] in done.agreeing and len(done.agreeing) == 2
    assert sorted(t.outcome for t in done.trace) == ["cancelled", "cancelled", "success", "success"]
    await r.flush()
    assert not [e for e in evidence(r) if e[1] == "timeout"]


async def test_a_job_longer_than_every_share_says_to_raise_the_timeout() -> None:
    r = router([info(n) for n in "abc"], answers=dict.fromkeys("abc", Slow(5, 2.5)))
    with pytest.raises(JobTimeout, match="no result within 3 s from 3 peers.*raise --timeout") as caught:
        await r.submit("demo.add", {"x": 1}, timeout=3)
    assert [(NAMES[t.peer], t.outcome) for t in caught.value.trace] == [(n, "timeout") for n in "abc"]


async def test_a_peer_known_for_long_jobs_gets_the_time_they_take_on_the_routed_path() -> None:
    """Routed jobs (not checked) fall back by cutting: the share grows with what the peer's record says."""
    for latency, outcome in ((None, "timeout"), (1500.0, "success")):  # a third of the timeout is 1 s
        records = [Record(peer=PEERS[n], latency_ms=latency) for n in "ab"]
        r = router([info(n) for n in "ab"], records, {"a": Slow(5, 1.5), "b": ("error", "boom")})
        with contextlib.suppress(MeshError):
            await r.submit("demo.add", {"x": 1}, timeout=3)
        await r.flush()
        assert ("a", outcome) in evidence(r)


async def test_an_unproven_result_nobody_checked_is_refused_unless_nobody_else_is_there() -> None:
    """A checker that fails, refuses or hangs cannot wave an unproven peer's result through."""
    r = router([info(n) for n in "ab"], answers={"a": 5, "b": ("error", "boom")})
    with pytest.raises(Rejected) as caught:
        await Verifier(r).submit("demo.add", {"x": 1})
    assert caught.value.reason is Reason.NO_QUORUM and "could not be checked" in str(caught.value)
    assert sorted((NAMES[t.peer], t.outcome) for t in caught.value.trace) == [("a", "success"), ("b", "failure")]
    # The only peer there is, or the others gone since discovery: the unverified result, said so.
    for peers, answers in (([info("a")], {"a": 5}), ([info("a"), info("b")], {"a": 5, "b": NoPeerError})):
        done = await Verifier(router(peers, answers=answers)).submit("demo.add", {"x": 1})
        assert done.outcome.value == 5 and done.trace[-1].outcome == "unverified"
    # A spot check of a peer with a verified record that fails costs the value nothing: it rests on the record.
    r = router([info(n) for n in "ab"], [Record(peer=PEERS["a"], verified=10)], {"a": 5, "b": ("error", "boom")})
    done = await Verifier(r, rng=CheckEverything()).submit("demo.add", {"x": 1})
    assert done.outcome.value == 5 and done.trace[-1].outcome == "unverified"


async def test_equal_peers_share_the_load() -> None:
    r = router([info("a"), info("b")], by_name=False)
    firsts = {NAMES[(await r.candidates("demo.add", Constraints()))[0].peer] for _ in range(64)}
    assert firsts == {"a", "b"}


def test_result_digest_compares_status_and_value_only() -> None:
    def done(name: str, value: Any, status: str = "ok") -> Outcome:
        frame = seal_result(KEYS[name], request_digest="0" * 64, job_id="job-0000000001", status=status, value=value)
        return Outcome(open_result(frame), frame, b"", "demo.add", 1, 0.0)

    assert result_digest(done("a", {"x": 1, "y": [2]})) == result_digest(done("b", {"y": [2], "x": 1}))
    assert result_digest(done("a", 5)) != result_digest(done("b", 6))
    assert result_digest(done("a", None)) != result_digest(done("a", None, status="error"))
    # One JSON number: a handler returning 5.0 agrees with one returning 5 (nobody is convicted for it).
    assert result_digest(done("a", {"n": [5, 2.0]})) == result_digest(done("b", {"n": [5.0, 2]}))
    assert result_digest(done("a", 5.5)) != result_digest(done("b", 5))


# -- fallback ------------------------------------------------------------------------


async def test_a_failure_falls_back_to_the_next_peer_and_is_reported() -> None:
    peers = [info("a"), info("b"), info("c")]
    r = router(peers, ranked("a", "b", "c"), answers={"a": ("error", "boom"), "b": JobTimeout, "c": 5})
    done = await r.submit("demo.add", {"a": 2, "b": 3}, timeout=5)
    await r.flush()
    assert done.outcome.value == 5 and done.outcome.worker == PEERS["c"]
    assert [(NAMES[t.peer], t.outcome) for t in done.trace] == [("a", "failure"), ("b", "timeout"), ("c", "success")]
    assert evidence(r) == [("a", "failure"), ("b", "timeout"), ("c", "success")]
    failure = next(e for e in stored(r) if e.kind == "failure")
    assert open_result((failure.result or "").encode()).worker == PEERS["a"]  # the worker's own signed failure


async def test_nobody_qualified_is_no_peer() -> None:
    with pytest.raises(NoPeerError) as caught:
        await router([info("a")]).submit("demo.add", constraints=Constraints(kind="human"))
    assert caught.value.exit_code == 3


# -- the quorum (--verify quorum:N/M) -----------------------------------------------------


async def test_the_majority_wins_and_the_dissenter_is_proven_wrong() -> None:
    r = router([info(n) for n in "abc"], ranked("a", "b", "c"), answers={"a": 5, "b": 6, "c": 5})
    done = await Verifier(r).submit_quorum("demo.add", {"a": 2}, replicas=3, quorum=2)
    await r.flush()
    assert done.outcome.value == 5 and done.agreeing == sorted([PEERS["a"], PEERS["c"]])
    assert done.dissenting == [PEERS["b"]]
    assert evidence(r) == [("a", "agree"), ("b", "wrong"), ("c", "agree")]
    wrong = next(e for e in stored(r) if e.kind == "wrong")
    assert open_result((wrong.result or "").encode()).value == 6 and "outvoted by 2" in wrong.detail
    # the proof: both agreeing peers' own signed results
    assert sorted(open_result(item.result.encode()).worker for item in wrong.proof) == sorted([PEERS["a"], PEERS["c"]])


async def test_more_peers_are_asked_until_a_quorum_agrees() -> None:
    answers = {"a": 5, "b": ("error", "boom"), "c": 6, "d": 5}
    r = router([info(n) for n in "abcd"], ranked("a", "b", "c", "d"), answers=answers)
    done = await Verifier(r).submit_quorum("demo.add", replicas=2, quorum=2)
    await r.flush()
    assert sorted(asked(r)[:2]) == ["a", "b"] and asked(r)[2:] == ["c", "d"] and done.outcome.value == 5
    assert evidence(r) == [("a", "agree"), ("b", "failure"), ("c", "wrong"), ("d", "agree")]


async def test_no_quorum_is_refused() -> None:
    r = router([info(n) for n in "ab"], ranked("a", "b"), answers={"a": 5, "b": 6})
    with pytest.raises(Rejected) as caught:
        await Verifier(r).submit_quorum("demo.add", replicas=2, quorum=2)
    assert caught.value.reason is Reason.NO_QUORUM and caught.value.exit_code == 5


async def test_results_compare_as_the_capability_declares_and_the_evidence_says_how() -> None:
    """Floating-point noise is no disagreement where the capability declares a tolerance; a real difference is."""
    answers = {"a": 1.0, "b": 1.0000001, "c": 2.0}
    r = router([info(n, compare="rel=1e-6") for n in "abc"], ranked("a", "b", "c"), answers=answers)
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2)
    await r.flush()
    assert done.outcome.value in (1.0, 1.0000001) and done.agreeing == sorted([PEERS["a"], PEERS["b"]])
    assert evidence(r) == [("a", "agree"), ("b", "agree"), ("c", "wrong")]
    assert {e.compare for e in stored(r)} == {"rel=1e-06"}
    for piece in stored(r):  # the trust service checks the proof by the comparison the evidence carries
        assert check_proof(piece).proven and _refused(piece.model_copy(update={"compare": None}))
    # Declared exact (the default), the same answers are three different values: nobody is outweighed.
    exact = router([info(n) for n in "abc"], ranked("a", "b", "c"), answers=answers)
    with pytest.raises(Rejected):
        await Verifier(exact).submit_quorum("demo.add", replicas=3, quorum=2)


async def test_agreement_under_a_tolerance_is_proven_by_the_results_within_it() -> None:
    """1 - d and 1 + d are each within the tolerance of 1 but not of each other: each agrees, with proof that holds."""
    answers = {"a": 1.0, "b": 1.0 + 9e-7, "c": 1.0 - 9e-7}
    r = router([info(n, compare="rel=1e-6") for n in "abc"], ranked("a", "b", "c"), answers=answers)
    await Verifier(r, CheckEverything()).submit_quorum("demo.add", replicas=3, quorum=3)
    await r.flush()
    assert evidence(r) == [("a", "agree"), ("b", "agree"), ("c", "agree")]
    assert all(check_proof(piece).proven for piece in stored(r))


def _refused(piece: Evidence) -> bool:
    try:
        check_proof(piece)
    except Rejected as exc:
        return exc.code == "invalid_evidence"
    return False


async def test_a_peer_declaring_another_comparison_is_left_out_of_the_check() -> None:
    """A cheater loosening the comparison for itself (or another version of the capability) checks nobody."""
    peers = [info(n, compare="rel=0.5" if n == "c" else "rel=1e-6") for n in "abcd"]
    answers = {"a": 1.0, "b": 1.0000001, "c": 1.4, "d": 1.0}
    r = router(peers, ranked("c", "a", "b", "d"), answers=answers)
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=3)  # by rank: a, b, c without the rule
    await r.flush()
    assert sorted(asked(r)) == ["a", "b", "d"] and done.outcome.value in (1.0, 1.0000001)
    assert {e.compare for e in stored(r)} == {"rel=1e-06"}
    auto = router(peers, ranked("c", "a", "b", "d"), answers=answers)
    await Verifier(auto, CheckEverything()).submit("demo.add")
    assert "c" not in asked(auto)


async def test_agreeing_cheaters_cannot_outvote_trust() -> None:
    """Two peers nobody vouches for agree on a wrong value: the most trusted are asked until trust decides."""
    answers = {"a": 6, "b": 6, "c": 5, "d": 5, "e": 5}
    r = router([info(n) for n in "abcde"], answers=answers)
    r.anchors = frozenset({PEERS["d"]})
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2)
    await r.flush()
    # The replicas a, b and c at once (in random order), then d, the anchor, first of the rest.
    assert done.outcome.value == 5 and sorted(asked(r)[:3]) == ["a", "b", "c"] and asked(r)[3:] == ["d"]
    assert done.agreeing == sorted([PEERS["c"], PEERS["d"]]) and done.dissenting == sorted([PEERS["a"], PEERS["b"]])
    assert evidence(r) == [("a", "wrong"), ("b", "wrong"), ("c", "agree"), ("d", "agree")]
    assert all("outweighed by 2" in e.detail for e in stored(r) if e.kind == "wrong")
    # Proven wrong by trust: this submitter gives them no more work.
    assert {c.peer for c in await r.candidates("demo.add", Constraints())} == {PEERS[n] for n in "cde"}


async def test_a_disagreement_goes_to_the_most_trusted_before_anyone_is_convicted() -> None:
    """Two peers with some credibility outweigh a newcomer: the anchor is still asked, and it decides."""
    credible = [Record(peer=PEERS[n], good=1.2, proven=1.2) for n in "ab"]  # credibility about 0.3 each
    r = router([info(n) for n in "abcd"], credible, answers={"a": 6, "b": 6, "c": 5, "d": 5})
    r.anchors = frozenset({PEERS["d"]})
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2)
    await r.flush()
    assert done.outcome.value == 5 and done.dissenting == sorted([PEERS["a"], PEERS["b"]])
    assert r.convicted.keys() == {PEERS["a"], PEERS["b"]}  # c, the newcomer, is not


async def test_a_headcount_never_overrides_trust() -> None:
    """The only peers left agree on a value an anchor contradicts: no value, nobody convicted."""
    r = router([info(n) for n in "abc"], answers={"a": 5, "b": 6, "c": 6})
    r.anchors = frozenset({PEERS["a"]})
    with pytest.raises(Rejected) as caught:
        await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2)
    assert caught.value.reason is Reason.NO_QUORUM and "1 agreeing peer(s); a quorum needs 2" in str(caught.value)
    assert [t.peer for t in caught.value.trace] and r.convicted == {}
    # Without the anchor, nobody's word weighs more: the headcount the submitter asked for decides,
    # and the dissenter is reported (the trust service punishes only what trust outweighs), not convicted.
    r = router([info(n) for n in "abc"], answers={"a": 5, "b": 6, "c": 6})
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2)
    await r.flush()
    assert done.outcome.value == 6 and done.dissenting == [PEERS["a"]] and r.convicted == {}


async def test_replicas_come_from_distinct_communities() -> None:
    peers = [info("a", community="c1"), info("b", community="c1"), info("c", community="c2"), info("d")]
    r = router(peers, answers=dict.fromkeys("abcd", 5))
    done = await Verifier(r).submit_quorum("demo.add", replicas=2, quorum=2)
    assert done.outcome.value == 5 and sorted(asked(r)) == ["a", "c"]  # not b: a already stands for community c1


async def test_a_replica_that_hangs_does_not_hold_the_quorum() -> None:
    r = router([info(n) for n in "abcd"], answers={"a": HANG, "b": 5, "c": 5, "d": 5})
    started = time.monotonic()
    done = await Verifier(r).submit_quorum("demo.add", replicas=3, quorum=2, timeout=6)
    assert done.outcome.value == 5 and done.agreeing == sorted([PEERS["b"], PEERS["c"]])
    assert time.monotonic() - started < 4.5  # a is cut a third of the timeout after the others answered
    await r.flush()
    assert ("a", "timeout") in evidence(r)


async def test_only_deterministic_peers_vote() -> None:
    r = router([info("a"), info("b", deterministic=False)], answers={"a": 5, "b": 5})
    with pytest.raises(NoPeerError, match="a quorum needs 2"):
        await Verifier(r).submit_quorum("demo.add", replicas=2, quorum=2)
    with pytest.raises(UsageError):
        await Verifier(r).submit_quorum("demo.add", replicas=2, quorum=3)
    assert asked(r) == []
