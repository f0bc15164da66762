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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from meshjobs._nats import connect
from meshjobs._version import __version__
from meshjobs.discovery import Endpoint, ServiceResponder
from meshjobs.envelope import Envelope, check_window, claimed_signer, digest, now_ms, open_envelope
from meshjobs.errors import RETRYABLE_REASONS, KeyExists, MeshError, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.runtime.app import App, Capability
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.execute import RUNNING, Execution, execute, seal
from meshjobs.runtime.gate import Gate, SampledLog
from meshjobs.runtime.ledger import CLAIMS, JobEntry, JobTable, ReplayGuard, claim_key
from meshjobs.state import MeshKV, open_bucket
from meshjobs.subjects import PEER_QUEUE, peer_subject, queue_subject
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import QuarantineBoard

if TYPE_CHECKING:
    from meshjobs.runtime.durable_runner import DurableRunner

log = logging.getLogger("meshjobs.runtime.worker")
CLAIM_WAIT_S = 3.0  # how long a job waits for a just-started worker's claim store


@dataclass
class _Running:
    envelope: Envelope
    request_digest: str
    entry: JobEntry
    started: float


class Worker:
    """Runs one :class:`App` on a NATS connection under one identity."""

    def __init__(self, app: App, identity: Identity, policy: TrustPolicy, config: WorkerConfig | None = None):
        if not app.capabilities:
            raise UsageError(f"app {app.name!r} registers no capabilities")
        self.app = app
        self.identity = identity
        self.policy = policy.with_key(identity.public_key)
        self.config = config or WorkerConfig()
        self.peer = identity.public_key
        self.instance_id = NUID().next().decode()
        self.replays = ReplayGuard()
        self.gate = Gate(
            sender_rate=self.config.sender_rate,
            sender_burst=2 * self.config.sender_rate,
            refusal_rate=self.config.refusal_rate,
            refusal_burst=2 * self.config.refusal_rate,
        )
        self.claims: MeshKV | None = None
        self._claims_ready = asyncio.Event()
        self._sampled = SampledLog(log)
        self.jobs = JobTable()
        self.rejected = 0
        self._nc: NATS | None = None
        self._subs: list[Subscription] = []
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._running: dict[tuple[str, str], _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
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
        self._endpoints: dict[str, Endpoint] = {}
        for cap in app.capabilities.values():
            meta = {
                "capability": cap.name,
                "deterministic": str(cap.deterministic).lower(),
                "timeout": f"{cap.timeout:g}",
                "description": cap.description,
            }
            endpoint_name = cap.name.replace(".", "_")
            shared = Endpoint(endpoint_name, queue_subject(cap.name), queue_subject(cap.name), meta)
            direct = Endpoint(f"{endpoint_name}-direct", peer_subject(self.peer, cap.name), PEER_QUEUE, meta)
            self.responder.endpoints += [shared, direct]
            self._endpoints[cap.name] = shared

    # -- lifecycle ---------------------------------------------------------

    async def start(self, nc: NATS) -> None:
        """Subscribe and start answering. The connection stays the caller's."""
        self._nc = nc
        for cap in self.app.capabilities.values():
            for endpoint in self.responder.endpoints:
                if endpoint.metadata["capability"] != cap.name:
                    continue
                sub = await nc.subscribe(
                    endpoint.subject, queue=endpoint.queue_group, cb=self._callback(cap), pending_msgs_limit=65536
                )
                self._subs.append(sub)
        await self.responder.start(nc)
        await nc.flush()
        # JetStream may be slow or away (an election, a lost node): serving
        # core commands must not wait for it, and a SIGTERM must not either.
        self._setup = asyncio.create_task(self._setup_jetstream(nc))
        self._heartbeat = asyncio.create_task(self._heartbeats())
        log.info(
            "worker %s (%s, %s) serving %s",
            self.peer,
            self.config.name or self.app.name,
            self.app.kind,
            ", ".join(sorted(self.app.capabilities)),
        )

    async def _setup_jetstream(self, nc: NATS) -> None:
        """Watch quarantine orders and consume durable jobs, retrying until JetStream answers."""
        from meshjobs.durable import Durable
        from meshjobs.runtime.durable_runner import DurableRunner

        warned = False
        while self.board is None or self.claims is None or (self.config.durable and self.durable is None):
            runner = None
            try:
                if self.board is None:
                    self.board = await QuarantineBoard.open(nc, self.policy.operators)
                if self.claims is None:
                    self.claims = await open_bucket(nc, CLAIMS, replicas=None)
                    self._claims_ready.set()
                if self.config.durable and self.durable is None:
                    runner = DurableRunner(
                        await Durable.open(nc), self.app, self.identity, self.config, self.verify, self._slots
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
        """Ask :meth:`serve` to drain and return (safe from a signal handler)."""
        self._stop.set()

    async def serve(self, servers: str | list[str]) -> None:
        """Connect (retrying forever), serve until SIGTERM/SIGINT, then drain and close."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        nc = await connect(servers, self.identity, name=f"meshjobs-worker-{self.app.name}", forever=True)
        try:
            await self.start(nc)
            await self._stop.wait()
            log.info("draining: %d job(s) in flight", self.jobs.inflight)
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await nc.close()
        log.info("worker stopped")

    async def drain(self) -> None:
        """Stop taking work, finish or hand back in-flight jobs, stop answering discovery."""
        self._draining = True
        await self.responder.stop()
        for sub in self._subs:
            # drain() processes what the server already delivered to us
            # (those jobs are ours) and then unsubscribes.
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("could not drain a subscription cleanly: %s", exc)
        self._subs.clear()
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
        if self.board is not None:
            await self.board.close()
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
        if claimed_signer(data) not in self.policy.keys and not self.gate.allow_refusal():
            # A stranger's or a junk frame past the refusal budget: dropped
            # before any crypto, unanswered (a flood buys nothing).
            self._sampled.warning("flood", "dropping unanswered junk or frames from untrusted keys")
            return
        request_digest = digest(data)
        try:
            envelope = self._admit(data, msg.subject, cap)
        except Rejected as exc:
            await self._refuse(reply, request_digest, None, exc)
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

    async def _refuse(self, reply: str | None, request_digest: str, job_id: str | None, exc: Rejected) -> None:
        self.rejected += 1
        self._sampled.warning(exc.code, "rejected %s: %s", job_id or "message", exc)
        if reply and (exc.code in RETRYABLE_REASONS or self.gate.allow_refusal()):
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
        try:
            async with self._slots:
                execution = await execute(cap, envelope, self.peer)
        except asyncio.CancelledError:
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
        status, _, error = execution
        self._endpoints[cap.name].stats.record(
            int((time.monotonic() - running.started) * 1e9), None if status == "ok" else (error or ("", ""))[1]
        )

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
