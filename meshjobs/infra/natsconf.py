"""Rendering nats-server configuration. Pure functions: data in, text out.

:func:`render` turns nested dicts, lists and scalars into nats-server's config
syntax; builders such as :func:`single_node` produce those dicts. Every
rendering is checked with ``nats-server -t`` in the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from meshjobs.infra.topology import Community, Node, Region, Topology

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON string syntax is valid nats-server syntax and escapes safely.
        return json.dumps(str(value))
    raise TypeError(f"cannot render {type(value).__name__} in a nats-server config")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


class Include(str):
    """A value rendered as an ``include "path"`` directive (its dict key is ignored).

    Secrets live in included files so rendered configs can be committed.
    """


class Var(str):
    """A reference to a variable defined in an included file: rendered as ``$NAME``."""


def _line(key: str, value: Any, indent: int) -> str:
    if isinstance(value, Include):
        return f"include {json.dumps(str(value))}"
    return f"{_key(key)}: {_render(value, indent)}"


def _render(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, Var):
        return f"${value}"
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = [f"{pad}  {_line(k, v, indent + 1)}" for k, v in value.items() if v is not None]
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = [f"{pad}  {_render(v, indent + 1)}" for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    return _scalar(value)


def render(config: dict[str, Any], header: str = "") -> str:
    """Render a top-level config dict. Keys whose value is None are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [_line(k, v, 0) for k, v in config.items() if v is not None]
    return "\n".join(lines) + "\n"


def hostport(host: str, port: int | None) -> str:
    """``host:port`` for a listen setting; None asks for a random port; IPv6 in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{-1 if port is None else port}"


def single_node(
    *,
    store_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    monitor_port: int | None = None,
    server_name: str = "meshjobs",
    domain: str | None = None,
    log_file: Path | None = None,
    sync_interval: str | None = None,
) -> dict[str, Any]:
    """One nats-server with JetStream: the embedded default of ``meshjobs up``.

    A port of None asks the server for a random free one (reported in its log).
    """
    jetstream: dict[str, Any] = {"store_dir": store_dir}
    if domain:
        jetstream["domain"] = domain
    if sync_interval:
        jetstream["sync_interval"] = sync_interval
    return {
        "server_name": server_name,
        "listen": hostport(host, port),
        "http": hostport(host, monitor_port),
        "jetstream": jetstream,
        "log_file": log_file,
    }


# -- the federated mesh ---------------------------------------------------------
#
# Hub nodes: one cluster per region (routes), gateways between regions, one
# JetStream domain, an app account for all mesh traffic and a system account.
# Community leaves: their own peers, no JetStream, bound to the app account on
# the hub through a leaf credential. Every client and leaf logs in with an
# nkey; anything else is refused. Secrets come from files under secrets/ that
# are included, so the configs themselves contain none.

SECRETS_DIR = "secrets"


def leaf_key_var(community: str) -> str:
    """The variable (defined in secrets/leaf-keys.conf) holding a community leaf's public key."""
    return "LEAF_" + community.upper().replace("-", "_") + "_KEY"


def peer_permissions(key: str, domain: str) -> dict[str, Any]:
    """What one peer may do: mesh subjects, its own inbox and direct subject, discovery, JetStream."""
    return {
        "publish": {
            "allow": ["mesh.>", "_INBOX.>", "$SRV.>", "$JS.API.>", f"$JS.{domain}.API.>", "$KV.>", "$JS.ACK.>"]
        },
        "subscribe": {"allow": ["mesh.cmd.>", f"mesh.peer.{key}.>", f"_INBOX.{key}.>", "$SRV.>"]},
    }


def leaf_permissions(peers: list[str], domain: str) -> dict[str, Any]:
    """What a community's leaf may carry between its peers and the hub, and nothing more."""
    subscribe = ["mesh.cmd.>", "$SRV.>"]
    for key in peers:
        subscribe += [f"mesh.peer.{key}.>", f"_INBOX.{key}.>"]
    return {
        "publish": {"allow": ["mesh.>", "_INBOX.>", "$SRV.>", f"$JS.{domain}.API.>", "$JS.ACK.>"]},
        "subscribe": {"allow": subscribe},
    }


