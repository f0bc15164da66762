"""Reading reputation without a server: which signed records count, what the CLI shows.

(The model itself, evidence, proof and score, is tested in test_evidence.py.)
"""

from __future__ import annotations

import json
import logging

import pytest

from meshjobs.envelope import EVIDENCE_MAGIC, QUARANTINE_MAGIC, TRUST_MAGIC, now_ms, seal_statement
from meshjobs.identity import Identity
from meshjobs.trust.evidence import Standing, make_evidence
from meshjobs.trust.record import Record, ServiceState, state_key
from meshjobs.trust.reputation import RecordFilter, audit_item, summary

SERVICE = Identity.generate()
STRANGER = Identity.generate()
PEER = Identity.generate().public_key
OTHER = Identity.generate().public_key


def signed(record: Record, by: Identity = SERVICE) -> bytes:
    return seal_statement(TRUST_MAGIC, by, record.stamped(by.public_key))


def test_only_records_signed_by_a_listed_service_count(caplog: pytest.LogCaptureFixture) -> None:
    books = RecordFilter(frozenset({SERVICE.public_key}))
    record = Record(peer=PEER, good=3.0, proven=3.0, updated_ms=now_ms())
    opened = books.open(PEER, signed(record))
    assert opened is not None and opened.service == SERVICE.public_key and opened.good == 3.0
    with caplog.at_level(logging.WARNING, "meshjobs.trust.reputation"):
        for _ in range(3):  # a stranger's record, however often: ignored, and logged once
            assert books.open(PEER, signed(record.model_copy(update={"good": 1000.0}), STRANGER)) is None
        assert books.open(PEER, json.dumps({"peer": PEER, "alpha": 1000}).encode()) is None  # the old plain JSON
        assert books.open(PEER, b"") is None  # a delete marker
    stranger_lines = [r for r in caplog.records if STRANGER.public_key[:12] in r.getMessage()]
    assert len(stranger_lines) == 1


def test_misfiled_tampered_and_other_kinds_of_statement_do_not_count() -> None:
    books = RecordFilter(frozenset({SERVICE.public_key}))
    assert books.open(OTHER, signed(Record(peer=PEER))) is None  # PEER's record under OTHER's key
    frame = signed(Record(peer=PEER, good=1.0))
    assert books.open(PEER, frame.replace(b'"good":1.0', b'"good":9.0')) is None
    assert books.open(PEER, b"MJ1Q" + seal_statement(QUARANTINE_MAGIC, SERVICE, Record(peer=PEER))[4:]) is None
    state = ServiceState(service=SERVICE.public_key, seq=1, last_seq=5)
    assert books.open(state_key(SERVICE.public_key), seal_statement(TRUST_MAGIC, SERVICE, state)) is None


def test_a_lower_seq_never_replaces_a_higher_one() -> None:
    first = Record(peer=PEER).stamped(SERVICE.public_key, 100)
    second = first.stamped(SERVICE.public_key, 50)  # the clock went back: seq still grows
    assert second.seq == 101
    assert RecordFilter.newer(second, first) and not RecordFilter.newer(first, second)
    assert RecordFilter.newer(first, None)


def test_summary_is_what_the_cli_shows() -> None:
    record = Record(peer=PEER, good=3.0, bad=1.0, proven=2.0, verified=2, latency_ms=12.34567, updated_ms=now_ms())
    shown = summary(record.stamped(SERVICE.public_key))
    assert {"score", "mean", "counts", "verified", "wrong", "latency_ms", "auto_quarantined", "reason"} <= set(shown)
    assert shown["latency_ms"] == 12.346 and shown["signed_by"] == SERVICE.public_key
    assert 0 < shown["score"] < shown["mean"] and shown["auto_quarantined"] is False
    assert summary(Record(peer=PEER))["signed_by"] is None and summary(Record(peer=PEER))["score"] == 0.0


def test_an_audit_line_says_why_invalid_evidence_did_not_count() -> None:
    submitter = Identity.generate()
    standing = Standing(frozenset({submitter.public_key}), lambda key: 0.0)
    bare = make_evidence("success", PEER, submitter.public_key, job_id="job-000000001", capability="demo.add")
    item = audit_item(bare, "", standing)
    assert item["valid"] is False and "must embed" in item["problem"] and item["proof_verified"] is False
    timeout = make_evidence("timeout", PEER, submitter.public_key, job_id="job-000000001", capability="demo.add")
    item = audit_item(timeout, "", standing)
    assert item["valid"] and item["standing"] == 1.0 and "+1.000 bad" in item["weighs"]
    assert audit_item(None, "does not verify", standing) == {"valid": False, "problem": "does not verify"}
    frame = seal_statement(EVIDENCE_MAGIC, submitter, timeout)
    assert frame.startswith(b"MJ1V " + submitter.public_key.encode())
