"""Quarantine orders without a network: the highest signed seq wins; nothing else ever lifts a quarantine."""

from __future__ import annotations

import itertools
import logging

import pytest
from pydantic import ValidationError

from meshjobs.envelope import EVIDENCE_MAGIC, QUARANTINE_MAGIC, seal_statement
from meshjobs.errors import Rejected
from meshjobs.identity import Identity
from meshjobs.trust.quarantine import MAX_SEQ, SPEC, Order, QuarantineBoard, supersedes

OPERATOR = Identity.generate()
OTHER_OPERATOR = Identity.generate()
STRANGER = Identity.generate()
PEER = Identity.generate().public_key


def order(action: str, seq: int, by: Identity = OPERATOR, peer: str = PEER, reason: str = "") -> Order:
    return Order(version=1, peer=peer, action=action, seq=seq, reason=reason, operator=by.public_key, at_ms=seq)  # type: ignore[arg-type]


def frame(action: str, seq: int, by: Identity = OPERATOR, peer: str = PEER, reason: str = "") -> bytes:
    return seal_statement(QUARANTINE_MAGIC, by, order(action, seq, by, peer, reason))


def board() -> QuarantineBoard:
    return QuarantineBoard(frozenset({OPERATOR.public_key, OTHER_OPERATOR.public_key}))


def test_an_older_release_never_replaces_a_newer_quarantine() -> None:
    b = board()
    old_release = frame("release", 5)
    assert b.apply(PEER, frame("quarantine", 4))
    assert b.apply(PEER, old_release) and not b.is_quarantined(PEER)
    assert b.apply(PEER, frame("quarantine", 6)) and b.is_quarantined(PEER)
    # The captured, validly signed release of seq 5, republished: changes nothing.
    assert not b.apply(PEER, old_release)
    assert b.is_quarantined(PEER)
    with pytest.raises(Rejected, match="quarantined"):
        b.check(PEER)
    # A newer release by an operator lifts it.
    assert b.apply(PEER, frame("release", 7, OTHER_OPERATOR)) and not b.is_quarantined(PEER)
    b.check(PEER)


def test_equal_seq_is_ignored_and_a_tie_resolves_to_quarantine() -> None:
    b = board()
    assert b.apply(PEER, frame("quarantine", 10, reason="first"))
    assert not b.apply(PEER, frame("quarantine", 10, OTHER_OPERATOR, reason="second"))
    assert b.orders[PEER].reason == "first"
    assert not b.apply(PEER, frame("release", 10))
    assert b.is_quarantined(PEER)
    # The other way round: a release first, then a quarantine of the same seq wins.
    b = board()
    assert b.apply(PEER, frame("release", 10)) and b.apply(PEER, frame("quarantine", 10))
    assert b.is_quarantined(PEER)


def test_any_arrival_order_gives_the_same_verdict() -> None:
    """History replayed from the bucket, a restarted watch, revisions out of order: same outcome."""
    frames = [frame("quarantine", 1), frame("release", 2), frame("quarantine", 3), frame("release", 3)]
    frames += [b"", frame("release", 9, STRANGER)]
    for permutation in itertools.permutations(frames):
        b = board()
        for data in permutation:
            b.apply(PEER, data)
        assert b.is_quarantined(PEER) and b.orders[PEER].seq == 3


@pytest.mark.parametrize("operation", ["DEL", "PURGE"])
def test_delete_and_purge_markers_never_lift_a_quarantine(operation: str) -> None:
    b = board()
    b.apply(PEER, frame("quarantine", 3))
    assert not b.apply(PEER, b"", operation)
    assert not b.apply(PEER, frame("release", 9), operation)  # a marker's body is not an order, whatever it holds
    assert not b.apply(PEER, b"")  # an empty value without a header
    assert b.is_quarantined(PEER)


def test_forged_misfiled_and_malformed_orders_are_ignored() -> None:
    b = board()
    b.apply(PEER, frame("quarantine", 3))
    other_peer = Identity.generate().public_key
    rejected = [
        frame("release", 99, STRANGER),  # signed, but not by an operator here
        frame("release", 99, peer=other_peer),  # an operator's release of another peer, filed under this one
        frame("release", 99)[:-5] + b"xxxx}",  # tampered after signing
        seal_statement(EVIDENCE_MAGIC, OPERATOR, order("release", 99)),  # a signature made for another kind
        b"MJ1Q garbage",
        b"\xff" * 100,
        frame("release", 99).replace(OPERATOR.public_key.encode(), STRANGER.public_key.encode(), 1),
    ]
    for data in rejected:
        assert not b.apply(PEER, data), data[:60]
    assert b.is_quarantined(PEER) and b.orders[PEER].seq == 3
    # Orders for a peer nobody quarantined create nothing either.
    assert not b.apply(other_peer, frame("quarantine", 5, STRANGER, peer=other_peer))
    assert not b.is_quarantined(other_peer)


def test_a_forged_quarantine_does_not_quarantine() -> None:
    b = board()
    assert not b.apply(PEER, frame("quarantine", 50, STRANGER))
    assert not b.is_quarantined(PEER) and PEER not in b.orders


def test_problems_are_logged_once_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    b = board()
    b.apply(PEER, frame("quarantine", 3))
    other_peer = Identity.generate().public_key
    with caplog.at_level(logging.INFO, logger="meshjobs.trust.quarantine"):
        for _ in range(50):
            b.apply(PEER, b"", "DEL")
            b.apply(PEER, frame("release", 1))
            b.apply(PEER, frame("release", 9, STRANGER))
            b.apply(other_peer, b"", "PURGE")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages
    assert sum("delete or purge" in m for m in messages) == 2
    assert sum("older order" in m for m in messages) == 1
    assert sum("not an operator" in m for m in messages) == 1


def test_log_lines_show_hostile_keys_escaped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meshjobs.trust.quarantine"):
        board().apply("\x1b[2Jevil\u202e", b"junk")
    assert caplog.records and "\x1b" not in caplog.text and "\u202e" not in caplog.text


def test_order_schema() -> None:
    assert supersedes(order("release", 2), order("quarantine", 1))
    assert not supersedes(order("release", 1), order("quarantine", 1))
    for bad in ({"seq": 0}, {"seq": MAX_SEQ + 1}, {"seq": "5"}, {"version": 2}, {"peer": "U" * 56}):
        fields = order("quarantine", 1).model_dump() | bad
        with pytest.raises(ValidationError):
            Order.model_validate(fields)
    with pytest.raises(ValidationError):
        Order.model_validate(order("quarantine", 1).model_dump() | {"extra": 1})


def test_the_bucket_refuses_purges_and_rollups() -> None:
    config = SPEC.config(None, None)
    assert config.deny_purge and config.deny_delete and not config.allow_rollup_hdrs
    assert config.max_msgs_per_subject == 16 and config.name == "KV_quarantine"
