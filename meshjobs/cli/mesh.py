"""Operator commands: ``meshjobs broker ...`` and ``meshjobs mesh ...``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import tomlkit

from meshjobs._files import write_replacing
from meshjobs.cli._common import DAY_S, F, Seconds, guarded, home
from meshjobs.errors import UsageError
from meshjobs.identity import decode_public
from meshjobs.infra.topology import Topology, load_topology, parse_topology

if TYPE_CHECKING:
    from meshjobs.infra.mesh import LocalMesh

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
    write_replacing(path, text)
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
    """A whole topology: up, down, status and provision as local processes; compose, secrets, images for Docker."""


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

    from meshjobs.cli._render import status
    from meshjobs.infra.mesh import LocalMesh

    topology = load_topology(topology_path)
    local = LocalMesh(topology, _state(topology, state_dir))
    started = time.monotonic()
    with status(f"mesh {topology.mesh.name} up") as update:  # a spinner with the current step, on a terminal
        health = local.up(timeout, progress=update)
    _show(health, as_json)
    if not as_json:
        click.echo(
            f"mesh {topology.mesh.name!r} healthy in {time.monotonic() - started:.1f} s; state in {local.state_dir}"
        )
    _provision(topology, as_json)
    _start_trust_service(local, as_json)


def _start_trust_service(local: LocalMesh, quiet: bool) -> None:
    """Run the trust service on the hub when this peer's key is one the topology lists for it."""

    from meshjobs.cli._common import identity_for_use

    identity = identity_for_use()
    if identity.public_key not in local.topology.mesh.trust_services:
        if not quiet:
            click.echo(
                "trust service not started: this key is not listed under trust_services; admit it "
                "(meshjobs broker add-peer --topology FILE --role trust-service KEY) and run mesh up again, or run "
                "`meshjobs trust serve` where that key lives"
            )
        return
    service = local.start_trust_service(env=dict(os.environ, MESHJOBS_HOME=str(home())))
    if not quiet:
        what = "started" if service is not None else "already running"
        click.echo(f"trust service {what} as {identity.public_key} (log {local.trust_service().log_path})")


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
@click.option("--wait", type=Seconds(max=DAY_S), default=0.0, metavar="SECONDS",
              help="Ask again until the mesh is healthy, for up to this long (servers still starting).")  # fmt: skip
@guarded
def mesh_status(topology_path: Path, as_json: bool, wait: float) -> None:
    """Health from every server's monitoring endpoint. Exits 1 when something is wrong."""
    import time

    from meshjobs.infra.mesh import check_health

    topology = load_topology(topology_path)
    deadline = time.monotonic() + wait
    health = check_health(topology)
    while not health.healthy and time.monotonic() < deadline:
        time.sleep(0.5)
        health = check_health(topology)
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


OUT_HELP = "The compose directory [default: ./meshjobs-compose, a new directory]."


def out_option(func: F) -> F:
    from meshjobs.infra.compose import DEFAULT_OUT

    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
                        help=OUT_HELP)(func)  # fmt: skip


@mesh.command("compose")
@topology_option
@out_option
@click.option("--force", is_flag=True, help="Overwrite files already in --out (a previous rendering).")
@guarded
def mesh_compose(topology_path: Path, out: Path, force: bool) -> None:
    """Write docker-compose.yml and brokers/ (configs, image recipes) for the topology into --out.

    The services: every server, the trust service and one demo worker per
    community. Never writes over existing files without --force. Secrets come
    from `meshjobs mesh secrets`, images from `meshjobs mesh images` (README: Docker).
    """
    from meshjobs.infra.compose import missing_secrets, service_homes, write_compose

    topology = load_topology(topology_path)
    write_compose(topology, str(topology_path), out, force=force)
    click.echo(
        f"wrote {out / 'docker-compose.yml'} and {out / 'brokers'}/: {len(topology.server_names())} servers, "
        f"{len(service_homes(topology)) - 1} demo workers, the trust service"
    )
    if missing_secrets(topology, out):
        click.echo(
            f"next: meshjobs mesh secrets --topology {topology_path} --out {out}; it admits the services' keys, "
            "so render again after it, with --force"
        )


@mesh.command("secrets")
@topology_option
@out_option
@click.option("--trust", "trusted", multiple=True, metavar="KEY",
              help="A submitter the demo workers run commands for (repeatable) [default: `meshjobs id`].")  # fmt: skip
