"""A real closed mesh for attack tests: two one-node hub regions and one community leaf.

Started once per test session, on first use (the ``closed_mesh`` fixture in
``tests/conftest.py``), with mesh state provisioned by its operator. Static
nats-server configs need every key before the servers start, so a pool of
identities is generated up front, each admitted with the roles its tests
need (:data:`POOL`). In-process workers and clients connect with these
identities, from the hub or from the leaf (:class:`Site`).

The attacker is admitted on both servers as an ordinary peer (worker and
submitter) and trusted by no worker and no operator.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.identity import Identity
from meshjobs.infra.mesh import LocalMesh
from meshjobs.infra.mesh import provision as provision_mesh
from meshjobs.infra.topology import Topology

HUB, LEAF = "n-1", "club"

#: name -> (roles on the hub nodes, roles on the community leaf). Peer roles are
#: "peers" (worker and submitter), "workers" or "submitters"; operators and the
#: trust service connect to hub nodes only.
POOL: dict[str, tuple[str | None, str | None]] = {
    "op": ("operators", None),  # provisions mesh state; the operator every test policy lists
    "op2": ("operators", None),  # a second operator, also listed (orders share one sequence)
    "outsider": ("operators", None),  # an operator of the broker whom no test policy lists
    "trust": ("trust_services", None),
    "user": ("peers", None),  # test_roles' victim and submitter, on the hub
    "worker": (None, "peers"),  # test_roles' worker process, on the leaf
    "attacker": ("peers", "peers"),  # ordinary peer everywhere, trusted by nobody
    "sub": ("submitters", "submitters"),  # the trusted submitter of the live-path attack tests
    "w1": ("workers", "workers"),
    "w2": ("workers", "workers"),
    "w3": ("workers", "workers"),
}


def free_ports(count: int) -> Iterator[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return iter(ports)


def closed_topology(ids: dict[str, Identity]) -> Topology:
    """Two one-node regions (a JetStream meta group needs more than one server) and one community leaf."""
    ports = free_ports(12)
    fields = ("client_port", "cluster_port", "gateway_port", "leaf_port", "monitor_port")
    hub: dict[str, list[str]] = {}
    leaf: dict[str, list[str]] = {}
    for name, (on_hub, on_leaf) in POOL.items():
        if on_hub:
            hub.setdefault(on_hub, []).append(ids[name].public_key)
        if on_leaf:
            leaf.setdefault(on_leaf, []).append(ids[name].public_key)
    return Topology.model_validate(
        {
            "mesh": {"name": "closed", "state_region": "north", "state_replicas": 1, **hub},
            "region": [
                {"name": region, "nodes": [{"name": f"{region[0]}-1", **{f: next(ports) for f in fields}}]}
                for region in ("north", "south")
            ],
            "community": [
                {"name": LEAF, "region": "north", "client_port": next(ports), "monitor_port": next(ports), **leaf}
            ],
        }
    )


async def raw_connect(url: str, identity: Identity | None, errors: list[str] | None = None) -> NATS:
    """A plain nats-py connection, as an attacker would make it; async errors (lower-cased) go to *errors*."""

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc).lower())

    options = {"allow_reconnect": False, "connect_timeout": 2, "error_cb": on_error}
    if identity is not None:
        options.update(nkeys_seed_str=identity.seed_text(), inbox_prefix=f"_INBOX.{identity.public_key}")
    return await nats.connect(url, **options)


def refused(errors: list[str], what: str = "") -> bool:
    """Whether the server refused something on a raw connection (``for publish to`` / ``for subscription to``)."""
    return any(f"permissions violation {what}" in e for e in errors)


@dataclass
class Site:
    """Where a test runs: the open session broker, or the closed mesh from its hub or its leaf.

    The attacker and the submitter connect at :attr:`url`; :attr:`other` is the
    other side of the leaf link (the same URL on the open broker), operators
    connect at :attr:`hub`.
    """

    where: str  # "open", "hub" or "leaf"
    url: str
    other: str
    hub: str
    ids: dict[str, Identity]

    @property
    def closed(self) -> bool:
        return self.where != "open"

    @classmethod
    def open(cls, url: str) -> Site:
        """The open broker admits anyone: a fresh pool of identities."""
        return cls("open", url, url, url, {name: Identity.generate() for name in POOL})

    async def connect(self, name: str, url: str | None = None) -> NATS:
        """A meshjobs connection as pool identity *name* (at :attr:`url` unless told)."""
        return await connect(url or self.url, self.ids[name])

    async def raw(self, name: str, errors: list[str] | None = None, url: str | None = None) -> NATS:
        return await raw_connect(url or self.url, self.ids[name], errors)


@dataclass
class ClosedMesh:
    topology: Topology
    ids: dict[str, Identity]

    def url(self, where: str) -> str:
        return self.topology.client_url(HUB if where == "hub" else LEAF)

    def site(self, where: str) -> Site:
        assert where in ("hub", "leaf"), where
        other = "leaf" if where == "hub" else "hub"
        return Site(where, self.url(where), self.url(other), self.url("hub"), self.ids)


def start_closed_mesh(root: Path) -> tuple[ClosedMesh, LocalMesh]:
    """Start the servers (stopped by PID with :func:`stop_closed_mesh`) and provision mesh state as ``op``."""
    ids = {name: Identity.generate() for name in POOL}
    topology = closed_topology(ids)
    local = LocalMesh(topology, root / "state", detach=False)
    try:
        local.up(timeout=60)
        asyncio.run(provision_mesh(topology, ids["op"], MESH_STATE))
    except BaseException:
        stop_closed_mesh(local)
        raise
    return ClosedMesh(topology, ids), local


def stop_closed_mesh(local: LocalMesh) -> None:
    for server in local.started.values():
        server.stop()
