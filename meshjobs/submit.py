"""The one way to submit work: queue, routed, verified or durable.

The CLI and Python users call :class:`Submitter`; it picks the path from the
options, so the choice between the capability's queue group, trust routing,
redundant verification and the durable queue lives in the library, once:

- **queue**: no routing options. The job goes through the capability's queue
  group (or to ``peer``); the outcome is filed as evidence and a result from a
  quarantined peer is refused.
- **routed**: ``constraints``, or ``trace``. The most trusted qualified peer,
  with fallback (:meth:`Router.submit`).
- **verified**: ``verify="auto"`` for deterministic capabilities, adaptive
  checks (:meth:`Verifier.submit`); ``replicas`` > 1 or ``quorum:N/M``,
  distinct peers, results compared, a quorum returned that trust does not
  contradict (:meth:`Verifier.submit_quorum`).
- **durable**: :meth:`Submitter.enqueue` and :meth:`Submitter.wait`, on the
  JetStream queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from meshjobs.client import Client, Outcome
from meshjobs.durable import Durable, Journal, settle_stored
from meshjobs.envelope import new_job_id
from meshjobs.errors import HandlerError, JobTimeout, MeshError, NoPeerError, Reason, Rejected, UsageError
from meshjobs.router import Attempt, Constraints, Router
from meshjobs.runtime.app import PEER_KINDS
from meshjobs.trust.policy import TrustPolicy
from meshjobs.verify import Verifier
from meshjobs.workflow.waiting import hold_outcome

log = logging.getLogger("meshjobs.submit")


@dataclass(frozen=True)
class SubmitOptions:
    """How one job is submitted. The defaults are the plain queue path."""

    timeout: float = 30.0
    """Seconds for the whole submission, retries and fallbacks included."""
    peer: str | None = None
    job_id: str | None = None
    peer_wait: float = 2.0
    """Seconds to keep trying while nobody offers the capability."""
    constraints: Constraints = field(default_factory=Constraints)
    replicas: int = 1
    quorum: int | None = None
    """Agreeing results needed; default a majority of ``replicas``."""
    trace: bool = False
    verify: str = "auto"
    escalate: tuple[str, ...] = ()
    """Kinds to try in order (``("ai", "hybrid", "human")``): on to the next when a peer of one kind
    declines, fails, times out, or its result fails ``validate``."""
    validate: Callable[[Any], str | None] | None = field(default=None, compare=False)
    approve_result: tuple[str, ...] = ()
    """Keys that must approve the verified result before it is accepted (see :mod:`meshjobs.workflow`)."""
    approve_timeout: float = 3600.0
    """A check of the result value: None when it is acceptable, else why not (escalation moves on)."""
    """``auto``: deterministic results are checked adaptively (see :mod:`meshjobs.verify`);
    ``off``: never; ``quorum:N/M``: run on M peers, N must agree."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.escalate if k not in PEER_KINDS]
        if unknown:
            raise UsageError(f"--escalate: {unknown[0]!r} is not a kind ({', '.join(PEER_KINDS)})")
        if self.escalate and self.constraints.kind:
            raise UsageError("--escalate chooses the kinds itself; drop --kind")
        if self.verify not in ("auto", "off"):
            parse_quorum(self.verify)
        if not self.timeout > 0:
            raise UsageError("timeout must be positive")
        if self.replicas < 1:
            raise UsageError("replicas must be at least 1")
        if self.quorum is not None and not 1 <= self.quorum <= self.replicas:
            raise UsageError(f"quorum {self.quorum} must be between 1 and replicas ({self.replicas})")

    @property
    def quorum_spec(self) -> tuple[int, int] | None:
        """(needed, replicas) for ``--verify quorum:N/M``, or for ``replicas`` > 1."""
        if self.verify.startswith("quorum:"):
            return parse_quorum(self.verify)
        if self.replicas > 1:
            return self.needed, self.replicas
        return None

    @property
    def routed(self) -> bool:
        return self.replicas > 1 or self.trace or bool(self.escalate) or self.constraints.routed

    @property
    def needed(self) -> int:
        return self.quorum or self.replicas // 2 + 1


def parse_quorum(text: str) -> tuple[int, int]:
    """``quorum:N/M`` -> (N, M): M peers run the job, N must agree."""
    body = text.removeprefix("quorum:")
    needed, _, replicas = body.partition("/")
    try:
        n, m = int(needed), int(replicas)
    except ValueError:
        raise UsageError(f"--verify must be auto, off or quorum:N/M (like quorum:2/3), not {text!r}") from None
    if not (text.startswith("quorum:") and 1 <= n <= m <= 15):
        raise UsageError(f"--verify {text!r}: need 1 <= N <= M <= 15")
    return n, m


#: Trace outcomes in which a peer ran the handler (a hedge cut when another peer answered first ran it too).
EXECUTED = frozenset({"success", "failure", "timeout", "cancelled"})


@dataclass
class Submitted:
    """A verified outcome and, for routed submissions, every peer tried."""

    outcome: Outcome
    trace: list[Attempt] = field(default_factory=list)

    @property
    def executions(self) -> int:
        """How many peers ran the job (at least one)."""
        return max(1, sum(a.outcome in EXECUTED for a in self.trace))


