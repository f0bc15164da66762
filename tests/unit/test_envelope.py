"""The wire format: every tampering is refused with our error and a stable reason."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshjobs.envelope import (
    DOMAIN,
    ENVELOPE_MAGIC,
    HEADER_LEN,
    check_window,
    digest,
    now_ms,
    open_envelope,
    open_result,
    seal_envelope,
    seal_result,
)
from meshjobs.errors import Reason, Rejected
from meshjobs.identity import Identity

ALICE = Identity.generate()
MALLORY = Identity.generate()
SKEW = 60_000
MAX_TTL = 3_600_000


def envelope(capability: str = "demo.add", args: dict | None = None, ttl_ms: int = 30_000, **kw: object) -> bytes:
    _, frame = seal_envelope(
        ALICE,
        capability,
        {"a": 2, "b": 3} if args is None else args,
        audience=f"mesh.cmd.{capability}",
        job_id="job-0000000001",
        ttl_ms=ttl_ms,
        **kw,  # type: ignore[arg-type]
    )
    return frame


def resign(body: dict | bytes, signer: Identity = ALICE, header_key: str | None = None) -> bytes:
    """A frame with a *valid* signature over an arbitrary body (an insider's forgery)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sig = base64.urlsafe_b64encode(signer.sign(DOMAIN[ENVELOPE_MAGIC] + raw)).rstrip(b"=")
    key = (header_key or signer.public_key).encode()
    return b"MJ1E " + key + b" " + sig + b"\n" + raw


def body_of(frame: bytes) -> dict:
    return json.loads(frame[HEADER_LEN:])


def reason_of(frame: bytes) -> str:
    with pytest.raises(Rejected) as info:
        open_envelope(frame)
    return info.value.code


def test_round_trip() -> None:
    frame = envelope()
    env = open_envelope(frame)
    assert env.capability == "demo.add" and env.args == {"a": 2, "b": 3}
    assert env.submitter == ALICE.public_key
    assert env.audience == "mesh.cmd.demo.add"
    check_window(env, now_ms(), SKEW, MAX_TTL)


def test_flipped_byte_in_body() -> None:
    frame = bytearray(envelope())
    frame[-3] ^= 0x01
    assert reason_of(bytes(frame)) == Reason.BAD_SIGNATURE


def test_flipped_byte_in_signature() -> None:
    frame = bytearray(envelope())
    frame[70] = ord("A") if frame[70] != ord("A") else ord("B")
    assert reason_of(bytes(frame)) == Reason.BAD_SIGNATURE


def test_signature_encoding_is_canonical() -> None:
    """The last base64 character has spare bits; flipping them must not yield a second valid frame."""
    frame = bytearray(envelope())
    last = HEADER_LEN - 2
    frame[last] += 1
    assert reason_of(bytes(frame)) in (Reason.MALFORMED, Reason.BAD_SIGNATURE)


def test_key_swapped_in_header() -> None:
    frame = envelope()
    swapped = frame[:5] + MALLORY.public_key.encode() + frame[5 + 56 :]
    assert reason_of(swapped) == Reason.BAD_SIGNATURE


def test_body_naming_another_submitter() -> None:
    body = body_of(envelope())
    body["submitter"] = ALICE.public_key
    # Mallory signs a body that claims to be from Alice.
    assert reason_of(resign(body, MALLORY)) == Reason.KEY_MISMATCH


def test_oversized_is_refused_before_crypto() -> None:
    frame = envelope(args={"blob": "x" * 2_000_000})
    with pytest.raises(Rejected) as info:
        open_envelope(frame)
    assert info.value.reason == Reason.TOO_LARGE


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"version":1,"version":1}', Reason.MALFORMED),
        (b'{"version":1,"args":{"a":NaN}}', Reason.MALFORMED),
        (b'{"version":1,"args":{"a":Infinity}}', Reason.MALFORMED),
        (b'{"version":1,"args":{"a":1e999}}', Reason.MALFORMED),
        (b'{"version":1,"args":"\\ud800"}', Reason.MALFORMED),
        (b'{"version":1,"args":' + b"[" * 40 + b"]" * 40 + b"}", Reason.MALFORMED),
        (b'{"version":1,"args":' + b"[" * 100000 + b"]" * 100000 + b"}", Reason.MALFORMED),
        (b"\xff\xfe{}", Reason.MALFORMED),
        (b"[1,2]", Reason.MALFORMED),
        (b'{"version":2}', Reason.UNKNOWN_VERSION),
        (b'{"version":"1"}', Reason.UNKNOWN_VERSION),
    ],
)
def test_strict_decoding(raw: bytes, reason: Reason) -> None:
    assert reason_of(resign(raw)) == reason


