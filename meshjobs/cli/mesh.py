"""Operator commands: ``meshjobs broker ...`` and ``meshjobs mesh ...``."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import click
import tomlkit

from meshjobs.cli._common import DAY_S, F, Seconds, guarded, home
from meshjobs.errors import UsageError
from meshjobs.identity import decode_public
from meshjobs.infra.topology import Topology, load_topology, parse_topology

TOPOLOGY_HELP = "The mesh topology file (see config/topology.toml)."


def topology_option(func: F) -> F:
    return click.option(
        "--topology",
        "topology_path",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        envvar="MESHJOBS_TOPOLOGY",
        help=TOPOLOGY_HELP + " (env MESHJOBS_TOPOLOGY)",
    )(func)


def state_option(func: F) -> F:
    return click.option(
        "--state",
        "state_dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where configs, secrets, pids, logs and data live [default: MESHJOBS_HOME/mesh/<mesh name>].",
    )(func)


def _state(topology: Topology, state_dir: Path | None) -> Path:
    return state_dir or home() / "mesh" / topology.mesh.name


@click.group()
def broker() -> None:
    """Broker configuration: render configs, admit peers."""


@broker.command("config")
@topology_option
@click.option("--node", required=True, help="The hub node or community to render.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="JetStream data directory as the server will see it.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write <OUT>/<node>.conf and the secrets it includes, instead of printing the config.")  # fmt: skip
@guarded
def broker_config(topology_path: Path, node: str, data_dir: Path, out: Path | None) -> None:
    """Render one server's nats-server config from the topology."""
    from meshjobs.infra.credentials import ensure_credentials
    from meshjobs.infra.natsconf import node_config

    topology = load_topology(topology_path)
    text = node_config(topology, node, data_dir)
    if out is None:
        click.echo(text, nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    ensure_credentials(topology, out)
    (out / f"{node}.conf").write_text(text)
    click.echo(f"wrote {out / (node + '.conf')} (secrets in {out / 'secrets'})")


#: ``--role`` of add-peer: the topology list each role is kept in.
ROLE_LISTS = {
    "peer": "peers",
    "worker": "workers",
    "submitter": "submitters",
    "operator": "operators",
    "trust-service": "trust_services",
}
HUB_ONLY_ROLES = ("operator", "trust-service")


def add_peer_to_file(path: Path, key: str, community: str | None, role: str = "peer") -> bool:
    """Admit *key* with *role* in the topology file, keeping its comments; False if it was already there."""
    try:
        decode_public(key)
    except ValueError as exc:
        raise UsageError(f"{key[:16]!r} is not a peer key: {exc}") from None
    if community is not None and role in HUB_ONLY_ROLES:
        raise UsageError(f"a {role} connects to hub nodes only: admit it without --community")
    listed = ROLE_LISTS[role]
    document = tomlkit.parse(path.read_text())
    if community is None:
        peers = document["mesh"].setdefault(listed, tomlkit.array())
    else:
        tables = [c for c in document.get("community", []) if c.get("name") == community]
        if not tables:
            load_topology(path).community_named(community)  # raises with the known names
        peers = tables[0].setdefault(listed, tomlkit.array())
    if key in peers:
        return False
    peers.append(key)
    text = tomlkit.dumps(document)
    parse_topology(text, path)  # never write a file that does not load
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


@broker.command("add-peer")
@topology_option
@click.option("--community", help="Admit on this community's leaf [default: on every hub node].")
@click.option("--role", type=click.Choice(list(ROLE_LISTS)), default="peer", show_default=True,
              help="peer: worker and submitter; operator, trust-service: hub only (README: Roles).")  # fmt: skip
@click.argument("key")
@state_option
@guarded
def add_peer(topology_path: Path, community: str | None, role: str, key: str, state_dir: Path | None) -> None:
    """Admit a key (what `meshjobs id` prints) to a community or the hub, with a role.

    Edits the topology file in place (comments are kept); a local mesh started
    with `meshjobs mesh up` reloads its configs at once.
    """
    from meshjobs.infra.mesh import LocalMesh

    added = add_peer_to_file(topology_path, key, community, role)
    where = f"community {community}" if community else "every hub node"
    click.echo(f"{'admitted' if added else 'already admitted'}: {key} as {role} on {where}")
    topology = load_topology(topology_path)
    reloaded = LocalMesh(topology, _state(topology, state_dir)).reload()
    if reloaded:
        click.echo(f"reloaded {', '.join(reloaded)}")


@click.group()
def mesh() -> None:
    """A whole topology on this machine: up, down, status, compose."""


@mesh.command("up")
@topology_option
@state_option
@click.option(
    "--timeout",
    type=Seconds(max=DAY_S, positive=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for a healthy mesh.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the health report as JSON.")
@guarded
def mesh_up(topology_path: Path, state_dir: Path | None, timeout: float, as_json: bool) -> None:
    """Start every server of the topology as a local process and wait until all links are up."""
    import time

    from meshjobs.infra.mesh import LocalMesh

    topology = load_topology(topology_path)
    local = LocalMesh(topology, _state(topology, state_dir))
    started = time.monotonic()
    health = local.up(timeout)
    _show(health, as_json)
    if not as_json:
        click.echo(
            f"mesh {topology.mesh.name!r} healthy in {time.monotonic() - started:.1f} s; state in {local.state_dir}"
        )
    _provision(topology, as_json)


def _provision(topology: Topology, quiet: bool) -> None:
    """Place mesh state as the topology says, when this peer's key may do it."""
    import asyncio

    from meshjobs.catalog import MESH_STATE
    from meshjobs.cli._common import identity_for_use
    from meshjobs.infra.mesh import provision

    identity = identity_for_use()
    region = topology.state_region.name
    if identity.public_key not in topology.mesh.operators:
        if not quiet:
            click.echo(
                "mesh state not provisioned: only an operator may create it; admit this key as one "
                "(meshjobs broker add-peer --topology FILE --role operator KEY, with KEY from `meshjobs id`) "
                f"and run mesh up again to place it in {region} with {topology.mesh.state_replicas} replicas"
            )
        return
    created = asyncio.run(provision(topology, identity, MESH_STATE))
    if not quiet:
        click.echo(f"mesh state in region {region}, {topology.mesh.state_replicas} replicas: {', '.join(created)}")


@mesh.command("down")
@topology_option
@state_option
@guarded
def mesh_down(topology_path: Path, state_dir: Path | None) -> None:
    """Stop every server of the topology (by PID)."""
    from meshjobs.infra.mesh import LocalMesh

    topology = load_topology(topology_path)
    stopped = LocalMesh(topology, _state(topology, state_dir)).down()
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@mesh.command("status")
@topology_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@guarded
def mesh_status(topology_path: Path, as_json: bool) -> None:
    """Health from every server's monitoring endpoint. Exits 1 when something is wrong."""
    from meshjobs.infra.mesh import check_health

    health = check_health(load_topology(topology_path))
    _show(health, as_json)
    if not health.healthy:
        raise SystemExit(1)


def _show(health: object, as_json: bool) -> None:
    from meshjobs.cli._render import mesh_table
    from meshjobs.infra.mesh import MeshHealth

    assert isinstance(health, MeshHealth)
    if as_json:
        click.echo(json.dumps(health.as_dict(), indent=2))
    else:
        mesh_table(health)


@mesh.command("compose")
@topology_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Directory for docker-compose.yml and brokers/.")  # fmt: skip
@guarded
def mesh_compose(topology_path: Path, out: Path) -> None:
    """Write docker-compose.yml and brokers/ (configs, secrets, image recipe) for the topology."""
    from meshjobs.infra.compose import CONTAINER_DATA, DOCKERFILE, render_compose
    from meshjobs.infra.credentials import ensure_credentials
    from meshjobs.infra.natsconf import node_config

    topology = load_topology(topology_path)
    brokers = out / "brokers"
    brokers.mkdir(parents=True, exist_ok=True)
    for name in topology.server_names():
        (brokers / f"{name}.conf").write_text(node_config(topology, name, Path(CONTAINER_DATA)))
    (brokers / "Dockerfile").write_text(DOCKERFILE)
    ensure_credentials(topology, brokers)
    (out / "docker-compose.yml").write_text(render_compose(topology, str(topology_path)))
    click.echo(f"wrote {out / 'docker-compose.yml'} and {brokers}/ ({len(topology.server_names())} servers)")
