"""Submitting signed commands and waiting for verified, signed results.

One client multiplexes all its jobs over a single inbox subscription. Each job
is one envelope signed by the submitter; each *attempt* re-signs it with a
fresh nonce and the same job id, so a worker that already holds the job
answers from its first run instead of running it twice.

An attempt ends with a final signed result, a "no responders" status from the
server, or silence: a worker heartbeats (``running``) while it holds a job, so
a client that hears nothing for ``liveness`` seconds knows the job was lost
(for example with a killed worker) and tries again, within the deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from meshjobs._nats import connect
from meshjobs.discovery import PeerInfo, discover
from meshjobs.envelope import (
    MAX_FRAME_BYTES,
    Result,
    digest,
    new_job_id,
    now_ms,
    open_result,
    result_body,
    seal_envelope,
)
from meshjobs.errors import (
    RETRYABLE_REASONS,
    ConnectError,
    HandlerError,
    JobTimeout,
    NoPeerError,
    Reason,
    Rejected,
    UsageError,
)
from meshjobs.identity import Identity
from meshjobs.subjects import audience_for, check_capability

log = logging.getLogger("meshjobs.client")

DEFAULT_TIMEOUT = 30.0
DEFAULT_PEER_WAIT = 2.0
DEFAULT_LIVENESS = 3.0


@dataclass(frozen=True)
class Outcome:
    """A verified final result, plus the signed bytes that prove it."""

    result: Result
    frame: bytes
    request: bytes
    capability: str
    attempts: int
    elapsed: float

    @property
    def value(self) -> Any:
        return self.result.value

    @property
    def worker(self) -> str:
        return self.result.worker

    @property
    def job_id(self) -> str:
        return self.result.job_id or ""

    def record(self) -> dict[str, Any]:
        """The full signed record, for ``--json``: anyone can re-verify both frames."""
        return {
            "job_id": self.job_id,
            "capability": self.capability,
            "status": self.result.status,
            "value": self.result.value,
            "error": self.result.error.model_dump() if self.result.error else None,
            "worker": self.result.worker,
            "attempts": self.attempts,
            "elapsed_ms": round(self.elapsed * 1000, 3),
            "result": result_body(self.frame),
            "signed_result": self.frame.decode("utf-8"),
            "signed_request": self.request.decode("utf-8"),
        }


@dataclass(eq=False)
class _Attempt:
    job_id: str
    request_digest: str
    deadline: float
    last_heard: float
    future: asyncio.Future[tuple[str, Any]]
    timer: asyncio.TimerHandle | None = None
    frame: bytes = field(default=b"", repr=False)
    peer: str | None = None
    """The only worker whose result this attempt accepts, when it was addressed to one."""
    refused: int = 0


class Client:
    """Submit commands to the mesh as one identity. Use :meth:`connect`, then ``async with``."""

    def __init__(
        self,
        nc: NATS,
        identity: Identity,
        *,
        liveness: float = DEFAULT_LIVENESS,
        max_message_bytes: int = MAX_FRAME_BYTES,
        owns_connection: bool = False,
        accept_workers: frozenset[str] | None = None,
    ) -> None:
        self.nc = nc
        self.identity = identity
        #: Worker keys whose results are accepted (None: any worker the broker
        #: delivered the request to). A result from another key is ignored.
        self.accept_workers = accept_workers
        self.liveness = liveness
        self.max_message_bytes = max_message_bytes
        self._owns = owns_connection
        self._prefix = nc.new_inbox()
        self._sub: Subscription | None = None
        self._attempts: dict[str, _Attempt] = {}
        self._counter = 0

    @classmethod
    async def connect(cls, servers: str | list[str], identity: Identity, **kwargs: Any) -> Client:
        """Connect to NATS and return a client that closes the connection with itself."""
        nc = await connect(servers, identity, name="meshjobs-client")
        return cls(nc, identity, owns_connection=True, **kwargs)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unsubscribe and (if ours) close the connection; never raises, so it cannot mask the real error."""
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, TimeoutError) as exc:  # the connection went away under us
                log.debug("could not unsubscribe the reply inbox: %s", exc)
        if self._owns and not self.nc.is_closed:
            try:
                await self.nc.close()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.debug("could not close the connection cleanly: %s", exc)

    async def peers(
        self, *, timeout: float = 1.0, capability: str | None = None, operators: frozenset[str] = frozenset()
    ) -> list[PeerInfo]:
        """Workers that answer discovery within *timeout* with a valid signed manifest.

        Kind, region and community count as attested where one of *operators* signed for them.
        """
        return await discover(self.nc, timeout=timeout, capability=capability, operators=operators)

    async def submit(
        self,
        capability: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        peer: str | None = None,
        job_id: str | None = None,
        peer_wait: float = DEFAULT_PEER_WAIT,
        valid_for: float | None = None,
    ) -> Outcome:
        """Run *capability* once on a peer and return its verified result.

        *timeout* bounds this call; *valid_for* (default: *timeout*) is how
        long the signed envelope stays valid, which a router sets to its own
        deadline so that the same job can still go to another peer.

        Raises :class:`HandlerError` (the handler failed), :class:`UsageError`
        (bad arguments), :class:`NoPeerError` (nobody answered for
        *peer_wait* seconds), :class:`JobTimeout` or :class:`Rejected`.
        """
        check_capability(capability)
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise UsageError("arguments must be a JSON object (keyword arguments)")
        if not timeout > 0:
            raise UsageError("timeout must be positive")
        audience = audience_for(capability, peer)
        job_id = job_id or new_job_id()
        await self._ensure_inbox()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        expires_at = now_ms() + int(max(valid_for or timeout, timeout) * 1000)
        attempts = 0
        unanswered_since: float | None = None
        backoff = 0.02
        while True:
            left_ms = int((deadline - loop.time()) * 1000)
            if left_ms <= 0:
                raise JobTimeout(f"{capability}: no result within {timeout:g} s (job {job_id}, {attempts} attempt(s))")
            attempts += 1
            issued = now_ms()
            token = self._next_token()
            try:
                _, frame = seal_envelope(
                    self.identity,
                    capability,
                    args,
                    audience=audience,
                    job_id=job_id,
                    ttl_ms=max(expires_at - issued, 1),
                    issued_at=issued,
                    reply=f"{self._prefix}.{token}",
                )
            except ValueError as exc:
                raise UsageError(f"arguments cannot be sent: {exc}") from None
            kind, payload = await self._attempt(audience, frame, job_id, deadline, token, peer)
            if kind == "final":
                result, result_frame = payload
                if result.status == "rejected" and result.error and result.error.code in RETRYABLE_REASONS:
                    log.debug("job %s: %s, retrying", job_id, result.error.code)
                    await asyncio.sleep(min(backoff, max(deadline - loop.time(), 0)))
                    backoff = min(backoff * 2, 0.5)
                    continue
                outcome = Outcome(result, result_frame, frame, capability, attempts, loop.time() - started)
                return settle(outcome)
            if kind == "no_responders":
                now = loop.time()
                unanswered_since = unanswered_since or now
                target = f"peer {peer}" if peer else "any peer"
                if now - unanswered_since >= peer_wait or now + backoff >= deadline:
                    raise NoPeerError(f"no capable peer: {capability!r} is not offered by {target}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            if kind == "lapsed":
                log.info("job %s: no word from the worker for %.3g s, trying again", job_id, self.liveness)
                continue
            raise JobTimeout(f"{capability}: no result within {timeout:g} s (job {job_id}, {attempts} attempt(s))")

    # -- plumbing ----------------------------------------------------------

    async def _ensure_inbox(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_reply)
            await self.nc.flush()

    def _next_token(self) -> str:
        self._counter += 1
        return str(self._counter)

    async def _attempt(
        self, subject: str, frame: bytes, job_id: str, deadline: float, token: str, peer: str | None
    ) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        attempt = _Attempt(job_id, digest(frame), deadline, loop.time(), loop.create_future(), frame=frame, peer=peer)
        self._attempts[token] = attempt
        self._arm(attempt)
        try:
            try:
                await self.nc.publish(subject, frame, reply=f"{self._prefix}.{token}")
            except nats.errors.MaxPayloadError:
                limit = self.nc.max_payload
                raise UsageError(f"the command is {len(frame)} bytes; the server accepts at most {limit}") from None
            except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
                raise ConnectError(f"lost the connection to NATS: {exc}") from exc
            return await attempt.future
        finally:
            del self._attempts[token]
            if attempt.timer:
                attempt.timer.cancel()

    def _arm(self, attempt: _Attempt) -> None:
        when = min(attempt.deadline, attempt.last_heard + self.liveness)
        attempt.timer = asyncio.get_running_loop().call_at(when, self._on_timer, attempt)

    def _on_timer(self, attempt: _Attempt) -> None:
        if attempt.future.done():
            return
        now = asyncio.get_running_loop().time()
        if now >= attempt.deadline:
            attempt.future.set_result(("deadline", None))
        elif now >= attempt.last_heard + self.liveness:
            attempt.future.set_result(("lapsed", None))
        else:
            self._arm(attempt)

    async def _on_reply(self, msg: Msg) -> None:
        attempt = self._attempts.get(msg.subject[len(self._prefix) + 1 :])
        if attempt is None or attempt.future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            attempt.future.set_result(("no_responders", None))
            return
        try:
            result = open_result(msg.data, self.max_message_bytes)
            _check_binding(result, attempt)
            self._check_worker(result, attempt)
        except Rejected as exc:
            # A forged, foreign or junk reply never ends the attempt: the real
            # answer may still come. Logged once per attempt, not per message.
            attempt.refused += 1
            if attempt.refused == 1:
                log.warning("job %s: ignoring a reply: %s", attempt.job_id, exc)
            return
        if result.status == "running":
            attempt.last_heard = asyncio.get_running_loop().time()
            return
        attempt.future.set_result(("final", (result, msg.data)))

    def _check_worker(self, result: Result, attempt: _Attempt) -> None:
        if attempt.peer is not None and result.worker != attempt.peer:
            who = f"the job went to {attempt.peer[:12]}… but {result.worker[:12]}… answered"
            raise Rejected(Reason.RESULT_MISMATCH, who)
        if self.accept_workers is not None and result.worker not in self.accept_workers:
            raise Rejected(Reason.UNTRUSTED, f"results from {result.worker[:12]}… are not accepted by this submitter")


def _check_binding(result: Result, attempt: _Attempt) -> None:
    if result.request_digest != attempt.request_digest:
        raise Rejected(Reason.RESULT_MISMATCH, "the result is bound to a different request")
    if result.job_id != attempt.job_id and not (result.job_id is None and result.status == "rejected"):
        raise Rejected(Reason.RESULT_MISMATCH, "the result is for a different job")


def settle(outcome: Outcome) -> Outcome:
    """Return *outcome* if it succeeded, else raise the error its status means."""
    result = outcome.result
    error = result.error
    code, message = (error.code, error.message) if error else ("", "")
    where = f"{outcome.capability} on {result.worker[:12]}…"
    if result.status == "ok":
        return outcome
    if result.status == "error":
        raise HandlerError(f"{where} failed: {code}: {message}", outcome)
    if result.status == "invalid":
        raise UsageError(f"{outcome.capability}: invalid arguments: {message}")
    if result.status == "timeout":
        raise JobTimeout(f"{where}: {message}")
    raise Rejected(code, f"{where} rejected the command: {message}", outcome)


def parse_args(text: str | None) -> dict[str, Any]:
    """Parse the CLI's JSON_ARGS strictly; must be an object."""
    from meshjobs.envelope import loads_strict

    if text is None or not text.strip():
        return {}
    try:
        value = loads_strict(text)
    except ValueError as exc:
        raise UsageError(f"JSON_ARGS: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"JSON_ARGS must be a JSON object like '{{\"a\": 1}}', not {json.dumps(value)[:40]}")
    return value