class Submitter:
    """Submits on one client connection; owns a router when JetStream is reachable."""

    def __init__(self, client: Client, router: Router | None, *, journal: Journal | None = None) -> None:
        self.client = client
        self.router = router
        # Durable jobs are checked against the frames signed here: one journal for enqueue and wait.
        self.journal = journal or Journal()

    @classmethod
    async def open(cls, client: Client, policy: TrustPolicy | None = None) -> Submitter:
        """A submitter with reputation and quarantine as *policy* says (raises where there is no JetStream)."""
        policy = policy or TrustPolicy()
        return cls(client, await Router.open(client, policy.operators, policy.trust_services, policy.pretrusted))

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()

    async def __aenter__(self) -> Submitter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self, capability: str, args: dict[str, Any] | None = None, options: SubmitOptions | None = None
    ) -> Submitted:
        """Run *capability* once (or on ``replicas`` peers) and return its verified outcome."""
        options = options or SubmitOptions()
        args = {} if args is None else args
        if options.escalate:
            return await self._escalate(capability, args, options)
        submitted = await self._submit_once(capability, args, options)
        if options.validate is not None and (problem := options.validate(submitted.outcome.value)) is not None:
            raise HandlerError(f"{capability}: the result was refused by the validator: {problem}", submitted.outcome)
        if options.approve_result:
            await hold_outcome(
                self.client.nc,
                submitted.outcome,
                submitter=self.client.identity.public_key,
                approvers=options.approve_result,
                timeout=options.approve_timeout,
            )
        return submitted

    async def _escalate(self, capability: str, args: dict[str, Any], options: SubmitOptions) -> Submitted:
        """Try each kind in turn; the trace shows every step. The same job id throughout: no peer runs it twice."""
        job_id = options.job_id or new_job_id()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.timeout
        trace: list[Attempt] = []
        last: MeshError | None = None
        for kind in options.escalate:
            left = deadline - loop.time()
            if left <= 0:
                break
            step = replace(
                options, escalate=(), job_id=job_id, timeout=left, constraints=replace(options.constraints, kind=kind)
            )
            started = loop.time()
            try:
                done = await self.submit(capability, args, step)
            except (HandlerError, JobTimeout, NoPeerError, Rejected) as exc:
                trace += getattr(exc, "trace", [])
                trace.append(Attempt(f"kind:{kind}", "escalated", str(exc), (loop.time() - started) * 1000))
                last = exc
                continue
            return Submitted(done.outcome, trace + done.trace)
        error = last or JobTimeout(f"{capability}: no result within {options.timeout:g} s")
        error.trace = trace
        raise error

    async def _submit_once(self, capability: str, args: dict[str, Any], options: SubmitOptions) -> Submitted:
        router = self.router
        if router is None:
            if options.routed or options.quorum_spec:
                raise UsageError("routing options need reputation, which needs JetStream on the broker")
            return Submitted(await self._queue(capability, args, options))
        constraints = options.constraints
        if options.peer is not None:
            constraints = replace(constraints, peer=options.peer)
        spec = options.quorum_spec
        if spec is not None:
            done = await Verifier(router).submit_quorum(
                capability,
                args,
                replicas=spec[1],
                quorum=spec[0],
                constraints=constraints,
                timeout=options.timeout,
                job_id=options.job_id,
            )
        elif options.verify == "auto" and await router.offers_deterministic(capability):
            done = await Verifier(router).submit(
                capability, args, constraints=constraints, timeout=options.timeout, job_id=options.job_id
            )
        elif options.routed:
            done = await router.submit(
                capability, args, constraints=constraints, timeout=options.timeout, job_id=options.job_id
            )
        else:
            return Submitted(await self._queue(capability, args, options))
        return Submitted(done.outcome, done.trace)

    async def _queue(self, capability: str, args: dict[str, Any], options: SubmitOptions) -> Outcome:
        """The plain path: the queue group (or one peer), with the outcome filed as evidence."""
        router = self.router
        job_id = options.job_id or new_job_id()
        if router is not None and options.peer and (why := router.refusal(options.peer)):
            raise Rejected(Reason.QUARANTINED, f"peer {options.peer[:12]}… {why}")
        try:
            outcome = await self.client.submit(
                capability, args, timeout=options.timeout, peer=options.peer, job_id=job_id, peer_wait=options.peer_wait
            )
        except HandlerError as exc:
            if router is not None and exc.result is not None:
                router.report("failure", exc.result.worker, exc.result, job_id, capability, detail=str(exc))
            raise
        if router is not None:
            if options.peer:  # quarantined while it ran: the peer asked for gives no result
                router.refuse(outcome.worker, f"job {job_id}")
            elif why := router.refusal(outcome.worker):
                # Never a quarantined peer's result: run it again on a peer in good standing.
                log.info("job %s: answered by %s…, which %s; routing", job_id, outcome.worker[:12], why)
                again = await router.submit(capability, args, timeout=options.timeout, job_id=job_id)
                return again.outcome
            router.report("success", outcome.worker, outcome, job_id, capability)
        return outcome

    async def enqueue(self, capability: str, args: dict[str, Any] | None = None, *, job_id: str | None = None) -> str:
        """Queue a durable job; returns its job id."""
        durable = await Durable.open(self.client.nc, journal=self.journal)
        return await durable.submit(self.client.identity, capability, args or {}, job_id=job_id)

    async def wait(self, job_id: str, timeout: float) -> tuple[Any, bytes]:
        """Wait up to *timeout* seconds for a durable job's signed result; raise what a failure means."""
        durable = await Durable.open(self.client.nc, journal=self.journal)
        found: tuple[Any, bytes] = await durable.wait(job_id, timeout)
        if self.router is not None:
            self.router.refuse(found[0].worker, f"job {job_id}")
        settle_stored(job_id, found)
        return found
