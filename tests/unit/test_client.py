"""The client without a server: settling results, binding them to the request, strict JSON_ARGS.

The transport is faked honestly: :class:`FakeNats` hands the client's signed
envelope to a "worker" that verifies it with the real code and answers with
results signed by real keys, which the real client then verifies and binds.
A result that does not verify or is bound to another request, job or worker
is ignored (the real answer may still come), never returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.msg import Msg

from meshjobs.client import Client, Outcome, parse_args, settle
from meshjobs.envelope import HEADER_LEN, digest, open_envelope, open_result, seal_envelope, seal_result
from meshjobs.errors import HandlerError, JobTimeout, NoPeerError, Reason, Rejected, UsageError
from meshjobs.identity import Identity

ALICE = Identity.generate()
WORKER = Identity.generate()
MALLORY = Identity.generate()
Answer = Callable[[bytes], list[bytes | None]]  # request frame -> replies (None: a 503 status)


class FakeSub:
    async def unsubscribe(self) -> None:
        pass


class FakeNats:
    """Just enough of a NATS connection: each publish is answered at once by *answer*."""

    max_payload = 1024 * 1024
    is_closed = False

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.callback: Any = None
        self.published: list[tuple[str, bytes]] = []

    def new_inbox(self) -> str:
        return "_INBOX.fake"

    async def subscribe(self, subject: str, cb: Any) -> FakeSub:
        self.callback = cb
        return FakeSub()

    async def flush(self) -> None:
        pass

    async def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        self.published.append((subject, data))
        for frame in self.answer(data):
            headers = {"Status": "503"} if frame is None else None
            await self.callback(Msg(self, subject=reply, data=frame or b"", headers=headers))  # type: ignore[arg-type]


def worker_says(
    status: str, value: Any = None, *, error: tuple[str, str] | None = None, signer: Identity = WORKER, **bind: Any
) -> Answer:
    """A worker that verifies the envelope, then signs a result (bound to it unless *bind* overrides)."""

    def answer(request: bytes) -> list[bytes | None]:
        envelope = open_envelope(request)
        binding = {"request_digest": digest(request), "job_id": envelope.job_id, **bind}
        return [seal_result(signer, status=status, value=value, error=error, **binding)]

    return answer


async def submit(answer: Answer, **kw: Any) -> Outcome:
    async with Client(FakeNats(answer), ALICE) as client:  # type: ignore[arg-type]
        return await client.submit("demo.add", {"a": 2, "b": 3}, job_id="job-0000000001", **kw)


def outcome(status: str, value: Any = None, error: tuple[str, str] | None = None) -> Outcome:
    _, request = seal_envelope(
        ALICE, "demo.add", {"a": 2}, audience="mesh.cmd.demo.add", job_id="job-0000000001", ttl_ms=30_000
    )
    frame = seal_result(
        WORKER, request_digest=digest(request), job_id="job-0000000001", status=status, value=value, error=error
    )
    return Outcome(open_result(frame), frame, request, "demo.add", 1, 0.012)


# -- settle ------------------------------------------------------------------------


def test_settle_returns_a_success_unchanged() -> None:
    done = outcome("ok", 5)
    assert settle(done) is done


@pytest.mark.parametrize(
    ("status", "error", "exc_type", "exit_code"),
    [
        ("error", ("ZeroDivisionError", "division by zero"), HandlerError, 1),
        ("invalid", ("invalid_arguments", "missing 'b'"), UsageError, 2),
        ("timeout", ("timeout", "handler ran over 5 s"), JobTimeout, 4),
        ("rejected", ("untrusted", "not in the trust list"), Rejected, 5),
    ],
)
def test_settle_raises_what_each_status_means(
    status: str, error: tuple[str, str], exc_type: type[Exception], exit_code: int
) -> None:
    done = outcome(status, error=error)
    with pytest.raises(exc_type) as caught:
        settle(done)
    assert type(caught.value) is exc_type
    assert caught.value.exit_code == exit_code  # type: ignore[attr-defined]
    assert error[1] in str(caught.value)
    if exc_type in (HandlerError, Rejected):  # the signed record travels with the error, for --json
        assert caught.value.result is done  # type: ignore[attr-defined]
    if exc_type is Rejected:
        assert caught.value.reason is Reason.UNTRUSTED  # type: ignore[attr-defined]


# -- the client path, bound to the request ------------------------------------------


async def test_a_bound_result_comes_back_verified_and_recorded() -> None:
    done = await submit(worker_says("ok", 5))
    assert (done.value, done.worker, done.job_id, done.attempts) == (5, WORKER.public_key, "job-0000000001", 1)
    record = done.record()
    request = open_envelope(record["signed_request"].encode())
    result = open_result(record["signed_result"].encode())
    assert request.submitter == ALICE.public_key and request.args == {"a": 2, "b": 3}
    assert result == done.result and result.request_digest == digest(record["signed_request"].encode())
    assert record["result"]["value"] == 5 and record["status"] == "ok" and record["error"] is None


def tampered(answer: Answer) -> Answer:
    def flip(request: bytes) -> list[bytes | None]:
        frame = bytearray(answer(request)[0] or b"")
        frame[HEADER_LEN + 5] ^= 0x01
        return [bytes(frame)]

    return flip


def then(*answers: Answer) -> Answer:
    return lambda request: [reply for answer in answers for reply in answer(request)]


FOREIGN = [
    (worker_says("ok", 666, request_digest="0" * 64), "bound to a different request"),
    (worker_says("ok", 666, job_id="job-someone-else"), "for a different job"),
    (tampered(worker_says("ok", 666)), "signature does not match"),
    (worker_says("ok", 666, signer=MALLORY), f"job went to {WORKER.public_key[:12]}"),
]


@pytest.mark.parametrize(("foreign", "why"), FOREIGN)
async def test_a_foreign_result_is_ignored_and_the_real_one_wins(
    foreign: Answer, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    done = await submit(then(foreign, worker_says("ok", 5)), peer=WORKER.public_key, timeout=2)
    assert done.value == 5 and done.worker == WORKER.public_key
    assert any(why in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize(("foreign", "why"), FOREIGN)
async def test_a_foreign_result_alone_is_never_accepted(foreign: Answer, why: str) -> None:
    with pytest.raises(JobTimeout):
        await submit(foreign, peer=WORKER.public_key, timeout=0.3)


async def test_a_refusal_before_the_job_was_read_keeps_the_workers_reason() -> None:
    # A worker that refused the frame itself cannot know the job id; that result is still accepted.
    answer = worker_says("rejected", error=("untrusted", "who are you"), job_id=None)
    with pytest.raises(Rejected) as caught:
        await submit(answer, timeout=2)
    assert caught.value.reason is Reason.UNTRUSTED and caught.value.exit_code == 5


async def test_heartbeats_are_not_final() -> None:
    def answer(request: bytes) -> list[bytes | None]:
        return worker_says("running")(request) + worker_says("ok", 7)(request)

    assert (await submit(answer)).value == 7


async def test_no_responders_is_no_peer_and_silence_is_a_timeout() -> None:
    with pytest.raises(NoPeerError) as caught:
        await submit(lambda request: [None], peer_wait=0)
    assert caught.value.exit_code == 3 and "demo.add" in str(caught.value)
    with pytest.raises(JobTimeout) as timed_out:
        await submit(lambda request: [], timeout=0.2)
    assert timed_out.value.exit_code == 4


# -- JSON_ARGS -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   "])
def test_no_args_is_an_empty_object(text: str | None) -> None:
    assert parse_args(text) == {}


def test_args_parse_to_the_object_given() -> None:
    assert parse_args('{"a": 2, "b": [1, {"c": null}], "d": 1.5}') == {"a": 2, "b": [1, {"c": None}], "d": 1.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"x": NaN}', "NaN is not allowed"),
        ('{"x": -Infinity}', "-Infinity is not allowed"),
        ('{"x": 1e999}', "out of range"),
        ("[1, 2]", "must be a JSON object"),
        ("5", "must be a JSON object"),
        ("null", "must be a JSON object"),
        ('{"a": 1', "invalid JSON"),
    ],
)
def test_bad_args_are_a_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_args(text)
    assert message in str(caught.value) and caught.value.exit_code == 2
