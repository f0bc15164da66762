"""Run an adversary simulation against the real runtime, on a private embedded broker.

:func:`run_sim` sets up a :class:`~meshjobs.sim.harness.Harness` (the embedded
broker, the trust service ``meshjobs trust serve`` under its own key, a few
host processes each running several simulated peers as real workers with
their own identities and NATS connections), then submits the jobs through the
real submit path (``Submitter`` with a ``Router``, ``SubmitOptions(verify=...)``)
with bounded concurrency, waits for the trust service to settle, reads who is
quarantined, stops the hosts (so the execution log is complete) and hands
everything to :mod:`meshjobs.sim.report`. Every process and file of the run is
gone when it returns or raises.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from meshjobs.client import Client
from meshjobs.errors import MeshError, Rejected
from meshjobs.router import Router
from meshjobs.sim.harness import Harness, SimConfig, SimError
from meshjobs.sim.report import JobResult, parse_log, summarize
from meshjobs.sim.scenarios import CAPABILITY, Plan, expected, job_args
from meshjobs.submit import SubmitOptions, Submitted, Submitter
from meshjobs.trust.policy import TrustPolicy

#: Called as (phase, done, total): phases "starting", "jobs", "settling", "stopping".
Progress = Callable[[str, int, int], None]
STARTUP_S = 90.0
STABLE_S = 2.0

__all__ = ["Progress", "SimConfig", "SimError", "run_sim"]


def submit_options(config: SimConfig, adapters: list[str]) -> SubmitOptions:
    return SubmitOptions(timeout=config.job_timeout, verify=config.verify)


def executions_of(done: Submitted) -> int:
    """How many peers ran the job, as the submitter reports it."""
    return done.executions


async def open_router(client: Client, policy: TrustPolicy) -> Router:
    """A router that reads the records of the policy's trust services and honours its operators' orders."""
    return await Router.open(client, policy.operators, policy.trust_services, policy.pretrusted)


def is_quarantined(router: Router, record: Any, peer: str) -> bool:
    """Quarantined by an operator order, or by the (signed) reputation record the router reads."""
    return router.board.is_quarantined(peer) or bool(record.quarantined)


async def quarantine_state(router: Router, keys: list[str]) -> tuple[set[int], tuple[float, ...]]:
    """Who is quarantined, and a fingerprint of every score (to tell when the trust service is done)."""
    records = await router.book.records(keys)
    quarantined = {i for i, key in enumerate(keys) if is_quarantined(router, records[key], key)}
    return quarantined, tuple(round(float(records[key].score()), 4) for key in keys)


class Run:
    """The submitting side of one run, in the runner's event loop."""

    def __init__(self, harness: Harness, progress: Progress, deadline: float) -> None:
        self.h = harness
        self.config = harness.config
        self.progress = progress
        self.deadline = deadline
        self.results: list[JobResult] = []
        self.quarantined: set[int] = set()
        self.timed_out = False
        self.job_seconds = 0.0

    async def __call__(self) -> None:
        async with await Client.connect(self.h.url, self.h.submitter) as client:
            await self._wait_for_peers(client)
            router = await open_router(client, self.h.policy)
            async with Submitter(client, router) as submitter:
                started = time.monotonic()
                await self._submit_all(submitter)
                self.job_seconds = time.monotonic() - started
                await router.flush()
                await self._settle(router)

    async def _wait_for_peers(self, client: Client) -> None:
        wanted = set(self.h.keys)
        deadline = time.monotonic() + min(STARTUP_S, self.deadline - time.monotonic())
        while time.monotonic() < deadline:
            self.h.children.check()
            seen = {p.peer for p in await client.peers(timeout=1.0, capability=CAPABILITY)} & wanted
            self.progress("starting", len(seen), len(wanted))
            if seen == wanted:
                return
            await asyncio.sleep(0.5)
        raise SimError(f"only some of the {len(wanted)} peers came up within {STARTUP_S:g} s")

    async def _submit_all(self, submitter: Submitter) -> None:
        """Jobs in order, ``concurrency`` in flight; at the deadline no new job starts and those in flight finish.

        (In-flight jobs are not cancelled: nats-py 2.16 logs an ``InvalidStateError`` and may drop the
        connection when a pending flush is cancelled and its PONG arrives afterwards.)
        """
        options = submit_options(self.config, self.h.adapters)
        tasks = iter(range(self.config.jobs))
        gap = 1.0 / self.config.rate if self.config.rate else 0.0
        next_start = time.monotonic()

        async def lane() -> None:
            nonlocal next_start
            for task in tasks:
                if gap:  # --rate: jobs start at most this often, whatever the lanes
                    wait, next_start = next_start - time.monotonic(), max(next_start, time.monotonic()) + gap
                    if wait > 0:
                        await asyncio.sleep(wait)
                if time.monotonic() >= self.deadline:
                    self.timed_out = True
                    return
                self.h.children.check()
                self.results.append(await self._one(submitter, task, options))
                self.progress("jobs", len(self.results), self.config.jobs)

        lanes = [asyncio.create_task(lane()) for _ in range(self.config.concurrency)]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _one(self, submitter: Submitter, task: int, options: SubmitOptions) -> JobResult:
        started = time.perf_counter()
        try:
            done = await submitter.submit(CAPABILITY, job_args(self.config.seed, task), options)
        except MeshError as exc:
            code = f"[{exc.code}]" if isinstance(exc, Rejected) else ""
            error = f"{type(exc).__name__}{code}: {exc}"[:300]
            return JobResult(task, error=error, seconds=time.perf_counter() - started)
        outcome = done.outcome
        return JobResult(task, outcome.value, outcome.worker, executions_of(done), None, time.perf_counter() - started)

    async def _settle(self, router: Router) -> None:
        """Wait until quarantine and scores stop changing (the trust service has caught up), within bounds."""
        limit = min(time.monotonic() + self.config.settle_s, self.deadline + self.config.settle_s)
        last: tuple[set[int], tuple[float, ...]] | None = None
        stable_since = time.monotonic()
        while True:
            self.progress("settling", 0, 0)
            state = await quarantine_state(router, self.h.keys)
            now = time.monotonic()
            if state != last:
                last, stable_since = state, now
            if now - stable_since >= STABLE_S or now >= limit:
                self.quarantined = state[0]
                return
            await asyncio.sleep(0.5)


