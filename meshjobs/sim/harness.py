"""The processes and files of one simulation run: broker, trust service, worker hosts, policy.

:class:`Harness` is a context manager: whatever happens inside it (an error,
Ctrl-C, a timeout), every child process is stopped by PID (SIGTERM, then
SIGKILL after a grace period) and the run's temporary directory is removed.
Children run in sessions of their own, so a Ctrl-C on the terminal reaches
only the runner, which stops them in order; on Linux they also get SIGTERM
when the runner dies outright.

Every party reads one trust policy: the submitter is the mesh's operator
(its evidence carries an operator's standing, as a real community's own
submissions would), pre-trusted peers are listed as ``[[pretrusted]]``, the
trust service as the only ``[[trust_service]]`` whose records count.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from meshjobs._files import write_private
from meshjobs._nats import connect
from meshjobs.errors import MeshError, UsageError
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer, embedded
from meshjobs.sim.host import HostSpec, PeerSpec
from meshjobs.sim.scenarios import SCENARIOS, Plan, make_plan
from meshjobs.state import provision
from meshjobs.trust.policy import TRUST_FILE, TrustPolicy, parse_trust


class SimError(MeshError):
    """The simulation could not run: a process of it failed or the mesh never came up."""

    exit_code = 1


@dataclass(frozen=True)
class SimConfig:
    """One run. Defaults: the acceptance setting of issue 11 (40 peers, 30% malicious, 300 jobs)."""

    peers: int = 40
    malicious: float = 0.3
    jobs: int = 300
    seed: int = 0
    scenario: str = "always-wrong"
    pretrusted: int | None = None
    """Anchors among the honest peers; None: :func:`~meshjobs.sim.scenarios.default_pretrusted` (3 of 40)."""
    p: float = 0.3
    """camouflage: how often a cheater answers wrong."""
    k: int = 5
    """long-con: jobs a cheater answers honestly before it turns."""
    collude: bool = False
    """camouflage, long-con: the cheaters act as one (one wrong value per job)."""
    role_aware: bool = False
    """Cheaters answer honestly whenever a request looks like a check (:class:`~meshjobs.sim.scenarios.RoleGuess`)."""
    verify: str = "auto"
    concurrency: int = 8
    """Jobs in flight at once."""
    rate: float = 0.0
    """Jobs started per second at most (0: as fast as they finish). A slower pace lets the trust
    service's signed records keep up with the evidence, as they do for submitters at a human pace."""
    hosts: int = 8
    """Processes the peers are spread over."""
    communities: int = 4
    """Peers are spread round-robin over this many communities."""
    timeout: float = 600.0
    """Seconds for the whole run; jobs not finished by then are left out (``timed_out``)."""
    job_timeout: float = 30.0
    settle_s: float = 15.0
    """Longest wait after the last job for reputation and quarantine to stop changing."""
    keep: bool = False
    """Keep the run's directory (logs, execution log, broker data) instead of removing it."""

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario {self.scenario!r} (one of {', '.join(SCENARIOS)})")
        for name in ("peers", "jobs", "concurrency", "hosts", "communities"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        for name in ("timeout", "job_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive")
        if not self.rate >= 0:
            raise UsageError("rate must be 0 (no limit) or positive")

    def plan(self) -> Plan:
        return make_plan(
            self.peers,
            self.malicious,
            self.scenario,
            self.seed,
            pretrusted=self.pretrusted,
            p=self.p,
            k=self.k,
            collude=self.collude,
            role_aware=self.role_aware,
        )


def _own_session_dying_with_parent() -> None:  # pragma: no cover - runs in the child
    # A Ctrl-C on the terminal reaches only the runner, which stops children in
    # order; a runner killed outright takes its children with it (Linux).
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Children:
    """The run's child processes, stopped by PID: SIGTERM, then SIGKILL after a grace period."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.workdir / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESHJOBS_")}
        with open(os.devnull, "rb") as devnull, log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env={**base, **(env or {})},
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_own_session_dying_with_parent if sys.platform == "linux" else None,
                start_new_session=sys.platform != "linux",
            )
        self.items.append((name, process, log))

    def check(self) -> None:
        """Raise :class:`SimError` if a child has exited."""
        for name, process, log in self.items:
            if process.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise SimError(f"{name} exited with code {process.returncode}: " + " | ".join(tail))

    def stop(self, prefix: str = "", timeout: float = 15.0) -> None:
        chosen = [(n, p) for n, p, _ in self.items if n.startswith(prefix)]
        for _, process in chosen:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, process in chosen:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.items = [item for item in self.items if not item[0].startswith(prefix)]


class Harness:
    """The processes and files of one run; a context manager that always cleans up."""

    def __init__(self, config: SimConfig, plan: Plan) -> None:
        self.config = config
        self.plan = plan
        self.submitter = Identity.generate()
        self.service = Identity.generate()
        self.peers = [Identity.generate() for _ in range(plan.peers)]
        self.adapters: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="meshjobs-sim-"))
        self.children = Children(self.workdir)
        self.broker: NatsServer | None = None
        self.policy = TrustPolicy()

    @property
    def keys(self) -> list[str]:
        return [p.public_key for p in self.peers]

    @property
    def url(self) -> str:
        if self.broker is None:
            raise SimError("the broker is not running")
        return self.broker.url

    @property
    def execution_log(self) -> Path:
        return self.workdir / "executions.jsonl"

    def __enter__(self) -> Harness:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.children.stop()
        finally:
            if self.broker is not None:
                self.broker.stop()
                self.broker = None
            if not self.config.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self) -> None:
        text = self._policy_text()
        self.policy = parse_trust(text, self.workdir / TRUST_FILE)
        write_private(self.workdir / TRUST_FILE, text)
        self.execution_log.touch(0o600)
        self.broker = embedded(self.workdir / "broker").start()
        asyncio.run(_provision(self.broker.url, self.submitter))
        self._start_trust_service(text)
        self._start_hosts()

    def _policy_text(self) -> str:
        """The run's trust policy; sections the installed policy parser does not know yet are left out."""
        me = self.submitter.public_key
        text = f'[[peer]]\nkey = "{me}"\nname = "sim-submitter"\n\n[[operator]]\nkey = "{me}"\nname = "sim-operator"\n'
        anchors = [self.keys[i] for i in sorted(self.plan.pretrusted)]
        optional = [("pretrusted", anchors), ("trust_service", [self.service.public_key])]
        for section, keys in optional:
            text += "".join(f'\n[[{section}]]\nkey = "{key}"\n' for key in keys)
        return text

    def _start_trust_service(self, policy_text: str) -> None:
        """``meshjobs trust serve`` under the service's own key and home, as an operator would run it."""
        home = self.workdir / "service"
        save_identity(self.service, home / IDENTITY_FILE)
        write_private(home / TRUST_FILE, policy_text)
        env = {"MESHJOBS_HOME": str(home)}
        argv = [sys.executable, "-m", "meshjobs", "trust", "serve", "--server", self.url]
        self.children.spawn("trust-service", argv, env)

    def _start_hosts(self) -> None:
        plan, config = self.plan, self.config
        honest = [self.keys[i] for i in sorted(plan.honest)]
        colluders = [self.peers[i].seed_text() for i in sorted(plan.malicious)] if plan.scenario == "forge" else []
        count = min(config.hosts, plan.peers)
        for host in range(count):
            peers = [
                PeerSpec(
                    index=i,
                    seed=self.peers[i].seed_text(),
                    honest=i in plan.honest,
                    community=f"community-{i % config.communities}",
                )
                for i in range(host, plan.peers, count)  # round-robin: cheaters spread over the processes
            ]
            spec = HostSpec(
                url=self.url,
                trust_file=str(self.workdir / TRUST_FILE),
                execution_log=str(self.execution_log),
                stats_file=str(self.workdir / f"host-{host}.stats.json"),
                scenario=plan.scenario,
                seed=plan.seed,
                p=plan.p,
                k=plan.k,
                collude=plan.collude,
                role_aware=plan.role_aware,
                peers=peers,
                honest_keys=honest,
                colluder_seeds=colluders,
            )
            path = self.workdir / f"host-{host}.json"
            write_private(path, spec.model_dump_json())
            self.children.spawn(f"host-{host}", [sys.executable, "-m", "meshjobs.sim", str(path)])

    def forge_stats(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for path in self.workdir.glob("host-*.stats.json"):
            try:
                total.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return dict(sorted(total.items()))


async def _provision(url: str, identity: Identity) -> None:
    """Create every stream and bucket of mesh state first, as ``meshjobs up`` does for its operator."""
    from meshjobs.catalog import MESH_STATE

    nc = await connect(url, identity, name="meshjobs-sim-provision")
    try:
        await provision(nc, MESH_STATE)
    finally:
        await nc.close()
