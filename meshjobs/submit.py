"""The one way to submit work: queue, routed, verified or durable.

The CLI and Python users call :class:`Submitter`; it picks the path from the
options, so the choice between the capability's queue group, trust routing,
redundant verification and the durable queue lives in the library, once:

- **queue**: no routing options. The job goes through the capability's queue
  group (or to ``peer``); the outcome is filed as evidence and a result from a
  quarantined peer is refused.
- **routed**: ``constraints``, or ``trace``. The most trusted qualified peer,
  with fallback (:meth:`Router.submit`).
- **verified**: ``replicas`` > 1. Distinct peers, results compared, a quorum
  returned (:meth:`Router.submit_redundant`).
- **durable**: :meth:`Submitter.enqueue` and :meth:`Submitter.wait`, on the
  JetStream queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from meshjobs.client import Client, Outcome
from meshjobs.durable import Durable, settle_stored
from meshjobs.envelope import new_job_id
from meshjobs.errors import HandlerError, Reason, Rejected, UsageError
from meshjobs.router import Attempt, Constraints, Router

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

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise UsageError("timeout must be positive")
        if self.replicas < 1:
            raise UsageError("replicas must be at least 1")
        if self.quorum is not None and not 1 <= self.quorum <= self.replicas:
            raise UsageError(f"quorum {self.quorum} must be between 1 and replicas ({self.replicas})")

    @property
    def routed(self) -> bool:
        c = self.constraints
        return self.replicas > 1 or self.trace or any(v is not None for v in (c.min_trust, c.region, c.kind))

    @property
    def needed(self) -> int:
        return self.quorum or self.replicas // 2 + 1


@dataclass
class Submitted:
    """A verified outcome and, for routed submissions, every peer tried."""

    outcome: Outcome
    trace: list[Attempt] = field(default_factory=list)


class Submitter:
    """Submits on one client connection; owns a router when JetStream is reachable."""

    def __init__(self, client: Client, router: Router | None) -> None:
        self.client = client
        self.router = router

    @classmethod
    async def open(cls, client: Client, operators: frozenset[str] = frozenset()) -> Submitter:
        """A submitter with reputation and quarantine (raises where the broker has no JetStream)."""
        return cls(client, await Router.open(client, operators))

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
        if not options.routed:
            return Submitted(await self._queue(capability, args, options))
        if self.router is None:
            raise UsageError("routing options need reputation, which needs JetStream on the broker")
        constraints = options.constraints
        if options.peer is not None:
            constraints = Constraints(constraints.min_trust, constraints.region, constraints.kind, options.peer)
        if options.replicas > 1:
            done = await self.router.submit_redundant(
                capability,
                args,
                replicas=options.replicas,
                quorum=options.needed,
                constraints=constraints,
                timeout=options.timeout,
                job_id=options.job_id,
            )
        else:
            done = await self.router.submit(
                capability, args, constraints=constraints, timeout=options.timeout, job_id=options.job_id
            )
        return Submitted(done.outcome, done.trace)

    async def _queue(self, capability: str, args: dict[str, Any], options: SubmitOptions) -> Outcome:
        """The plain path: the queue group (or one peer), with the outcome filed as evidence."""
        router = self.router
        job_id = options.job_id or new_job_id()
        try:
            outcome = await self.client.submit(
                capability, args, timeout=options.timeout, peer=options.peer, job_id=job_id, peer_wait=options.peer_wait
            )
        except HandlerError as exc:
            if router is not None and exc.result is not None:
                router.report("failure", exc.result.worker, exc.result, job_id, capability, detail=str(exc))
            raise
        if router is not None:
            if router.board.is_quarantined(outcome.worker):
                raise Rejected(Reason.QUARANTINED, f"the result came from quarantined peer {outcome.worker[:12]}…")
            router.report("success", outcome.worker, outcome, job_id, capability)
        return outcome

    async def enqueue(self, capability: str, args: dict[str, Any] | None = None, *, job_id: str | None = None) -> str:
        """Queue a durable job; returns its job id."""
        durable = await Durable.open(self.client.nc)
        return await durable.submit(self.client.identity, capability, args or {}, job_id=job_id)

    async def wait(self, job_id: str, timeout: float) -> tuple[Any, bytes]:
        """Wait up to *timeout* seconds for a durable job's signed result; raise what a failure means."""
        durable = await Durable.open(self.client.nc)
        found: tuple[Any, bytes] = await durable.wait(job_id, timeout)
        settle_stored(job_id, found)
        return found
