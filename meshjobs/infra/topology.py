"""The mesh topology file: regions of hub nodes, gateways between them, community leaf nodes.

One TOML file describes the whole mesh (see ``config/topology.toml``). It holds
structure and public keys only; secrets (route and gateway passwords, leaf
seeds) live in a per-deployment secrets directory, see :mod:`meshjobs.secrets`.

Every error names the offending key, e.g. ``region[1].node[0].client_port:
port 4222 is used twice``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshjobs._files import parse_toml, read_local_text
from meshjobs.errors import UsageError
from meshjobs.identity import is_public_key

NAME = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
PORT = Annotated[int, Field(ge=1, le=65535)]
_DURATION = re.compile(r"^(always|\d+(ms|s|m|h))$")
MAX_TOPOLOGY_BYTES = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_keys(keys: list[str]) -> list[str]:
    for key in keys:
        if not is_public_key(key):
            raise ValueError(f"{key[:16]!r} is not a peer public key (56 characters starting with U)")
    if len(set(keys)) != len(keys):
        raise ValueError("a peer key is listed twice")
    return keys


class Node(_Model):
    """One hub server of a region."""

    name: NAME
    client_port: PORT
    cluster_port: PORT
    gateway_port: PORT
    leaf_port: PORT
    monitor_port: PORT


class Region(_Model):
    """A cluster of hub nodes; regions are joined by gateways."""

    name: NAME
    sync_interval: str = Field("2m", description="JetStream fsync interval, or 'always' for power-loss safety")
    nodes: list[Node] = Field(min_length=1)

    @field_validator("sync_interval")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _DURATION.match(value):
            raise ValueError("use 'always' or a duration such as '2m', '30s', '500ms'")
        return value


#: Roles a key can hold (see :mod:`meshjobs.infra.natsconf` for what each may do).
WORKER, SUBMITTER, OPERATOR, TRUST_SERVICE = "worker", "submitter", "operator", "trust_service"
PEER_ROLES = frozenset({WORKER, SUBMITTER})


class _Admitted(_Model):
    """Keys admitted on a server, by role. A key may be listed more than once: it gets every role."""

    peers: list[str] = Field(default_factory=list, description="ordinary peers: worker and submitter")
    workers: list[str] = Field(default_factory=list, description="keys that only run jobs")
    submitters: list[str] = Field(default_factory=list, description="keys that only submit jobs")

    _peer_keys = field_validator("peers", "workers", "submitters")(_check_keys)

    def _role_lists(self) -> dict[str, tuple[list[str], frozenset[str]]]:
        return {
            "peers": (self.peers, PEER_ROLES),
            "workers": (self.workers, frozenset({WORKER})),
            "submitters": (self.submitters, frozenset({SUBMITTER})),
        }

    def roles(self) -> dict[str, frozenset[str]]:
        """Every admitted key with the union of its roles, in the order the keys first appear."""
        out: dict[str, frozenset[str]] = {}
        for keys, roles in self._role_lists().values():
            for key in keys:
                out[key] = out.get(key, frozenset()) | roles
        return out


class Community(_Admitted):
    """A community broker: a leaf node attached to one region, with its own peers.

    Operators and trust services connect to hub nodes only, so a community's
    leaf link never carries JetStream administration or protected buckets.
    """

    name: NAME
    region: NAME
    client_port: PORT
    monitor_port: PORT


class Mesh(_Admitted):
    """Mesh-wide settings, and the keys admitted on every hub node."""

    name: NAME
    host: str = "127.0.0.1"
    domain: NAME = "hub"
    account: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$")] = "MESH"
    state_region: NAME | None = None
    state_replicas: int = Field(3, ge=1, le=5)
    reply_window: str = Field("10m", description="how long a worker may answer a request it received")
    operators: list[str] = Field(default_factory=list, description="JetStream admins; the only quarantine writers")
    trust_services: list[str] = Field(default_factory=list, description="the only reputation writers")

    _admin_keys = field_validator("operators", "trust_services")(_check_keys)

    @field_validator("reply_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if not _DURATION.match(value) or value == "always" or value.startswith("0") or value.endswith("ms"):
            raise ValueError("use a duration of at least a second, such as '10m', '90s' or '1h'")
        return value

    def _role_lists(self) -> dict[str, tuple[list[str], frozenset[str]]]:
        return {
            **super()._role_lists(),
            "operators": (self.operators, frozenset({OPERATOR})),
            "trust_services": (self.trust_services, frozenset({TRUST_SERVICE})),
        }


class Topology(_Model):
    """The whole mesh. Load one with :func:`load_topology`."""

    mesh: Mesh
    region: list[Region] = Field(min_length=1)
    community: list[Community] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        names = [r.name for r in self.region] + [n.name for r in self.region for n in r.nodes]
        names += [c.name for c in self.community]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"name {name!r} is used twice (regions, nodes and communities share one namespace)")
            seen.add(name)
        ports: dict[int, str] = {}
        for where, port in self._ports():
            if port in ports:
                raise ValueError(f"{where}: port {port} is already used by {ports[port]}")
            ports[port] = where
        regions = {r.name: r for r in self.region}
        for i, community in enumerate(self.community):
            if community.region not in regions:
                raise ValueError(f"community[{i}].region: no region named {community.region!r}")
        state = self.state_region
        if self.mesh.state_replicas > len(state.nodes):
            raise ValueError(
                f"mesh.state_replicas: {self.mesh.state_replicas} replicas need at least as many nodes "
                f"in region {state.name!r}, which has {len(state.nodes)}"
            )
        return self

    def _ports(self) -> list[tuple[str, int]]:
        out = []
        for i, region in enumerate(self.region):
            for j, node in enumerate(region.nodes):
                for field in ("client_port", "cluster_port", "gateway_port", "leaf_port", "monitor_port"):
                    out.append((f"region[{i}].nodes[{j}].{field}", getattr(node, field)))
        for i, community in enumerate(self.community):
            out += [(f"community[{i}].client_port", community.client_port)]
            out += [(f"community[{i}].monitor_port", community.monitor_port)]
        return out

    @property
    def state_region(self) -> Region:
        """The region whose nodes hold mesh state (default: the first)."""
        wanted = self.mesh.state_region or self.region[0].name
        for region in self.region:
            if region.name == wanted:
                return region
        raise ValueError(f"mesh.state_region: no region named {wanted!r}")

    def node(self, name: str) -> tuple[Region, Node] | Community:
        """A hub node (with its region) or a community leaf, by name."""
        for region in self.region:
            for node in region.nodes:
                if node.name == name:
                    return region, node
        for community in self.community:
            if community.name == name:
                return community
        known = ", ".join(self.server_names())
        raise UsageError(f"no node or community named {name!r} in the topology (known: {known})")

    def server_names(self) -> list[str]:
        return [n.name for r in self.region for n in r.nodes] + [c.name for c in self.community]

    def community_named(self, name: str) -> Community:
        for community in self.community:
            if community.name == name:
                return community
        raise UsageError(f"no community named {name!r} (known: {', '.join(c.name for c in self.community)})")

    def client_url(self, name: str) -> str:
        found = self.node(name)
        port = found.client_port if isinstance(found, Community) else found[1].client_port
        return f"nats://{self.mesh.host}:{port}"

    def with_ports(self, ports: Any) -> Topology:
        """A copy with every port replaced by ``next(ports)`` (tests use free ports)."""
        data = self.model_dump()
        for region in data["region"]:
            for node in region["nodes"]:
                for field in ("client_port", "cluster_port", "gateway_port", "leaf_port", "monitor_port"):
                    node[field] = next(ports)
        for community in data["community"]:
            community["client_port"], community["monitor_port"] = next(ports), next(ports)
        return Topology.model_validate(data)


def parse_topology(text: str, path: Path) -> Topology:
    return parse_toml(text, Topology, str(path), UsageError)


def load_topology(path: Path) -> Topology:
    """Read and validate a topology file; errors name the offending key."""
    text = read_local_text(path, what="topology file", max_bytes=MAX_TOPOLOGY_BYTES, error=UsageError)
    return parse_topology(text, path)
