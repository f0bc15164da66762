"""A whole topology as local processes: ``meshjobs mesh up | down | status``.

Everything lives under a state directory: rendered configs, ``secrets/``, one
pid file and one log per server, and JetStream data under ``data/``. Servers
outlive the command that started them; ``down`` stops them by PID (checked
against /proc first). Health comes from the servers' monitoring endpoints.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshjobs._nats import connect
from meshjobs.errors import BrokerError
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer, find_nats_server, is_our_server, stop_pid_file
from meshjobs.infra.credentials import ensure_credentials
from meshjobs.infra.natsconf import node_config
from meshjobs.infra.services import TRUST_SERVICE, ServiceProcess, trust_service
from meshjobs.infra.topology import Community, Topology
from meshjobs.state import StateSpec
from meshjobs.state import provision as create_state


@dataclass
class ServerHealth:
    """What one server's monitoring endpoints say."""

    name: str
    role: str
    region: str
    up: bool = False
    routes: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    leafnodes: int = 0
    connections: int = 0
    meta_leader: str = ""
    meta_size: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MeshHealth:
    servers: list[ServerHealth]

    @property
    def problems(self) -> list[str]:
        return [f"{s.name}: {p}" for s in self.servers for p in s.problems]

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def meta_leader(self) -> str:
        return next((s.meta_leader for s in self.servers if s.meta_leader), "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "meta_leader": self.meta_leader,
            "problems": self.problems,
            "servers": [s.as_dict() for s in self.servers],
        }


