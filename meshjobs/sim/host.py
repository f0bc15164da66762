"""One process of the simulation: several simulated peers, each a real :class:`Worker`.

Run by :mod:`meshjobs.sim.runner` as ``python -m meshjobs.sim SPEC``,
where SPEC is a JSON file (:class:`HostSpec`). Every peer here has its own
identity and its own NATS connection, so the broker sees each one as a
distinct member of the capability's queue group, and every peer runs the
unmodified worker runtime: envelope checks, signed results, quarantine.
Only the handler is the simulation's: it answers as the peer's
:class:`~meshjobs.sim.scenarios.Behaviour` says and appends one JSON line
per run to the execution log (``O_APPEND``, one ``write`` per line, so lines
from concurrent processes never interleave). That log, not what submitters
report, is the ground truth of who ran what.

Malicious peers of the ``forge`` scenario also attack the reputation system
from their own connections (:mod:`meshjobs.sim.forge`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict

from meshjobs._nats import connect
from meshjobs.envelope import now_ms
from meshjobs.identity import Identity
from meshjobs.runtime.app import App, JobContext
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.worker import Worker
from meshjobs.sim.forge import Forger
from meshjobs.sim.scenarios import CAPABILITY, Behaviour, RoleGuess, Scenario
from meshjobs.trust.policy import load_trust

log = logging.getLogger("meshjobs.sim.host")


class PeerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    seed: str
    """The peer's nkey seed (the spec file is private to the run, mode 0600)."""
    honest: bool
    community: str = ""
    region: str = ""


class HostSpec(BaseModel):
    """What one host process runs."""

    model_config = ConfigDict(extra="forbid")

    url: str
    trust_file: str
    execution_log: str
    scenario: Scenario
    seed: int
    p: float
    k: int
    collude: bool = False
    role_aware: bool = False
    peers: list[PeerSpec]
    honest_keys: list[str] = []
    """Every honest peer of the run (targets of the forgers' false evidence)."""
    colluder_seeds: list[str] = []
    """forge: every cheater's key; the cheaters act as one adversary."""
    stats_file: str = ""
    """Where the forgers' counts go when the process stops."""
    forge_interval_s: float = 1.0
    forge_rounds: int = 40


def sim_app(behaviour: Behaviour, log_fd: int) -> App:
    """The app of one simulated peer: one deterministic capability, answered as *behaviour* says."""
    app = App("sim", description="meshjobs adversary simulation peer")
    runs = 0
    guess = RoleGuess()

    @app.capability(CAPABILITY, deterministic=True, idempotent=True, timeout=30)
    async def compute(task: int, x: int, salt: str, ctx: JobContext) -> str:
        """Hash x and salt (the simulation's deterministic job)."""
        nonlocal runs
        looks_checked = guess.looks_checked(ctx.expires_at_ms - now_ms())
        value = behaviour.answer(runs, x, salt, looks_checked=looks_checked)
        runs += 1
        line = {
            "peer": behaviour.index,
            "task": task,
            "job": ctx.job_id,
            "submitter": ctx.submitter,
            "honest": behaviour.honest,
            "value": value,
            "looks_checked": looks_checked,
        }
        os.write(log_fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
        return value

    return app


def behaviour_of(spec: HostSpec, peer: PeerSpec) -> Behaviour:
    """How *peer* answers, as the run's plan says."""
    return Behaviour(peer.honest, spec.scenario, spec.p, spec.k, spec.seed, peer.index, spec.collude, spec.role_aware)


async def _start_peer(spec: HostSpec, peer: PeerSpec, log_fd: int) -> tuple[Worker, NATS, Identity]:
    identity = Identity.from_seed_text(peer.seed)
    behaviour = behaviour_of(spec, peer)
    policy = load_trust(Path(spec.trust_file), required=True)
    config = WorkerConfig(
        name=f"sim-{peer.index:03d}",
        community=peer.community,
        region=peer.region,
        durable=False,
        drain_timeout_s=5.0,
    )
    nc = await connect(spec.url, identity, name=f"meshjobs-sim-peer-{peer.index}", forever=True)
    worker = Worker(sim_app(behaviour, log_fd), identity, policy, config)
    await worker.start(nc)
    return worker, nc, identity


async def serve(spec: HostSpec) -> None:
    """Start every peer of *spec*, serve until SIGTERM or SIGINT, then drain and close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_fd = os.open(spec.execution_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    started: list[tuple[Worker, NATS, Identity]] = []
    forgers: list[asyncio.Task[None]] = []
    stats: list[Forger] = []
    try:
        started = list(await asyncio.gather(*(_start_peer(spec, peer, log_fd) for peer in spec.peers)))
        for (_, nc, identity), peer in zip(started, spec.peers, strict=True):
            if Behaviour(peer.honest, spec.scenario).forges:
                colluders = [Identity.from_seed_text(seed) for seed in spec.colluder_seeds]
                forger = Forger(nc, identity, colluders, spec.honest_keys, seed=f"{spec.seed}:{peer.index}")
                stats.append(forger)
                forgers.append(asyncio.create_task(forger.run(spec.forge_rounds, spec.forge_interval_s)))
        await stop.wait()
    finally:
        for task in forgers:
            task.cancel()
        await asyncio.gather(*forgers, return_exceptions=True)
        await asyncio.gather(*(worker.drain() for worker, _, _ in started), return_exceptions=True)
        await asyncio.gather(*(nc.close() for _, nc, _ in started), return_exceptions=True)
        os.close(log_fd)
        if spec.stats_file and stats:
            total: Counter[str] = Counter()
            for forger in stats:
                total.update(forger.stats)
            Path(spec.stats_file).write_text(json.dumps(dict(total)))


async def trust_service(url: str, home: Path) -> None:
    """The trust service under the identity and trust policy in *home*, until SIGTERM or SIGINT."""
    from meshjobs.identity import IDENTITY_FILE, load_identity
    from meshjobs.trust.policy import TRUST_FILE
    from meshjobs.trust.service import serve as serve_trust

    identity = load_identity(home / IDENTITY_FILE)
    policy = load_trust(home / TRUST_FILE, required=True)
    nc = await connect(url, identity, name="meshjobs-sim-trust-service", forever=True)
    task = asyncio.create_task(serve_trust(nc, identity, policy))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        await nc.close()


def main(argv: list[str]) -> int:
    """``SPEC.json``: host the peers it lists; ``--trust-service URL HOME``: run the trust service of HOME."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) == 3 and argv[0] == "--trust-service":
        asyncio.run(trust_service(argv[1], Path(argv[2])))
        return 0
    if len(argv) != 1:
        print("usage: python -m meshjobs.sim SPEC.json | --trust-service URL HOME (meshjobs sim)", file=sys.stderr)
        return 2
    spec = HostSpec.model_validate_json(Path(argv[0]).read_bytes())
    asyncio.run(serve(spec))
    return 0