def test_unknown_field() -> None:
    body = body_of(envelope())
    body["extra"] = True
    assert reason_of(resign(body)) == Reason.SCHEMA


def test_wrongly_typed_field() -> None:
    body = body_of(envelope())
    body["issued_at"] = str(body["issued_at"])
    assert reason_of(resign(body)) == Reason.SCHEMA


@pytest.mark.parametrize(
    "capability", ["demo.*", "demo.>", "demo add", "demo..add", "Demo.add", "mesh.cmd", "", "a" * 200]
)
def test_bad_capability(capability: str) -> None:
    body = body_of(envelope())
    body["capability"] = capability
    assert reason_of(resign(body)) == Reason.BAD_CAPABILITY


def test_wrong_frame_version_and_garbage() -> None:
    frame = envelope()
    assert reason_of(b"MJ2E" + frame[4:]) == Reason.UNKNOWN_VERSION
    assert reason_of(b"hello") == Reason.MALFORMED
    assert reason_of(b"") == Reason.MALFORMED


def test_expired_and_future_dated() -> None:
    now = now_ms()
    old = open_envelope(envelope(issued_at=now - 200_000, ttl_ms=30_000))
    with pytest.raises(Rejected) as info:
        check_window(old, now, SKEW, MAX_TTL)
    assert info.value.reason == Reason.EXPIRED
    future = open_envelope(envelope(issued_at=now + 120_000))
    with pytest.raises(Rejected) as info:
        check_window(future, now, SKEW, MAX_TTL)
    assert info.value.reason == Reason.NOT_YET_VALID
    # Within the skew tolerance both are fine.
    check_window(open_envelope(envelope(issued_at=now + 30_000)), now, SKEW, MAX_TTL)
    long = open_envelope(envelope(ttl_ms=MAX_TTL + 1))
    with pytest.raises(Rejected, match="validity"):
        check_window(long, now, SKEW, MAX_TTL)


def test_result_round_trip_and_forgery() -> None:
    request = envelope()
    frame = seal_result(ALICE, request_digest=digest(request), job_id="job-0000000001", status="ok", value=5)
    result = open_result(frame)
    assert result.value == 5 and result.worker == ALICE.public_key and result.request_digest == digest(request)
    forged = frame.replace(b'"value":5', b'"value":6')
    with pytest.raises(Rejected) as info:
        open_result(forged)
    assert info.value.reason == Reason.BAD_SIGNATURE
    # A result frame is never accepted as an envelope, nor the reverse.
    with pytest.raises(Rejected):
        open_envelope(frame)
    with pytest.raises(Rejected):
        open_result(request)


VALID = envelope()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=1, max_value=255)),
        min_size=1,
        max_size=8,
    )
)
def test_random_byte_mutations_are_never_accepted(mutations: list[tuple[int, int]]) -> None:
    frame = bytearray(VALID)
    for index, delta in mutations:
        frame[index] = (frame[index] + delta) % 256
    if bytes(frame) == VALID:
        return
    with pytest.raises(Rejected):
        open_envelope(bytes(frame))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=len(VALID)))
def test_random_splices_are_never_accepted(junk: bytes, cut: int) -> None:
    frame = VALID[:cut] + junk + VALID[cut + len(junk) :]
    if frame == VALID:
        return
    with pytest.raises(Rejected):
        open_envelope(frame)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(body_of(VALID)) + ["x", "sig"]), json_values, max_size=12))
def test_signed_random_bodies_raise_only_our_error(body: dict) -> None:
    """Even validly signed garbage only ever yields an envelope or Rejected."""
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    try:
        open_envelope(resign(raw))
    except Rejected:
        pass
