"""The durable side of a human peer: a job is pulled only when the person claims one.

A system worker pulls durable jobs as fast as it has free slots. A person must
not: a job pulled into an inbox nobody is looking at is hidden from everyone
else who could answer it. So :class:`Desk` pulls one job from the capability's
shared durable consumer (the same ``jobs_<capability>`` consumer system
workers use) when the person asks for one (:meth:`Inbox.claim`), and:

- verifies it exactly as the worker runtime does (signature, audience, trust,
  quarantine, validity window; the delivery claimed mesh-wide, a replayed
  copy terminated; a job whose claimant's result exists is acknowledged and skipped);
- marks it ``running`` in the shared ``jobs`` bucket with ``claimed by
  <name>``, which every other inbox of the capability watches (they show it
  as taken) and ``meshjobs jobs status`` shows;
- sends in-progress acks while the person works on it, so it is never
  redelivered under them, however long they take (up to the job's deadline);
- on an answer or a decline: signs the result with the person's key, stores
  it once in the ``results`` bucket, then acknowledges;
- on a hand-back (the person's choice, or the inbox closing): negative
  acknowledgement, so the job is at once deliverable to another inbox, and
  its state is ``queued`` again. A terminal killed outright hands nothing back
  explicitly: JetStream redelivers the job when its ack wait (5 s) passes.

A hand-back counts as a delivery in JetStream; unlike the runner, the desk
never dead-letters a job for being delivered often (a person handing a job
back is not a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from meshjobs.durable import BUSY, DONE, REPLAY, STREAM, Durable, JobState, consumer_name, decode_state, jobs_subject
from meshjobs.envelope import Envelope, digest
from meshjobs.errors import MeshError, Rejected
from meshjobs.identity import Identity
from meshjobs.runtime.app import Capability
from meshjobs.runtime.execute import execute, seal
from meshjobs.state import Entry, watch_bucket

from .human import HumanPeer, Job

log = logging.getLogger("meshjobs.peers.desk")

#: The worker runtime's check of a durable frame (``Worker.verify``): every check but replay.
Verify = Callable[[bytes, str, Capability, float | None], Envelope]
ACK_WAIT_S = 5.0
FETCH_WAIT_S = 0.5
MAX_DURABLE_VALIDITY_S = 7 * 86400.0
SCORE_TTL_S = 30.0


class Desk:
    """Pull-on-claim over the durable queue for one :class:`HumanPeer`."""

    def __init__(self, peer: HumanPeer, durable: Durable, identity: Identity, verify: Verify, name: str) -> None:
        self.peer = peer
        self.inbox = peer.inbox
        self.durable = durable
        self.identity = identity
        self.verify = verify
        self.name = name
        self.js: JetStreamContext = durable.js
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._claiming = asyncio.Lock()
        self._looking: set[str] = set()
        self.inbox.me = identity.public_key
        self.inbox.claimer = self.claim

    async def start(self) -> None:
        """Bind to each capability's shared durable consumer, and watch the ``jobs`` bucket."""
        for cap in self.peer.durable_app.capabilities.values():
            config = ConsumerConfig(
                durable_name=consumer_name(cap.name),
                filter_subject=jobs_subject(cap.name),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                max_deliver=-1,  # hand-backs are deliveries too; the desk never gives up on a job
                max_ack_pending=1024,
            )
            # An existing consumer (system workers made it) is bound as it is.
            self._subs[cap.name] = await self.js.pull_subscribe(
                jobs_subject(cap.name), durable=consumer_name(cap.name), stream=STREAM, config=config
            )
        ready = asyncio.Event()
        self._watch = asyncio.create_task(watch_bucket(self.durable.states, self._on_state, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
        except TimeoutError:
            log.warning("the jobs bucket did not answer in 10 s; the shared queue view may be incomplete")

    def _on_state(self, entry: Entry) -> None:
        state = decode_state(entry.value)  # signed; keys are <submitter>.<job id>
        if state is None:
            self.inbox.forget(entry.key.rsplit(".", 1)[-1])  # deleted or unreadable
            return
        self.inbox.see(state)
        key = state.submitter
        if state.capability in self.inbox.tasks and key not in self.inbox.scores and key not in self._looking:
            self._looking.add(key)
            task = asyncio.create_task(self._look_up(key))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _look_up(self, key: str) -> None:
        try:
            self.inbox.scores[key] = await self.peer.score(key)
        finally:
            self._looking.discard(key)
        self.inbox.notify()

    async def close(self) -> None:
        """Hand back every held job (nak: at once deliverable elsewhere), stop watching."""
        handed = self.inbox.release_all()
        if handed:
            log.info("handing back %d job(s) unanswered", handed)
        if self._serving:
            await asyncio.wait(set(self._serving), timeout=10)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for sub in self._subs.values():
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    # -- claiming ----------------------------------------------------------------------

    def _order(self, capability: str | None) -> list[str]:
        if capability is not None:
            return [capability]
        waiting = sorted((s.job_id, s.capability) for s in self.inbox.board.values() if s.state == "queued")
        first = list(dict.fromkeys(cap for _, cap in waiting if cap in self._subs))
        return first + [cap for cap in self._subs if cap not in first]

    async def claim(self, capability: str | None = None) -> Job | None:
        """Pull the next job (of *capability*, or the oldest waiting of any) into the inbox; None if none."""
        async with self._claiming:  # one claim at a time: each click takes exactly one job
            for name in self._order(capability):
                for _ in range(20):  # skip jobs that need no person (done, replayed, invalid)
                    msg = await self._fetch(name)
                    if msg is None:
                        break
                    job = await self._take(self.peer.durable_app.capabilities[name], msg)
                    if job is not None:
                        return job
        return None

    async def _fetch(self, name: str) -> Msg | None:
        try:
            msgs = await self._subs[name].fetch(1, timeout=FETCH_WAIT_S)
        except (nats.errors.TimeoutError, TimeoutError):
            return None
        return msgs[0] if msgs else None

    async def _take(self, cap: Capability, msg: Msg) -> Job | None:
        """Admit *msg* and start serving it; the job once the person sees it, or None if it needs nobody."""
        try:
            envelope = self.verify(msg.data, msg.subject, cap, MAX_DURABLE_VALIDITY_S)
        except Rejected as exc:
            log.warning("terminating an invalid durable job: %s", exc)
            await msg.term()
            return None
        job_id = envelope.job_id
        admission = await self.durable.admit(
            self.identity, envelope, msg.data, msg.metadata.sequence.stream, msg.metadata.num_delivered
        )
        if admission == REPLAY:
            log.warning("terminating job %s: another copy of its frame was claimed (replay)", job_id)
            await msg.term()
            return None
        if admission in (DONE, BUSY):
            await (msg.ack() if admission == DONE else msg.nak(delay=1.0))  # answered before: never twice
            return None
        shown = self.inbox.expect(job_id)
        task = asyncio.create_task(self._serve(cap, msg, envelope, shown))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        waiting: set[asyncio.Future[Any]] = {shown, task}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if shown.done():
            return shown.result()
        shown.cancel()
        return None  # finished without the person (invalid arguments, expired)

    async def _serve(self, cap: Capability, msg: Msg, envelope: Envelope, shown: asyncio.Future[Job]) -> None:
        job_id = envelope.job_id
        request_digest = digest(msg.data)
        attempt = msg.metadata.num_delivered
        state = JobState(job_id, "running", cap.name, envelope.submitter, request_digest, self.identity.public_key)
        state.attempts, state.detail = attempt, f"claimed by {self.name}"
        keepalive = asyncio.create_task(_in_progress(msg))
        try:
            await self.durable.put_state(state, self.identity)
            execution = await execute(cap, envelope, self.identity.public_key)
        except asyncio.CancelledError:
            await _quietly(msg.nak())
            raise
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.warning("handing job %s back after a JetStream error: %s", job_id, exc)
            await _quietly(msg.nak(delay=1.0))
            return
        finally:
            keepalive.cancel()
        job = shown.result() if shown.done() and not shown.cancelled() else None
        try:
            if job is not None and job.decision is not None and job.decision.kind == "release":
                state.state, state.worker, state.detail = "queued", "", f"handed back by {self.name}"
                await self.durable.put_state(state, self.identity)
                await msg.nak()
                return
            if execution.status == "error" and job is not None and job.failure_value is not None:
                execution = execution._replace(value=job.failure_value)
            frame = seal(self.identity, job_id, request_digest, execution)
            await self.durable.store_result(envelope, msg.data, frame)  # write-once: never replaces an answer
            state.state = "done" if execution.status == "ok" else "failed"
            state.detail = f"{execution.status} by {self.name}"
            await self.durable.put_state(state, self.identity)
            await msg.ack()
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.warning("could not store job %s's result (it will be delivered again): %s", job_id, exc)
            await _quietly(msg.nak(delay=1.0))


async def _in_progress(msg: Msg) -> None:
    while True:
        await asyncio.sleep(ACK_WAIT_S / 3)
        await _quietly(msg.in_progress())


async def _quietly(action: object) -> None:
    try:
        await action  # type: ignore[misc]
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        log.debug("ack failed: %s", exc)


class Scores:
    """Submitters' reputation scores (cached); None wherever reputation cannot be read."""

    def __init__(self, records: Callable[[str], Awaitable[Any]] | None) -> None:
        self._records = records
        self._cache: dict[str, tuple[float, float | None]] = {}

    @classmethod
    async def open(cls, nc: NATS, identity: Identity, trust_services: Iterable[str] = ()) -> Scores:
        """Read signed reputation records (from *trust_services*: the trust policy's; none: this key's own)."""
        from meshjobs.trust.reputation import ReputationBook

        try:
            book = await asyncio.wait_for(ReputationBook.open(nc, identity, trust_services=trust_services), 5)
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.warning("reputation unavailable (submitters shown without a trust score): %s", exc)
            return cls(None)
        return cls(book.record)

    async def score(self, key: str) -> float | None:
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < SCORE_TTL_S:
            return cached[1]
        value: float | None = None
        if self._records is not None:
            try:
                record = await asyncio.wait_for(self._records(key), 2)
                value = float(record.score())
            except (MeshError, nats.errors.Error, TimeoutError, AttributeError, TypeError, ValueError) as exc:
                log.debug("no score for %s: %s", key[:12], exc)
        self._cache[key] = (time.monotonic(), value)
        return value