@guarded
def mesh_secrets(topology_path: Path, out: Path, trusted: tuple[str, ...]) -> None:
    """Generate the secrets of a compose deployment in --out, and admit its services in the topology.

    Broker credentials (brokers/secrets/), an identity per service (secrets/<service>/,
    0700, files 0600) with a trust file, and .env (the user the containers run
    as). Existing secrets are kept. The workers' keys are admitted as workers on
    their community and the trust service's as trust-service, in the topology
    file (comments are kept): render the compose files after this. Never commit
    what this writes.
    """
    from meshjobs.cli._common import identity_for_use
    from meshjobs.infra.compose import COMPOSE_FILE, ensure_secrets, service_homes

    for key in trusted:
        try:
            decode_public(key)
        except ValueError as exc:
            raise UsageError(f"--trust {key[:16]!r} is not a peer key: {exc}") from None
    keys = list(trusted) or [identity_for_use().public_key]
    topology = load_topology(topology_path)
    made = ensure_secrets(topology, out, keys)
    changed = False
    for service, community in service_homes(topology).items():
        role = "worker" if community else "trust-service"
        added = add_peer_to_file(topology_path, made.keys[service], community, role)
        changed |= added
        where = f"community {community}" if community else "the hub"
        click.echo(
            f"{service}: {made.keys[service]} {'admitted' if added else 'already admitted'} as {role} on {where}"
        )
    click.echo(f"secrets in {out / 'secrets'} and {out / 'brokers' / 'secrets'}; containers run as uid {made.uid} "
               f"({out / '.env'}); the workers trust {', '.join(k[:12] + '…' for k in keys)}")  # fmt: skip
    if changed and (out / COMPOSE_FILE).exists():
        click.echo(f"the topology changed: render again with meshjobs mesh compose --topology {topology_path} "
                   f"--out {out} --force")  # fmt: skip


@mesh.command("images")
@click.option("--base", default=None, metavar="IMAGE",
              help="Base of the worker image (build argument BASE) [default: python:3.11-slim].")  # fmt: skip
@click.option("--source", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The meshjobs source tree to build wheels from [default: this checkout].")  # fmt: skip
@guarded
def mesh_images(base: str | None, source: Path | None) -> None:
    """Build the broker and worker images, offline: no registry needed but for --base.

    The broker image is FROM scratch with this meshjobs' nats-server; the worker
    image installs wheels built here into a virtual environment on --base
    (scripts/build-python-base makes one without a registry).
    """
    from meshjobs.infra.images import DEFAULT_BASE, build_images

    tags = build_images(base=base or DEFAULT_BASE, source=source, log=lambda line: click.echo(line, err=True))
    click.echo(" ".join(tags))


@mesh.command("provision")
@topology_option
@guarded
def mesh_provision(topology_path: Path) -> None:
    """Create the mesh state (buckets, streams) in the topology's state region; this key must be an operator.

    `mesh up` does it for a local mesh; run it once after `docker-compose up`.
    """
    topology = load_topology(topology_path)
    from meshjobs.cli._common import identity_for_use

    if identity_for_use().public_key not in topology.mesh.operators:
        raise UsageError(
            "only an operator may create mesh state: admit this key with "
            f'meshjobs broker add-peer --topology {topology_path} --role operator "$(meshjobs id)"'
        )
    _provision(topology, False)


@mesh.command("attest")
@topology_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the attestations, one <KEY>.attestation per community peer.")  # fmt: skip
@click.option("--valid-for", type=Seconds(max=10 * 365 * DAY_S, positive=True), default=365 * DAY_S,
              show_default=True, help="Seconds until the attestations expire.")  # fmt: skip
@guarded
def mesh_attest(topology_path: Path, out: Path, valid_for: float) -> None:
    """As an operator, attest every community peer's region and community, as the topology admits them.

    Each worker then runs with `--attestation OUT/<its key>.attestation`; submitters
    that list you under [[operator]] route `--region` to it. Re-run to renew.
    """
    from meshjobs.cli._common import identity_for_use
    from meshjobs.manifest import attest

    topology = load_topology(topology_path)
    identity = identity_for_use()
    if identity.public_key not in topology.mesh.operators:
        click.echo(f"meshjobs: warning: {identity.public_key[:12]}… is not among the topology's operators; "
                   "submitters must list it under [[operator]] for these to count", err=True)  # fmt: skip
    admitted = [(key, c) for c in topology.community for key in dict.fromkeys([*c.peers, *c.workers])]
    if not admitted:
        raise UsageError("the topology admits no peers on any community: nothing to attest")
    out.mkdir(parents=True, exist_ok=True)
    for key, community in admitted:
        frame = attest(identity, key, region=community.region, community=community.name, valid_for_s=valid_for)
        target = out / f"{key}.attestation"
        write_replacing(target, frame + b"\n")
        click.echo(f"{key}: region {community.region}, community {community.name} -> {target}")