def _get(host: str, port: int, path: str, timeout: float = 1.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{host}:{port}/{path}", timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def _hub_health(topology: Topology, health: ServerHealth, port: int, region_nodes: list[str]) -> None:
    host = topology.mesh.host
    routez = _get(host, port, "routez")
    health.routes = sorted({r.get("remote_name", "") for r in routez.get("routes") or []} - {""})
    missing = set(region_nodes) - {health.name} - set(health.routes)
    if missing:
        health.problems.append(f"no route to {', '.join(sorted(missing))}")
    gatewayz = _get(host, port, "gatewayz")
    health.gateways = sorted(gatewayz.get("outbound_gateways") or {})
    others = {r.name for r in topology.region} - {health.region}
    if others - set(health.gateways):
        health.problems.append(f"no gateway to {', '.join(sorted(others - set(health.gateways)))}")
    health.leafnodes = int(_get(host, port, "leafz").get("leafnodes", 0))
    meta = _get(host, port, "jsz").get("meta_cluster") or {}
    health.meta_leader = str(meta.get("leader", ""))
    health.meta_size = int(meta.get("cluster_size", 0))
    hubs = sum(len(r.nodes) for r in topology.region)
    if not health.meta_leader:
        health.problems.append("no JetStream meta leader")
    elif health.meta_size != hubs:
        health.problems.append(f"JetStream meta group has {health.meta_size} of {hubs} nodes")


def _leaf_health(topology: Topology, health: ServerHealth, community: Community) -> None:
    health.leafnodes = int(_get(topology.mesh.host, community.monitor_port, "leafz").get("leafnodes", 0))
    if health.leafnodes < 1:
        health.problems.append(f"leaf link to region {community.region} is down")


def check_health(topology: Topology) -> MeshHealth:
    """Ask every server of *topology* how it is doing (a down server is a problem, not an error)."""
    servers = []
    for region in topology.region:
        names = [n.name for n in region.nodes]
        for node in region.nodes:
            health = ServerHealth(node.name, "hub", region.name)
            check = functools.partial(_hub_health, topology, health, node.monitor_port, names)
            _probe(health, check, topology, node.monitor_port)
            servers.append(health)
    for community in topology.community:
        health = ServerHealth(community.name, "leaf", community.region)

        _probe(health, functools.partial(_leaf_health, topology, health, community), topology, community.monitor_port)
        servers.append(health)
    return MeshHealth(servers)


def _probe(health: ServerHealth, check: Callable[[], None], topology: Topology, monitor_port: int) -> None:
    try:
        varz = _get(topology.mesh.host, monitor_port, "varz")
        health.up = True
        health.connections = int(varz.get("connections", 0))
        check()
    except (OSError, urllib.error.URLError, ValueError) as exc:
        if not health.up:
            health.problems.append("not running (monitoring endpoint does not answer)")
        else:
            health.problems.append(f"monitoring endpoint failed: {exc}")


class LocalMesh:
    """The topology as local nats-server processes under *state_dir*."""

    def __init__(self, topology: Topology, state_dir: Path, *, detach: bool = True) -> None:
        self.topology = topology
        self.state_dir = state_dir.resolve()
        self.detach = detach
        self.started: dict[str, NatsServer] = {}

    def server(self, name: str, binary: Path | None = None) -> NatsServer:
        text = node_config(self.topology, name, self.state_dir / "data")
        return NatsServer(text, self.state_dir, name=name, binary=binary, detach=self.detach)

    def up(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> MeshHealth:
        """Start every server that is not running, then wait until the mesh is healthy.

        *progress* hears one line per step (a server started, what the mesh still waits for).
        """
        say = progress or (lambda line: None)
        binary = find_nats_server()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ensure_credentials(self.topology, self.state_dir)
        for name in self.topology.server_names():
            server = self.server(name, binary)
            if self._running(server):
                say(f"{name} already running")
                continue
            say(f"starting {name}")
            server.start(timeout=timeout)
            self.started[name] = server
        return self.wait_healthy(timeout, progress)

    def wait_healthy(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> MeshHealth:
        deadline = time.monotonic() + timeout
        health = check_health(self.topology)
        while not health.healthy and time.monotonic() < deadline:
            if progress is not None:
                progress(f"waiting: {health.problems[0]}" if health.problems else "waiting")
            time.sleep(0.2)
            health = check_health(self.topology)
        if not health.healthy:
            raise BrokerError(f"the mesh is not healthy after {timeout:g} s: " + "; ".join(health.problems[:4]))
        return health

    def _running(self, server: NatsServer) -> bool:
        try:
            pid = int(server.pid_path.read_text().strip())
        except (OSError, ValueError):
            return False
        return is_our_server(pid, server.config_path)

    def hub_urls(self) -> list[str]:
        """Every hub node's client URL, the state region's first."""
        state = self.topology.state_region
        regions = [state, *(r for r in self.topology.region if r.name != state.name)]
        return [f"nats://{self.topology.mesh.host}:{n.client_port}" for r in regions for n in r.nodes]

    def trust_service(self, env: dict[str, str] | None = None) -> ServiceProcess:
        """The trust service of this mesh (``meshjobs trust serve`` on the hub nodes); log and pid in the state dir.

        It runs as the identity of *env*'s ``MESHJOBS_HOME``: a key the topology
        lists under ``trust_services``.
        """
        return trust_service(self.hub_urls(), self.state_dir, env=env, detach=self.detach)

    def start_trust_service(self, env: dict[str, str] | None = None, timeout: float = 30.0) -> ServiceProcess | None:
        """Start the trust service unless it is running; None when it was."""
        service = self.trust_service(env)
        if service.alive():
            return None
        return service.start(timeout)

    def down(self) -> list[str]:
        """Stop the trust service and every server of the mesh by PID; returns the names that were running."""
        stopped = [TRUST_SERVICE] if self.trust_service().stop() else []
        for name in reversed(self.topology.server_names()):
            server = self.server(name)
            if stop_pid_file(server.pid_path, server.config_path):
                stopped.append(name)
        return stopped

    def reload(self) -> list[str]:
        """Re-render every running server's config and signal it to reload (SIGHUP, by PID)."""
        import os
        import signal

        ensure_credentials(self.topology, self.state_dir)
        reloaded = []
        for name in self.topology.server_names():
            server = self.server(name)
            if not self._running(server):
                continue
            server.config_path.write_text(server.config_text)
            os.kill(int(server.pid_path.read_text().strip()), signal.SIGHUP)
            reloaded.append(name)
        return reloaded


async def provision(topology: Topology, identity: Identity, specs: Iterable[StateSpec]) -> list[str]:
    """Create the declared mesh state where the topology says: its replicas, in its state region.

    Only an operator may create mesh state on a closed mesh: *identity* must
    be listed in ``[mesh] operators``. What exists keeps its settings.
    """
    region = topology.state_region
    urls = [f"nats://{topology.mesh.host}:{n.client_port}" for n in region.nodes]
    nc = await connect(urls, identity, name="meshjobs-provision")
    try:
        return await create_state(nc, specs, replicas=topology.mesh.state_replicas, placement=region.name)
    finally:
        await nc.close()
