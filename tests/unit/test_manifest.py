"""Signed manifests and attestations: what verifies, what counts, and for whom."""

from __future__ import annotations

import time

import pytest

from meshjobs.envelope import now_ms, seal_statement
from meshjobs.errors import Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.manifest import (
    MANIFEST_MAGIC,
    MANIFEST_MAX_AGE_MS,
    Manifest,
    Offer,
    attest,
    check_attestations,
    open_attestation,
    open_manifest,
    seal_manifest,
)

OPERATOR, WORKER, OTHER = Identity.generate(), Identity.generate(), Identity.generate()
OPS = frozenset({OPERATOR.public_key})


def manifest(identity: Identity = WORKER, *attestations: bytes, **fields: object) -> bytes:
    base = {"instance": "i1", "kind": "system", "region": "us", "capabilities": [{"name": "demo.add"}]}
    return seal_manifest(identity, {**base, **fields, "attestations": [a.decode() for a in attestations]})


def test_an_attestation_by_a_listed_operator_counts_and_wins_over_the_claim() -> None:
    checked = open_manifest(manifest(WORKER, attest(OPERATOR, WORKER.public_key, kind="human", region="eu")), OPS)
    assert checked.attested == {"kind": "human", "region": "eu"} and checked.attesters == (OPERATOR.public_key,)
    assert checked.manifest.kind == "system"  # the claim is kept apart; discovery shows the operator's word


@pytest.mark.parametrize(
    "attestation",
    [
        attest(OTHER, WORKER.public_key, kind="human"),  # signed by someone this reader does not list
        attest(OPERATOR, OTHER.public_key, kind="human"),  # about another peer, carried by this one
        attest(OPERATOR, WORKER.public_key, kind="human", valid_for_s=0.001),  # expired
    ],
    ids=["stranger", "other-peer", "expired"],
)
def test_attestations_that_do_not_count(attestation: bytes) -> None:
    time.sleep(0.01)
    assert open_manifest(manifest(WORKER, attestation), OPS).attested == {}


def test_an_operators_own_worker_is_attested_as_it_is() -> None:
    checked = open_manifest(manifest(OPERATOR, region="eu", community="lab"), OPS)
    assert checked.attested == {"kind": "system", "region": "eu", "community": "lab"}
    assert open_manifest(manifest(OPERATOR), frozenset()).attested == {}


def test_a_declared_comparison_travels_in_its_canonical_form_and_bad_ones_are_refused() -> None:
    offers = [{"name": "demo.mean", "deterministic": True, "compare": "unordered,rel=0.000001"}, {"name": "demo.add"}]
    checked = open_manifest(manifest(capabilities=offers), OPS)
    assert [o.compare for o in checked.manifest.capabilities] == ["rel=1e-06,unordered", None]
    with pytest.raises(ValueError, match="comparison"):  # a worker never signs one (App refuses it first)
        manifest(capabilities=[{"name": "demo.mean", "compare": "anything-goes"}])
    # A peer that signs one anyway (bypassing the model) is refused by every reader.
    bad = Offer.model_construct(name="demo.mean", deterministic=True, tags=[], compare="anything-goes")
    fields = {"instance": "i1", "kind": "system", "capabilities": [bad], "peer": WORKER.public_key}
    forged = seal_statement(MANIFEST_MAGIC, WORKER, Manifest.model_construct(**fields, issued_at=now_ms()))
    with pytest.raises(Rejected) as caught:
        open_manifest(forged, OPS)
    assert caught.value.reason is Reason.SCHEMA and "comparison" in str(caught.value)


def test_tampered_stale_and_foreign_manifests_are_refused() -> None:
    frame = manifest()
    with pytest.raises(Rejected) as caught:
        open_manifest(frame.replace(b'"us"', b'"eu"'), OPS)
    assert caught.value.reason is Reason.BAD_SIGNATURE
    with pytest.raises(Rejected) as caught:
        open_manifest(frame, OPS, now=now_ms() + MANIFEST_MAX_AGE_MS + 1000)
    assert caught.value.reason is Reason.EXPIRED
    with pytest.raises(Rejected):  # an attestation frame is not a manifest (domain separation)
        open_manifest(attest(OPERATOR, WORKER.public_key, kind="ai"), OPS)


def test_a_worker_refuses_attestations_that_are_not_about_it() -> None:
    ok = attest(OPERATOR, WORKER.public_key, region="eu")
    assert check_attestations([ok], WORKER.public_key) == (ok.decode(),)
    with pytest.raises(UsageError, match="is for peer"):
        check_attestations([ok], OTHER.public_key)
    with pytest.raises(UsageError, match="attestation refused"):
        check_attestations([ok[:-2] + b"x}"], WORKER.public_key)


def test_attest_checks_its_input() -> None:
    with pytest.raises(UsageError, match="not a peer public key"):
        attest(OPERATOR, "UNOPE", kind="ai")
    with pytest.raises(UsageError, match="at least one"):
        attest(OPERATOR, WORKER.public_key)
    with pytest.raises(UsageError, match="label"):
        attest(OPERATOR, WORKER.public_key, region="eu\x1b[2J")
    statement = open_attestation(attest(OPERATOR, WORKER.public_key, community="lab", valid_for_s=60))
    assert statement.vouches() == {"community": "lab"} and statement.expires_at is not None
