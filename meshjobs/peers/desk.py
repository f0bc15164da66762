"""The durable side of a human peer: a job is pulled only when the person claims one.

A system worker pulls durable jobs as fast as it has free slots. A person must
not: a job pulled into an inbox nobody is looking at is hidden from everyone
else who could answer it. So :class:`Desk` pulls one job from the capability's
shared durable consumer (the same ``jobs_<capability>`` consumer system
workers use) when the person asks for one (:meth:`Inbox.claim`), and:

- verifies it exactly as the worker runtime does (signature, audience, trust,
  quarantine, validity window; the delivery claimed mesh-wide, a replayed
  copy terminated; a job whose claimant's result exists is acknowledged and skipped);
- marks it ``running`` in the ``jobs`` bucket with ``claimed by <name>``
  (under the submitter's key: ``meshjobs jobs status`` shows it);
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

What the other inboxes of a capability see:

- **waiting**: where this key may list job states (an open broker, an
  operator's key), the desk watches the ``jobs`` bucket and shows each waiting
  job. A closed broker keeps job states private to their submitter (a peer
  may read only its own namespace), and refuses the watch at once: then the
  desk counts the jobs waiting per capability from the shared consumer it is
  bound to (its pending and unacknowledged messages, less those this desk
  holds and those others announce), every second.
- **taken**: every desk announces, on ``mesh.desk.<capability>``, the jobs of
  that capability its person holds, as a :class:`Holding` signed by the
  person's key (``MJ1H``): every second while it holds any, and at once when
  that changes (a claim, an answer, a hand-back, the inbox closing). The
  others verify it and show those jobs as taken by that person until a newer
  announcement says otherwise or the announcements stop for
  :data:`HOLDING_LAPSE_S` (a terminal killed outright). It is informational
  only (claims go through the consumer whatever anyone announces); its name
  is the announcer's own (the trust file's name for the key wins), shown with
  the key and escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Literal

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext
from pydantic import Field, field_validator

from meshjobs._nats import denied
from meshjobs.durable import (
    BUSY,
    DONE,
    REPLAY,
    STATES,
    STREAM,
    Durable,
    JobState,
    consumer_name,
    decode_state,
    jobs_subject,
)
from meshjobs.envelope import (
    HOLDING_MAGIC,
    JOB_ID_PATTERN,
    Envelope,
    Wire,
    digest,
    now_ms,
    open_statement,
    seal_statement,
    valid_capability,
    valid_key,
)
from meshjobs.errors import MeshError, Rejected
from meshjobs.identity import Identity
from meshjobs.runtime.app import Capability
from meshjobs.runtime.durable_runner import keep_in_progress, quietly
from meshjobs.runtime.execute import execute, seal
from meshjobs.state import DOMAIN, Entry, watch_bucket

from .human import HumanPeer, Job

log = logging.getLogger("meshjobs.peers.desk")

#: The worker runtime's check of a durable frame (``Worker.verify``): every check but replay.
Verify = Callable[[bytes, str, Capability, float | None], Envelope]
ACK_WAIT_S = 5.0
FETCH_WAIT_S = 0.5
MAX_DURABLE_VALIDITY_S = 7 * 86400.0
SCORE_TTL_S = 30.0
#: How long the desk waits for the ``jobs`` bucket's current values before it counts instead.
WATCH_WAIT_S = 10.0
#: How often the desk counts the waiting jobs (where job states are private).
COUNT_EVERY_S = 1.0
#: Where the desks of a capability announce what their people hold: ``mesh.desk.<capability>``.
DESK_SUBJECT = "mesh.desk"
#: How often a desk that holds jobs announces them; how long an announcement counts without a newer one.
HOLDING_EVERY_S = 1.0
HOLDING_LAPSE_S = 4.0
#: An announcement issued further than this from our clock (either way) is ignored (replays, wild clocks).
HOLDING_SKEW_MS = 30_000
MAX_HOLDING_JOBS = 256
MAX_HOLDING_BYTES = 32 * 1024


def desk_subject(capability: str) -> str:
    return f"{DESK_SUBJECT}.{capability}"


class Holding(Wire):
    """The jobs of one capability a person's inbox holds, signed by the person's key (``MJ1H``)."""

    version: Literal[1]
    capability: str
    person: str
    name: str = Field(max_length=64)
    jobs: list[Annotated[str, Field(pattern=JOB_ID_PATTERN)]] = Field(max_length=MAX_HOLDING_JOBS)
    issued_at: int = Field(ge=0)

    _key = field_validator("person")(valid_key)
    _capability = field_validator("capability")(valid_capability)


def seal_holding(person: Identity, holding: Holding) -> bytes:
    return seal_statement(HOLDING_MAGIC, person, holding)


def open_holding(data: bytes) -> Holding:
    """Verify a holding (signed by the person it names) and decode it strictly; :class:`Rejected` if not."""
    return open_statement(HOLDING_MAGIC, Holding, "person", data, MAX_HOLDING_BYTES)


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
        self._held: dict[str, str] = {}  # job id -> capability: from its claim to its ack or hand-back
        self._announced: dict[str, tuple[str, ...]] = {}  # capability -> the jobs last announced
        self._last_issued = 0
        self._changed = asyncio.Event()
        self._listening: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.private = False
        """Whether this key may not list job states (a closed broker): the queue is counted instead."""
        self.inbox.me = identity.public_key
        self.inbox.claimer = self.claim

    async def start(self) -> None:
        """Bind to each capability's shared durable consumer, hear the other desks, show the queue."""
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
            self._listening.append(await self.durable.nc.subscribe(desk_subject(cap.name), cb=self._on_holding))
        self._tasks.append(asyncio.create_task(self._announcing()))
        ready = asyncio.Event()
        if not await self._watch_states(ready):
            self.inbox.queue = {}
            self._tasks.append(asyncio.create_task(self._counting(ready)))

    async def _watch_states(self, ready: asyncio.Event) -> bool:
        """Watch the ``jobs`` bucket; whether its current values came. A refusal ends the watch at once."""
        self._watch = asyncio.create_task(watch_bucket(self.durable.states, self._on_state, ready))
        nc = self.durable.nc
        # The watch reads the stream's info, then creates a consumer: a closed mesh refuses both to peers.
        refused = [f"$JS.{DOMAIN}.API.{api}.KV_{STATES}" for api in ("STREAM.INFO", "CONSUMER.CREATE")]
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not ready.is_set():
            if any(denied(nc, subject, within=loop.time() - started + 1.0) for subject in refused):
                self.private = True
                log.info("job states are private on this mesh: the inbox counts waiting jobs per capability")
                self._watch.cancel()
                await asyncio.gather(self._watch, return_exceptions=True)
                self._watch = None
                return False
            if loop.time() - started >= WATCH_WAIT_S:
                log.warning("the jobs bucket did not answer in %g s; counting waiting jobs until it does", WATCH_WAIT_S)
                return False
            await _wait(ready, 0.02)
        return True

    async def _counting(self, ready: asyncio.Event) -> None:
        """Count the jobs outstanding per capability on the shared consumers, until the bucket watch catches up."""
        while not ready.is_set():
            for name, sub in self._subs.items():
                try:
                    info = await sub.consumer_info()
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                    log.debug("could not count the jobs of %s: %s", name, exc)
                    continue
                here = sum(1 for cap in self._held.values() if cap == name)
                self.inbox.count(name, (info.num_pending or 0) + (info.num_ack_pending or 0) - here)
            await asyncio.sleep(COUNT_EVERY_S)
        self.inbox.queue = None  # the bucket lists the waiting jobs themselves now
        self.inbox.notify()

    # -- what the other desks hold ---------------------------------------------------------

    async def _on_holding(self, msg: Msg) -> None:
        try:
            holding = open_holding(msg.data)
        except Rejected as exc:
            log.debug("ignoring an announcement on %s: %s", msg.subject, exc)
            return
        if msg.subject != desk_subject(holding.capability) or abs(now_ms() - holding.issued_at) > HOLDING_SKEW_MS:
            return
        self.inbox.hold(
            holding.person, holding.name, holding.capability, tuple(holding.jobs), holding.issued_at, time.monotonic()
        )

    async def _announcing(self) -> None:
        """Announce what this person holds: at once when it changes, every second while it holds any."""
        while True:
            self._changed.clear()
            await self._announce()
            self.inbox.lapse(time.monotonic() - HOLDING_LAPSE_S)
            await _wait(self._changed, HOLDING_EVERY_S)

    async def _announce(self) -> None:
        for name in self._subs:
            jobs = tuple(sorted(j for j, cap in self._held.items() if cap == name))[:MAX_HOLDING_JOBS]
            if not jobs and not self._announced.get(name):
                continue  # nothing held, and the others know it
            self._last_issued = max(now_ms(), self._last_issued + 1)  # each newer than the last
            holding = Holding(
                version=1, capability=name, person=self.identity.public_key, name=self.name[:64],
                jobs=list(jobs), issued_at=self._last_issued,
            )  # fmt: skip
            try:
                await self.durable.nc.publish(desk_subject(name), seal_holding(self.identity, holding))
            except nats.errors.Error as exc:
                log.debug("could not announce the jobs held of %s: %s", name, exc)
                continue
            self._announced[name] = jobs

    def _holds(self, job_id: str, capability: str | None) -> None:
        """Record that this desk holds *job_id* (of *capability*), or (None) no longer does; announce it."""
        if capability is None:
            self._held.pop(job_id, None)
        else:
            self._held[job_id] = capability
        self._changed.set()

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
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._announce()  # nothing held any more: the others show those jobs waiting again
            await self.durable.nc.flush(timeout=1)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for pull in self._subs.values():
            with contextlib.suppress(nats.errors.Error):
                await pull.unsubscribe()
        for sub in self._listening:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    # -- claiming ----------------------------------------------------------------------

    def _order(self, capability: str | None) -> list[str]:
        if capability is not None:
            return [capability]
        waiting = sorted((s.job_id, s.capability) for s in self.inbox.board.values() if s.state == "queued")
        first = list(dict.fromkeys(cap for _, cap in waiting if cap in self._subs))
        counted = [row.capability for row in self.inbox.rows() if row.count and row.capability in self._subs]
        first += [cap for cap in counted if cap not in first]
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
        self._holds(job_id, cap.name)
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
        try:
            await self._settle(cap, msg, envelope, shown)
        finally:
            self._holds(envelope.job_id, None)

    async def _settle(self, cap: Capability, msg: Msg, envelope: Envelope, shown: asyncio.Future[Job]) -> None:
        job_id = envelope.job_id
        request_digest = digest(msg.data)
        attempt = msg.metadata.num_delivered
        state = JobState(job_id, "running", cap.name, envelope.submitter, request_digest, self.identity.public_key)
        state.attempts, state.detail = attempt, f"claimed by {self.name}"
        keepalive = asyncio.create_task(keep_in_progress(msg, ACK_WAIT_S))
        try:
            await self.durable.put_state(state, self.identity)
            execution = await execute(cap, envelope, self.identity.public_key)
        except asyncio.CancelledError:
            await quietly(msg.nak())
            raise
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            log.warning("handing job %s back after a JetStream error: %s", job_id, exc)
            await quietly(msg.nak(delay=1.0))
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
            await quietly(msg.nak(delay=1.0))


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until *event* is set, for at most *seconds*.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that
    arrives as the event is set, and the desk's close would wait for ever.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


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