#: A public key whose seed was thrown away when it was made. A server with no
#: admitted peer lists it so that it still requires authentication: with no
#: users at all, nats-server would let anyone in.
NOBODY = "UC2RCPW47N6INCMVBSY3SREAKTXNALFV3BHB64QWMJC2ZPWYH5JCTSJM"


def _users(keys: list[str], domain: str) -> list[dict[str, Any]]:
    users = [{"nkey": key, "permissions": peer_permissions(key, domain)} for key in keys]
    return users or [{"nkey": NOBODY, "permissions": {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}}]


def hub_node(topology: Topology, region: Region, node: Node, data_dir: Path) -> dict[str, Any]:
    """The config of one hub server."""
    mesh = topology.mesh
    host = mesh.host
    jetstream: dict[str, Any] = {
        "store_dir": data_dir / node.name,
        "domain": mesh.domain,
        "sync_interval": region.sync_interval,
    }
    # Leaf connections authenticate against the account users when the
    # leafnodes block has no authorization of its own (which only takes one
    # nkey), so each community's leaf is a user of the mesh account.
    leaf_users = [
        {"nkey": Var(leaf_key_var(c.name)), "permissions": leaf_permissions(c.peers, mesh.domain)}
        for c in topology.community
    ]
    return {
        "server_name": node.name,
        "server_tags": [f"region:{region.name}"],
        "listen": hostport(host, node.client_port),
        "http": hostport(host, node.monitor_port),
        "leaf keys": Include(f"{SECRETS_DIR}/leaf-keys.conf") if topology.community else None,
        "jetstream": jetstream,
        "accounts": {
            mesh.account: {
                "jetstream": "enabled",
                "users": (_users(mesh.peers, mesh.domain) if mesh.peers or not leaf_users else []) + leaf_users,
            },
            "SYS": {"users": []},
        },
        "system_account": "SYS",
        "cluster": {
            "name": region.name,
            "listen": hostport(host, node.cluster_port),
            "routes": Include(f"{SECRETS_DIR}/routes-{region.name}.conf"),
        },
        "gateway": {
            "name": region.name,
            "listen": hostport(host, node.gateway_port),
            "gateways": Include(f"{SECRETS_DIR}/gateways.conf"),
        },
        "leafnodes": {"listen": hostport(host, node.leaf_port)},
    }


def leaf_node(topology: Topology, community: Community) -> dict[str, Any]:
    """The config of one community broker: a leaf node with its own peers and no JetStream."""
    mesh = topology.mesh
    region = next(r for r in topology.region if r.name == community.region)
    urls = [f"nats-leaf://{_urlhost(mesh.host)}:{n.leaf_port}" for n in region.nodes]
    return {
        "server_name": community.name,
        "listen": hostport(mesh.host, community.client_port),
        "http": hostport(mesh.host, community.monitor_port),
        "accounts": {mesh.account: {"users": _users(community.peers, mesh.domain)}},
        "leafnodes": {
            "remotes": [
                {
                    "urls": urls,
                    "account": mesh.account,
                    "seed": Include(f"{SECRETS_DIR}/leaf-{community.name}.conf"),
                }
            ]
        },
    }


def _urlhost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def node_config(topology: Topology, name: str, data_dir: Path) -> str:
    """The rendered config of the hub node or community leaf called *name*."""
    found = topology.node(name)
    header = (
        f"meshjobs mesh {topology.mesh.name!r}: {name}\n"
        "generated by `meshjobs broker config` from the topology file; edit the topology, not this file"
    )
    if isinstance(found, tuple):
        return render(hub_node(topology, found[0], found[1], data_dir), header=header)
    return render(leaf_node(topology, found), header=header)
