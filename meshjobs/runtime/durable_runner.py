"""The worker side of durable jobs: pull, verify, claim, run once, store the result, then ack."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from meshjobs.durable import (
    BUSY,
    DLQ_SUBJECT,
    DONE,
    REPLAY,
    STREAM,
    Durable,
    JobState,
    consumer_name,
    jobs_subject,
)
from meshjobs.envelope import Envelope, digest
from meshjobs.errors import MeshError, Rejected
from meshjobs.identity import Identity
from meshjobs.observe.metrics import JobObserver
from meshjobs.runtime.app import App, Capability
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.execute import Execution, execute, seal
from meshjobs.workflow.waiting import ApprovalGate

#: Checks a frame that arrived on a subject for a capability (every check but
#: replay, which is mesh-wide here); the live worker's, so both paths agree.
Verify = Callable[[bytes, str, Capability, float | None], Envelope]

log = logging.getLogger("meshjobs.durable")
ACK_WAIT = 5.0  # redelivery after a crash; in-progress acks keep long jobs alive
#: How long one pull waits for a job: also how late a quarantine can stop a pull already waiting.
FETCH_WAIT = 1.0
#: How often a paused (quarantined) runner looks again.
PAUSED_POLL = 0.2


class DurableRunner:
    """Consumes the durable queue of every capability of a worker."""

    def __init__(
        self,
        durable: Durable,
        app: App,
        identity: Identity,
        config: WorkerConfig,
        verify: Verify,
        slots: asyncio.Semaphore,
        *,
        observer: JobObserver | None = None,
        approvals: ApprovalGate | None = None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        #: While true (the worker is quarantined), nothing new is pulled: the other workers take the queue.
        self.paused = paused
        self.approvals = approvals  # gated capabilities wait here for a signed approval (in-progress acks go on)
        self.durable = durable
        self.observer = observer or JobObserver()  # $SRV.STATS and metrics: runs, redeliveries, dead letters
        self.app = app
        self.identity = identity
        self.peer = identity.public_key
        self.config = config
        self.verify = verify
        self.slots = slots  # one concurrency limit for the live and the durable path
        self.js: JetStreamContext = durable.js
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._free = asyncio.Semaphore(self.config.concurrency)
        self._stopping = asyncio.Event()
        self.executions = 0

    async def start(self) -> None:
        for cap in list(self.app.capabilities.values()):
            await self.consume(cap)

    async def consume(self, cap: Capability) -> None:
        """Start pulling *cap*'s durable jobs (a capability offered while the worker runs, too)."""
        if cap.name in self._loops:
            return
        config = ConsumerConfig(
            durable_name=consumer_name(cap.name),
            filter_subject=jobs_subject(cap.name),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            # A backstop: the worker moves a job to the dead-letter queue
            # itself after max_attempts, before the server gives up on it.
            max_deliver=self.config.max_attempts + 2,
            max_ack_pending=max(self.config.concurrency * 4, 64),
        )
        sub = await self.js.pull_subscribe(
            jobs_subject(cap.name), durable=consumer_name(cap.name), stream=STREAM, config=config
        )
        self._loops[cap.name] = asyncio.create_task(self._pull(cap, sub))

    async def release(self, name: str) -> None:
        """Stop pulling *name*'s durable jobs; jobs already pulled finish."""
        loop = self._loops.pop(name, None)
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    async def _pull(self, cap: Capability, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            # Pull only what can start now: nothing fetched waits unacknowledged
            # behind a busy worker, so a shutdown hands nothing back.
            await self._free.acquire()
            if self._stopping.is_set():
                self._free.release()
                return
            if self.paused():
                self._free.release()
                await asyncio.sleep(PAUSED_POLL)
                continue
            try:
                msgs = await sub.fetch(1, timeout=FETCH_WAIT)
            except (nats.errors.TimeoutError, TimeoutError):
                self._free.release()
                continue
            except nats.errors.ConnectionClosedError:
                self._free.release()
                return  # the worker is gone; nothing to pull for
            except (nats.errors.Error, MeshError) as exc:
                self._free.release()
                log.warning("pulling %s failed: %s", cap.name, exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(cap, msg))
                self._jobs.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        self._free.release()

    async def stop(self) -> None:
        """Stop pulling; finish what was pulled (or hand it back after the drain timeout)."""
        self._stopping.set()
        for loop in self._loops.values():
            loop.cancel()
        await asyncio.gather(*self._loops.values(), return_exceptions=True)
        if self._jobs:
            done, pending = await asyncio.wait(set(self._jobs), timeout=self.config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, cap: Capability, msg: Msg) -> None:
        try:
            await self._handle_job(cap, msg)
        except (nats.errors.Error, MeshError, TimeoutError) as exc:
            # Mesh state unreachable for a moment (a leader election, a lost
            # node): hand the job back to be delivered again shortly.
            log.warning("handing a durable job back after a JetStream error: %s", exc)
            await quietly(msg.nak(delay=1.0))

    async def _handle_job(self, cap: Capability, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        if attempt > 1:
            self.observer.redelivered(cap.name)
        try:
            envelope = self.verify(msg.data, msg.subject, cap, self.config.max_durable_validity_s)
        except Rejected as exc:
            self.observer.rejected(exc.code)
            log.warning("terminating an invalid durable job: %s", exc)
            await msg.term()  # never redelivered
            return
        job_id = envelope.job_id
        request_digest = digest(msg.data)
        admission = await self.durable.admit(self.identity, envelope, msg.data, msg.metadata.sequence.stream, attempt)
        if admission == REPLAY:
            self.observer.rejected("replay")
            log.warning("terminating job %s: another copy of its frame was claimed (replay)", job_id)
            await msg.term()
            return
        if admission == DONE:
            await msg.ack()  # a claimant's result is stored (a redelivery after a crash): never run twice
            return
        if admission == BUSY:
            log.warning("job %s: the claim of delivery %d holds something else; handing it back", job_id, attempt)
            await msg.nak(delay=1.0)
            return
        if attempt > self.config.max_attempts:
            # Delivered more often than it was ever run to a failure: earlier
            # runs took their worker down with them. Contain it unrun.
            reason = f"delivered {attempt} times without finishing (it may crash its worker)"
            await self._dead_letter(cap, msg, job_id, reason, attempt)
            state = JobState(job_id, "dead", cap.name, envelope.submitter, request_digest, self.peer, attempt)
            state.detail = reason
            frame = seal(self.identity, job_id, request_digest, Execution("error", None, ("DeadLetter", reason)))
            await self.durable.store_result(envelope, msg.data, frame)
            await self.durable.put_state(state, self.identity)
            await msg.ack()
            return
        state = JobState(job_id, "running", cap.name, envelope.submitter, request_digest, self.peer, attempt)
        await self.durable.put_state(state, self.identity)
        keepalive = asyncio.create_task(keep_in_progress(msg))
        self.observer.job_started(cap.name, "durable")
        started = asyncio.get_running_loop().time()
        try:
            self.executions += 1
            # The slot is taken inside, after any approval: a waiting job holds none.
            execution = await execute(cap, envelope, self.peer, gate=self.approvals, slots=self.slots)
        except asyncio.CancelledError:
            self.observer.job_finished(cap.name, "durable", "rejected", 0.0, "shutting_down")
            keepalive.cancel()
            await quietly(msg.nak())  # shutting down: hand it back at once
            raise
        finally:
            keepalive.cancel()
        status, error = execution.status, execution.error
        elapsed = asyncio.get_running_loop().time() - started
        self.observer.job_finished(cap.name, "durable", status, elapsed, error and error[1])
        if status in ("error", "timeout") and attempt < self.config.max_attempts:
            delay = self.config.retry_delay_s * 2 ** (attempt - 1)
            state.state, state.detail = (
                "queued",
                f"attempt {attempt} failed: {(error or ('', ''))[1]}; retry in {delay:g} s",
            )
            await self.durable.put_state(state, self.identity)
            await msg.nak(delay=delay)
            return
        if status in ("error", "timeout"):
            reason = f"failed {attempt} time(s); last: {(error or ('', ''))[0]}: {(error or ('', ''))[1]}"
            await self._dead_letter(cap, msg, job_id, reason, attempt)
            execution = Execution("error", None, ("DeadLetter", reason))
            state.state, state.detail = "dead", reason
        else:
            state.state = "done" if status == "ok" else "failed"
        frame = seal(self.identity, job_id, request_digest, execution)
        await self.durable.store_result(envelope, msg.data, frame)  # write-once: nothing can replace it
        await self.durable.put_state(state, self.identity)
        await msg.ack()

    async def _dead_letter(self, cap: Capability, msg: Msg, job_id: str, reason: str, attempts: int) -> None:
        headers = {
            "Meshjobs-Job": job_id,
            "Meshjobs-Reason": reason[:1000],
            "Meshjobs-Attempts": str(attempts),
            "Nats-Msg-Id": f"dlq.{digest(msg.data)}.{attempts}",  # the frame's: nobody can squat it
        }
        await self.js.publish(f"{DLQ_SUBJECT}.{cap.name}", msg.data, headers=headers)
        self.observer.dead_lettered(cap.name)
        log.warning("job %s moved to the dead-letter queue: %s", job_id, reason)


async def keep_in_progress(msg: Msg, ack_wait: float = ACK_WAIT) -> None:
    """Tell JetStream the job is still being worked on, three times per *ack_wait*, until cancelled."""
    while True:
        await asyncio.sleep(ack_wait / 3)
        await quietly(msg.in_progress())


async def quietly(action: object) -> None:
    """Await an ack, nak or in-progress; a broker that cannot take it is logged, not raised (redelivery covers it)."""
    try:
        await action  # type: ignore[misc]
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        log.debug("ack failed: %s", exc)
