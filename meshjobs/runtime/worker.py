"""The worker runtime: receive, verify, run, sign, answer.

For each capability of the app the worker subscribes twice: to
``mesh.cmd.<capability>`` in the capability's queue group (load-balanced among
all workers offering it) and to its own direct subject. Every message goes
through :meth:`Worker._admit` — size, signature, strict decoding, audience,
registered capability, trust, validity window, replay — before any handler
code sees it; every refusal is answered with a signed rejection carrying a
reason code and never stalls the worker.

Jobs run concurrently up to ``concurrency``; jobs accepted but waiting for a
slot count towards ``max_pending``, beyond which the worker sheds load with a
retryable ``overloaded`` rejection. While a job runs the worker sends signed
``running`` heartbeats so the client can tell a slow job from a lost one. On
SIGTERM it drains: stops taking work, finishes what it holds (or hands it back
as ``shutting_down`` after ``drain_timeout_s``), then exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from meshjobs._nats import close_quietly, connect
from meshjobs._version import __version__
from meshjobs.compare import EXACT
from meshjobs.discovery import Endpoint, ServiceResponder
from meshjobs.envelope import Envelope, check_window, claimed_signer, digest, now_ms, open_envelope
from meshjobs.errors import RETRYABLE_REASONS, KeyExists, MeshError, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.manifest import check_attestations, seal_manifest
from meshjobs.observe.metrics import JobObserver, Observers, process_observer
from meshjobs.runtime.app import App, Capability
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.execute import RUNNING, Execution, execute, seal
from meshjobs.runtime.gate import Gate, SampledLog
from meshjobs.runtime.ledger import CLAIMS, JobEntry, JobTable, ReplayGuard, claim_key
from meshjobs.state import MeshKV, open_bucket
from meshjobs.subjects import PEER_QUEUE, peer_subject, queue_subject
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import QuarantineBoard
from meshjobs.trust.reputation import ReputationBook
from meshjobs.workflow.waiting import ApprovalGate

if TYPE_CHECKING:
    from meshjobs.runtime.durable_runner import DurableRunner

log = logging.getLogger("meshjobs.runtime.worker")
T = TypeVar("T")
CLAIM_WAIT_S = 3.0
QUARANTINE_POLL_S = 0.5  # how long a job waits for a just-started worker's claim store


@dataclass
class _Running:
    envelope: Envelope
    request_digest: str
    entry: JobEntry
    started: float


class Worker:
    """Runs one :class:`App` on a NATS connection under one identity."""

    def __init__(
        self,
        app: App,
        identity: Identity,
        policy: TrustPolicy,
        config: WorkerConfig | None = None,
        *,
        observer: JobObserver | None = None,
    ):
        if not app.capabilities:
            raise UsageError(f"app {app.name!r} registers no capabilities")
        self.app = app
        self.identity = identity
        self.policy = policy.with_key(identity.public_key)
        self.config = config or WorkerConfig()
        self.peer = identity.public_key
        self.instance_id = NUID().next().decode()
        self.replays = ReplayGuard()
        #: Holds jobs of gated capabilities until a signed approval (meshjobs.workflow.approval).
        self.approvals = ApprovalGate(lambda: self._nc, worker=self.peer, operators=self.policy.operators)
        self.gate = Gate(
            sender_rate=self.config.sender_rate,
            sender_burst=2 * self.config.sender_rate,
            refusal_rate=self.config.refusal_rate,
            refusal_burst=2 * self.config.refusal_rate,
        )
        self.claims: MeshKV | None = None
        self.book: ReputationBook | None = None
        self._claims_ready = asyncio.Event()
        self._sampled = SampledLog(log)
        self.jobs = JobTable()
        self.rejected = 0
        self._nc: NATS | None = None
        self._subs: list[Subscription] = []
        self._shared: list[Subscription] = []  # the queue-group ones, left while quarantined
        self._follower: asyncio.Task[None] | None = None
        #: Set by whoever reads signed reputation records: is this worker's own record quarantined?
        self.own_record_quarantined: Callable[[], bool] | None = None
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._running: dict[tuple[str, str], _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()  # a second stop request: do not wait for running jobs
        self._draining = False
        self.board: QuarantineBoard | None = None
        self.durable: DurableRunner | None = None
        self._setup: asyncio.Task[None] | None = None
        self.responder = ServiceResponder(
            self.instance_id,
            __version__,
            app.description or f"meshjobs worker {app.name}",
            {
                "peer": self.peer,
                "name": self.config.name or app.name,
                "kind": app.kind,
                "region": self.config.region,
                "community": self.config.community,
                "meshjobs": __version__,
            },
        )
        self._attestations = check_attestations(self.config.attestations, self.peer)
        self.responder.manifest = self.manifest
        self.observer = self._observers(observer)
        self._endpoints: dict[str, Endpoint] = {}
        self._cap_subs: dict[str, list[Subscription]] = {}
        for cap in app.capabilities.values():
            self._add_endpoints(cap)

    def manifest(self) -> str:
        """This worker's signed discovery manifest, as of now (see :mod:`meshjobs.manifest`)."""
        offers = [
            {"name": cap.name, "deterministic": cap.deterministic, "tags": list(cap.tags)}
            | ({"compare": cap.compare} if cap.compare != EXACT else {})
            for cap in self.app.capabilities.values()
            if cap.name in self._endpoints
        ]
        fields = {
            "instance": self.instance_id,
            "name": (self.config.name or self.app.name)[:128],
            "kind": self.app.kind,
            "region": self.config.region,
            "community": self.config.community,
            "capabilities": offers,
            "price": self.config.price,
            "slots": max(self.config.concurrency - len(self._running), 0),
            "attestations": list(self._attestations),
        }
        return seal_manifest(self.identity, fields).decode()

    def _observers(self, observer: JobObserver | None) -> JobObserver:
        """$SRV.STATS counters (durable runs too), plus the process's metrics unless given an observer."""
        if self.config.durable:
            from meshjobs.durable import consumer_name, jobs_subject

            self.responder.durable_names = lambda cap: (jobs_subject(cap), consumer_name(cap))
        return Observers([self.responder.stats_observer(), observer or process_observer()])

    def _add_endpoints(self, cap: Capability) -> None:
        meta = {
            "capability": cap.name,
            "deterministic": str(cap.deterministic).lower(),
            "timeout": f"{cap.timeout:g}",
            "description": cap.description,
            "tags": ",".join(cap.tags),
        }
        endpoint_name = cap.name.replace(".", "_")
        shared = Endpoint(endpoint_name, queue_subject(cap.name), queue_subject(cap.name), meta)
        direct = Endpoint(f"{endpoint_name}-direct", peer_subject(self.peer, cap.name), PEER_QUEUE, meta)
        self.responder.endpoints += [shared, direct]
        self._endpoints[cap.name] = shared

    async def offer(self, name: str) -> None:
        """Start serving capability *name*, registered on the app after the worker started.

        Discovery shows it at once; its queue group and direct subject are
        subscribed before this returns, its durable queue soon after.
        """
        cap = self.app.capabilities.get(name)
        if cap is None:
            raise UsageError(f"capability {name!r} is not registered on app {self.app.name!r}")
        if name in self._cap_subs:
            return
        self._add_endpoints(cap)
        if self._nc is not None:
            await self._subscribe(self._nc, shared=not self.quarantined(), direct=True, only=name)
            await self._nc.flush()
        if self.durable is not None:
            await self.durable.consume(cap)
        log.info("now offering %s", name)

    async def withdraw(self, name: str) -> None:
        """Stop offering *name*: no new jobs reach it; jobs already running finish."""
        if name not in self.app.capabilities:
            raise UsageError(f"capability {name!r} is not offered")
        self.responder.endpoints = [e for e in self.responder.endpoints if e.metadata.get("capability") != name]
        self._endpoints.pop(name, None)
        for sub in self._cap_subs.pop(name, []):
            if sub in self._shared:
                self._shared.remove(sub)
            self._subs.remove(sub)
            await sub.unsubscribe()
        if self.durable is not None:
            await self.durable.release(name)
        log.info("withdrew %s", name)

    # -- lifecycle ---------------------------------------------------------

    async def start(self, nc: NATS) -> None:
        """Subscribe and start answering. The connection stays the caller's."""
        self._nc = nc
        await self._subscribe(nc, shared=True, direct=True)
        await self.responder.start(nc)
        await nc.flush()
        # JetStream may be slow or away (an election, a lost node): serving
        # core commands must not wait for it, and a SIGTERM must not either.
        self._setup = asyncio.create_task(self._setup_jetstream(nc))
        self._heartbeat = asyncio.create_task(self._heartbeats())
        self._follower = asyncio.create_task(self._follow_quarantine())
        log.info(
            "worker %s (%s, %s) serving %s",
            self.peer,
            self.config.name or self.app.name,
            self.app.kind,
            ", ".join(sorted(self.app.capabilities)),
        )

    async def _subscribe(self, nc: NATS, *, shared: bool, direct: bool, only: str | None = None) -> None:
        """Subscribe to the capabilities' queue-group subjects (*shared*) and/or the direct ones."""
        for cap in list(self.app.capabilities.values()):
            if (only is not None and cap.name != only) or cap.name not in self._endpoints:
                continue
            for endpoint in self.responder.endpoints:
                is_shared = endpoint.queue_group != PEER_QUEUE
                if endpoint.metadata["capability"] != cap.name or not (shared if is_shared else direct):
                    continue
                sub = await nc.subscribe(
                    endpoint.subject, queue=endpoint.queue_group, cb=self._callback(cap), pending_msgs_limit=65536
                )
                self._subs.append(sub)
                self._cap_subs.setdefault(cap.name, []).append(sub)
                if is_shared:
                    self._shared.append(sub)

    def quarantined(self) -> bool:
        """Whether this worker's own key is quarantined (by an operator order or by its signed record)."""
        if self.board is not None and self.board.is_quarantined(self.peer):
            return True
        return self.own_record_quarantined is not None and self.own_record_quarantined()

    async def _follow_quarantine(self) -> None:
        """A quarantined worker leaves its queue groups (within a second) and rejoins when released.

        It keeps its direct subject, so it still answers (with refusals
        where the submitter is careful) and operators can probe it.
        """
        while True:
            await asyncio.sleep(QUARANTINE_POLL_S)
            nc = self._nc
            if nc is None or self._draining:
                continue
            try:
                if self.quarantined() and self._shared:
                    log.warning("this worker is quarantined: leaving its queue groups until released")
                    for sub in self._shared:
                        self._subs.remove(sub)
                        for subs in self._cap_subs.values():
                            if sub in subs:
                                subs.remove(sub)
                        await sub.unsubscribe()
                    self._shared.clear()
                elif not self.quarantined() and not self._shared:
                    log.warning("quarantine lifted: joining the queue groups again")
                    await self._subscribe(nc, shared=True, direct=False)
            except (nats.errors.Error, ValueError) as exc:
                log.warning("could not follow a quarantine change: %s", exc)

    def _jetstream_ready(self) -> bool:
        durable_ok = not self.config.durable or self.durable is not None
        return None not in (self.board, self.book, self.claims) and durable_ok

    async def _open_book(self, nc: NATS) -> ReputationBook:
        """Follow the signed reputation records, so an automatic quarantine of this worker is honoured too."""
        book = await ReputationBook.open(nc, self.identity, trust_services=self.policy.trust_services)
        await book.watch()

        def own_quarantined() -> bool:
            record = book.cached(self.peer)
            return record is not None and record.quarantined

        self.own_record_quarantined = own_quarantined
        return book

    async def _setup_jetstream(self, nc: NATS) -> None:
        """Watch quarantine orders and consume durable jobs, retrying until JetStream answers."""
        from meshjobs.durable import Durable
        from meshjobs.runtime.durable_runner import DurableRunner

        warned = False
        while (
            self.board is None
            or self.book is None
            or self.claims is None
            or (self.config.durable and self.durable is None)
        ):
            runner = None
            try:
                if self.board is None:
                    self.board = await QuarantineBoard.open(nc, self.policy.operators)
                if self.book is None:
                    self.book = await self._open_book(nc)
                if self.claims is None:
                    self.claims = await open_bucket(nc, CLAIMS, replicas=None)
                    self._claims_ready.set()
                if self.config.durable and self.durable is None:
                    runner = DurableRunner(
                        await Durable.open(nc),
                        self.app,
                        self.identity,
                        self.config,
                        self.verify,
                        self._slots,
                        observer=self.observer,
                        approvals=self.approvals,
                        paused=self.quarantined,
                    )
                    await runner.start()
                    self.durable = runner
            except (MeshError, nats.errors.Error, TimeoutError) as exc:
                if runner is not None:
                    await runner.stop()
                if not warned:
                    log.warning("JetStream not available yet (quarantine orders, durable jobs): %s; retrying", exc)
                    warned = True
                await asyncio.sleep(5.0)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` has begun: the worker takes no new work."""
        return self._draining

    def request_stop(self) -> None:
        """Ask :meth:`serve` to drain and return (safe from a signal handler).

        Asked again while draining (a second Ctrl-C, as with Celery), it stops
        at once: running jobs are handed back as ``shutting_down``.
        """
        if self._stop.is_set() and not self._forced.is_set():
            log.warning("stopping now: handing back %d unfinished job(s)", self.jobs.inflight)
            self._forced.set()
        self._stop.set()

    async def serve(self, servers: str | list[str]) -> None:
        """Connect (retrying forever), serve until SIGTERM/SIGINT, then drain and close."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        nc: NATS | None = None
        try:
            # A stop while no broker answers yet ends the wait for one.
            name = f"meshjobs-worker-{self.app.name}"
            nc = await _unless(self._stop, connect(servers, self.identity, name=name, forever=True))
            if nc is not None:
                await self.start(nc)
                await self._stop.wait()
                log.info("draining: %d job(s) in flight (again to stop at once)", self.jobs.inflight)
                await _unless(self._forced, self.drain())
                if self._forced.is_set():
                    await self._hand_back()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if nc is not None:
                await close_quietly(nc)  # the broker may be gone: nothing to report at exit
        log.info("worker stopped")

    async def _hand_back(self) -> None:
        """A forced stop: cancel running live jobs (each answers ``shutting_down``) and send what is left."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        if self._nc is not None and self._nc.is_connected:
            try:
                await self._nc.flush(timeout=2)
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("could not flush the last replies: %s", exc)

    async def drain(self) -> None:
        """Stop taking work, finish or hand back in-flight jobs, stop answering discovery."""
        self._draining = True
        if self._follower:
            self._follower.cancel()
        await self.responder.stop()
        connected = self._nc is not None and self._nc.is_connected
        for sub in self._subs:
            # drain() processes what the server already delivered to us
            # (those jobs are ours) and then unsubscribes. Without a broker
            # nothing more can arrive: just let go of the subscription.
            try:
                await (sub.drain() if connected else sub.unsubscribe())  # type: ignore[no-untyped-call]
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("could not drain a subscription cleanly: %s", exc)
        self._subs.clear()
        self._shared.clear()
        self._cap_subs.clear()
        if self._setup is not None and not self._setup.done():
            self._setup.cancel()
            await asyncio.gather(self._setup, return_exceptions=True)
        if self.durable is not None:
            await self.durable.stop()
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=self.config.drain_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("drain timeout: handing back %d unfinished job(s)", len(pending))
                await asyncio.wait(pending)
        if self._heartbeat:
            self._heartbeat.cancel()
        if self._follower:
            self._follower.cancel()
        if self.board is not None:
            await self.board.close()
        if self.book is not None:
            await self.book.close()
        if self._nc and self._nc.is_connected:
            try:
                await self._nc.flush(timeout=5)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("could not flush the last replies: %s", exc)

    # -- receiving ---------------------------------------------------------

    def _callback(self, cap: Capability) -> Any:
        async def on_message(msg: Msg) -> None:
            await self._receive(msg, cap)

        return on_message

    def _admit(self, data: bytes, subject: str, cap: Capability) -> Envelope:
        envelope = self.verify(data, subject, cap)
        skew = int(self.config.clock_skew_s * 1000)
        self.replays.check_and_record(envelope.submitter, envelope.nonce, envelope.expires_at + skew, now_ms())
        return envelope

    def verify(self, data: bytes, subject: str, cap: Capability, max_validity_s: float | None = None) -> Envelope:
        """Every check but replay: size, signature, decoding, audience, capability, trust, quarantine, window."""
        envelope = open_envelope(data, self.config.max_message_bytes)
        if envelope.capability != cap.name or envelope.audience != subject:
            raise Rejected(
                Reason.WRONG_AUDIENCE,
                f"signed for {envelope.audience!r} ({envelope.capability}) but arrived on {subject!r}",
            )
        if envelope.capability not in self.app.capabilities:
            raise Rejected(Reason.UNKNOWN_CAPABILITY)
        self.policy.check(envelope.submitter, envelope.capability)
        if self.board is not None:
            self.board.check(envelope.submitter)
        now = now_ms()
        skew = int(self.config.clock_skew_s * 1000)
        check_window(envelope, now, skew, int((max_validity_s or self.config.max_validity_s) * 1000))
        return envelope

    async def _receive(self, msg: Msg, cap: Capability) -> None:
        data, reply = msg.data, msg.reply
        # A stranger's or a junk frame spends one token of the refusal budget
        # before any crypto (its refusal is then answered without another);
        # past the budget it is dropped unanswered: a flood buys nothing.
        charged = claimed_signer(data) not in self.policy.keys
        if charged and not self.gate.allow_refusal():
            self._sampled.warning("flood", "dropping unanswered junk or frames from untrusted keys")
            return
        request_digest = digest(data)
        try:
            envelope = self._admit(data, msg.subject, cap)
        except Rejected as exc:
            await self._refuse(reply, request_digest, None, exc, charged=charged)
            return
        if envelope.reply is not None and reply != envelope.reply:
            # A captured envelope replayed with another reply subject: the
            # answer would go where the submitter did not sign for. Never run.
            self.rejected += 1
            self._sampled.warning("reply", "dropping job %s: reply subject is not the signed one", envelope.job_id)
            return
        if not self.gate.allow_sender(envelope.submitter):
            await self._refuse(reply, request_digest, envelope.job_id, Rejected(Reason.OVERLOADED))
            return
        key = (envelope.submitter, envelope.job_id)
        now = now_ms()
        entry = self.jobs.get(key, now)
        if entry is not None:
            await self._join(entry, envelope, reply, request_digest)
            return
        if self._draining:
            await self._refuse(reply, request_digest, envelope.job_id, Rejected(Reason.SHUTTING_DOWN))
            return
        if self.jobs.inflight >= self.config.max_pending:
            await self._refuse(reply, request_digest, envelope.job_id, Rejected(Reason.OVERLOADED))
            return
        entry = JobEntry(envelope.capability, envelope.args, envelope.expires_at + int(self.config.clock_skew_s * 1000))
        if reply:
            entry.replies.append((reply, request_digest))
        self.jobs.add(key, entry)
        running = _Running(envelope, request_digest, entry, time.monotonic())
        self._running[key] = running
        task = asyncio.create_task(self._run(key, running, cap))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, entry: JobEntry, envelope: Envelope, reply: str | None, request_digest: str) -> None:
        """A retry of a job we already hold: answer it from the first run, never run it again."""
        if not entry.same_request(envelope.capability, envelope.args):
            await self._refuse(reply, request_digest, envelope.job_id, Rejected(Reason.JOB_CONFLICT))
        elif reply is None:
            return
        elif entry.execution is not None:
            # Bound to *this* request, so the retrying client can verify it.
            await self._publish(reply, seal(self.identity, envelope.job_id, request_digest, entry.execution))
        else:
            entry.replies.append((reply, request_digest))

    async def _refuse(
        self, reply: str | None, request_digest: str, job_id: str | None, exc: Rejected, *, charged: bool = False
    ) -> None:
        """Count and log a refusal; answer it signed within the refusal budget (*charged*: paid for already)."""
        self.rejected += 1
        self.observer.rejected(exc.code)
        self._sampled.warning(exc.code, "rejected %s: %s", job_id or "message", exc)
        if reply and (exc.code in RETRYABLE_REASONS or charged or self.gate.allow_refusal()):
            await self._publish(
                reply, seal(self.identity, job_id, request_digest, Execution("rejected", error=(exc.code, exc.message)))
            )

    async def _publish(self, subject: str, data: bytes) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - a lost reply is retried by the client
            log.debug("could not publish a reply: %s", exc)

    # -- running -----------------------------------------------------------

    async def _claim(self, cap: Capability, envelope: Envelope) -> Rejected | None:
        """Claim the envelope's nonce mesh-wide (unless the capability is idempotent): a replay runs nowhere."""
        if cap.idempotent:
            return None
        if self.claims is None:
            try:  # a worker just started: its JetStream setup is usually a moment away
                await asyncio.wait_for(self._claims_ready.wait(), CLAIM_WAIT_S)
            except TimeoutError:
                return Rejected(Reason.UNAVAILABLE, "the mesh-wide replay claim store is not reachable yet")
            if self.claims is None:
                return Rejected(Reason.UNAVAILABLE, "the mesh-wide replay claim store is not reachable yet")
        try:
            await self.claims.create(claim_key(envelope.submitter, envelope.nonce), envelope.job_id.encode())
        except KeyExists:
            return Rejected(Reason.REPLAY, "this envelope was already accepted elsewhere in the mesh")
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            return Rejected(Reason.UNAVAILABLE, f"could not claim the job mesh-wide: {exc}")
        return None

    async def _run(self, key: tuple[str, str], running: _Running, cap: Capability) -> None:
        envelope = running.envelope
        refusal = await self._claim(cap, envelope)
        if refusal is not None:
            self._running.pop(key, None)
            self.jobs.forget(key)
            for reply, request_digest in running.entry.replies:
                await self._refuse(reply, request_digest, envelope.job_id, refusal)
            return
        path = "queue" if envelope.audience == queue_subject(cap.name) else "direct"
        self.observer.job_started(cap.name, path)
        try:
            execution = await execute(cap, envelope, self.peer, gate=self.approvals, slots=self._slots)
        except asyncio.CancelledError:
            self.observer.job_finished(cap.name, path, "rejected", time.monotonic() - running.started, "shutting_down")
            self._running.pop(key, None)
            self.jobs.forget(key)
            for reply, request_digest in running.entry.replies:
                await self._refuse(reply, request_digest, envelope.job_id, Rejected(Reason.SHUTTING_DOWN))
            raise
        frame = seal(self.identity, envelope.job_id, running.request_digest, execution)
        self._running.pop(key, None)
        entry = self.jobs.complete(key, frame, execution, now_ms())
        replies, entry.replies = entry.replies, []
        for reply, request_digest in replies:
            same = request_digest == running.request_digest
            await self._publish(
                reply, frame if same else seal(self.identity, envelope.job_id, request_digest, execution)
            )
        status, error = execution.status, execution.error
        self.observer.job_finished(cap.name, path, status, time.monotonic() - running.started, error and error[1])

    async def _heartbeats(self) -> None:
        """Tell clients waiting on long jobs that the job is still alive."""
        interval = self.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - interval
            for running in list(self._running.values()):
                if running.started > cutoff:
                    continue
                for reply, request_digest in running.entry.replies:
                    await self._publish(reply, seal(self.identity, running.envelope.job_id, request_digest, RUNNING))


async def _unless(event: asyncio.Event, work: Awaitable[T]) -> T | None:
    """Await *work* unless *event* is set first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None