def _quiet(phase: str, done: int, total: int) -> None:
    return None


def run_sim(config: SimConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run one simulation (blocking) and return its report; every process and file is gone afterwards."""
    plan = config.plan()
    progress = progress or _quiet
    started = time.monotonic()
    with Harness(config, plan) as harness:
        run = Run(harness, progress, started + config.timeout)
        asyncio.run(run())
        progress("stopping", 0, 0)
        harness.children.stop("host-")  # drained: the execution log is complete
        executions = parse_log(harness.execution_log.read_text())
        forged = harness.forge_stats() if plan.scenario == "forge" else {}
        workdir = harness.workdir
    report = {
        "scenario": plan.scenario,
        "seed": plan.seed,
        "peers": plan.peers,
        **summarize(
            plan,
            sorted(run.results, key=lambda r: r.task),
            executions,
            submitter=harness.submitter.public_key,
            quarantined=run.quarantined,
            jobs=config.jobs,
        ),
        "seconds": round(time.monotonic() - started, 2),
        "job_seconds": round(run.job_seconds, 2),
        "timed_out": run.timed_out,
        "verify": config.verify,
        "rate": config.rate or None,
        "p": plan.p if plan.scenario == "camouflage" else None,
        "k": plan.k if plan.scenario == "long-con" else None,
        "collude": plan.collude,
        "role_aware": plan.role_aware,
        "forged": forged,
        "adapters": harness.adapters,
        "workdir": str(workdir) if config.keep else None,
        "submitter": harness.submitter.public_key,
        "trust_service": harness.service.public_key,
        "detail": _detail(plan, harness.keys, executions, harness.submitter.public_key, run.quarantined),
    }
    return report


def _detail(
    plan: Plan, keys: list[str], executions: list[dict[str, Any]], submitter: str, quarantined: set[int]
) -> list[dict[str, Any]]:
    """One line per peer: its role, how often it ran a job, how often wrongly, whether it ended quarantined."""
    mine = [e for e in executions if e.get("submitter") == submitter]
    runs = Counter(int(e["peer"]) for e in mine)
    wrong = Counter(int(e["peer"]) for e in mine if e.get("value") != expected(plan.seed, int(e["task"])))
    return [
        {
            "index": i,
            "peer": key,
            "role": "malicious" if i in plan.malicious else "pretrusted" if i in plan.pretrusted else "honest",
            "executions": runs[i],
            "wrong_answers": wrong[i],
            "quarantined": i in quarantined,
        }
        for i, key in enumerate(keys)
    ]
