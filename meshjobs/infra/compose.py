"""The topology as Docker Compose services: its brokers, the trust service, a demo worker per community.

``meshjobs mesh compose`` writes a directory (default ``./meshjobs-compose``)::

    docker-compose.yml        rendered by :func:`render_compose`
    brokers/<server>.conf     every server's config, as ``meshjobs broker config`` renders it
    brokers/Dockerfile        the image recipes (built by ``meshjobs mesh images``)
    brokers/worker.Dockerfile

and ``meshjobs mesh secrets`` adds what is never committed (:func:`ensure_secrets`)::

    brokers/secrets/          route and gateway passwords, leaf seeds (meshjobs.infra.credentials)
    secrets/<service>/        each service's MESHJOBS_HOME: identity.nk, trust.toml (0700, files 0600)
    .env                      MESHJOBS_UID / MESHJOBS_GID (the user the containers run as), the project name

Containers use host networking, so the addresses in the topology (loopback by
default) mean the same inside and outside them, and the rendered configs are
used unchanged. Every container runs as the owner of the secrets (a user of
its own, uid 10001, when they were made by root), reads them read-only, and
has a read-only root, no capabilities and no way to gain privileges. The
file has no top-level ``name:`` (docker-compose 1.29 refuses it) and no
``build:`` (the images come from ``meshjobs mesh images``), so it works with
``docker compose`` v2 and Debian's ``docker-compose`` 1.29 alike.
Rendering is pure: text out; the writers below do the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshjobs._files import write_private, write_replacing
from meshjobs.errors import IdentityError, UsageError
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.credentials import ensure_credentials
from meshjobs.infra.images import BROKER_DOCKERFILE, BROKER_IMAGE, SERVICE_UID, WORKER_DOCKERFILE, WORKER_IMAGE
from meshjobs.infra.natsconf import SECRETS_DIR, node_config
from meshjobs.infra.topology import Topology

CONTAINER_DATA = "/data"
CONTAINER_CONFIG = "/etc/meshjobs"
#: MESHJOBS_HOME inside the worker image (its service's secrets are mounted there, read-only).
CONTAINER_HOME = "/run/meshjobs"
COMPOSE_FILE = "docker-compose.yml"
BROKERS = "brokers"
ENV_FILE = ".env"
DEFAULT_OUT = Path("meshjobs-compose")
TRUST_SERVICE = "trust-service"
#: The trust file's name in a MESHJOBS_HOME (meshjobs.trust.policy.TRUST_FILE; infra imports no job module).
TRUST_FILE = "trust.toml"
DEMO_APP = "workers.demo:app"
#: Seconds compose waits after SIGTERM: a worker's default drain timeout (30 s) and some.
WORKER_STOP_GRACE = "40s"
_USER = f"${{MESHJOBS_UID:-{SERVICE_UID}}}:${{MESHJOBS_GID:-{SERVICE_UID}}}"


def _q(value: str) -> str:
    # A JSON string is a valid YAML scalar; "$" is doubled so compose does not interpolate it.
    return json.dumps(value).replace("$", "$$")


def worker_service(community: str) -> str:
    """The compose service of a community's demo worker."""
    return f"worker-{community}"


def service_homes(topology: Topology) -> dict[str, str | None]:
    """Services that run as a peer, with the community each is admitted on (None: the hub)."""
    homes: dict[str, str | None] = {worker_service(c.name): c.name for c in topology.community}
    homes[TRUST_SERVICE] = None
    return homes


def service_names(topology: Topology) -> list[str]:
    """Every compose service: the servers, then the trust service and the workers."""
    names = [*topology.server_names(), *service_homes(topology)]
    taken = set(topology.server_names())
    for name in service_homes(topology):
        if name in taken:
            raise UsageError(f"a server of the topology is called {name!r}, the name of a compose service: rename it")
    return names


#: Every container: a non-root user (the owner of the secrets), a read-only root, no capabilities, no setuid.
def _hardened() -> list[str]:
    return [
        "    network_mode: host",
        f'    user: "{_USER}"',
        "    read_only: true",
        '    cap_drop: ["ALL"]',
        '    security_opt: ["no-new-privileges:true"]',
        "    restart: unless-stopped",
    ]


def _broker(name: str) -> list[str]:
    return [
        f"  {name}:",
        f"    image: {_q(BROKER_IMAGE)}",
        f'    command: ["-c", {_q(f"{CONTAINER_CONFIG}/{name}.conf")}]',
        *_hardened(),
        "    volumes:",
        f"      - {_q(f'./{BROKERS}:{CONTAINER_CONFIG}:ro')}",
        f"      - {_q(f'{name}-data:{CONTAINER_DATA}')}",
    ]


def _peer(name: str, command: list[str], depends_on: Iterable[str]) -> list[str]:
    return [
        f"  {name}:",
        f"    image: {_q(WORKER_IMAGE)}",
        f"    command: [{', '.join(_q(part) for part in command)}]",
        *_hardened(),
        '    tmpfs: ["/tmp"]',
        "    environment:",
        f"      MESHJOBS_HOME: {_q(CONTAINER_HOME)}",
        f"    stop_grace_period: {WORKER_STOP_GRACE}",
        f"    depends_on: [{', '.join(_q(d) for d in depends_on)}]",
        "    volumes:",
        f"      - {_q(f'./{SECRETS_DIR}/{name}:{CONTAINER_HOME}:ro')}",
    ]


def render_compose(topology: Topology, source: str) -> str:
    """The compose file for *topology*; *source* names the topology file in the header."""
    service_names(topology)  # refuses a clash of names
    lines = [
        f"# generated by `meshjobs mesh compose` from {source}; edit the topology, not this file.",
        "# Images: `meshjobs mesh images`; secrets (never committed): `meshjobs mesh secrets`. README: Docker.",
        "services:",
    ]
    for name in topology.server_names():
        lines += _broker(name)
    state = topology.state_region.nodes
    hubs = ",".join(topology.client_url(n.name) for n in state)
    lines += _peer(TRUST_SERVICE, ["trust", "serve", "--server", hubs], [n.name for n in state])
    for community in topology.community:
        command = ["worker", DEMO_APP, "--name", f"demo-{community.name}", "--region", community.region,
                   "--community", community.name, "--server", topology.client_url(community.name)]  # fmt: skip
        lines += _peer(worker_service(community.name), command, [community.name])
    lines.append("volumes:")
    lines += [f"  {name}-data: {{}}" for name in topology.server_names()]
    return "\n".join(lines) + "\n"


def compose_files(topology: Topology, source: str) -> dict[str, str]:
    """Every file ``meshjobs mesh compose`` writes, by path relative to its output directory."""
    files = {COMPOSE_FILE: render_compose(topology, source)}
    for name in topology.server_names():
        files[f"{BROKERS}/{name}.conf"] = node_config(topology, name, Path(CONTAINER_DATA))
    files[f"{BROKERS}/Dockerfile"] = BROKER_DOCKERFILE
    files[f"{BROKERS}/worker.Dockerfile"] = WORKER_DOCKERFILE
    return files


def write_compose(topology: Topology, source: str, out: Path, *, force: bool = False) -> list[Path]:
    """Write :func:`compose_files` under *out*; refuses to replace any file unless *force*."""
    files = compose_files(topology, source)
    existing = [rel for rel in files if (out / rel).exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UsageError(f"{out} already has {shown}: choose another --out, or pass --force to overwrite")
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, text)
        written.append(path)
    return written


# -- secrets ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSecrets:
    """What :func:`ensure_secrets` made or found: each service's key, and whom the containers run as."""

    keys: dict[str, str]
    uid: int
    gid: int


def _service_identity(path: Path) -> Identity:
    """The service's key, made on first use. Read directly: after a hand-over to the service
    user the file is not ours, so :func:`meshjobs.identity.load_identity` would refuse it."""
    if not os.path.lexists(path):
        identity = Identity.generate()
        save_identity(identity, path)
        return identity
    if path.is_symlink() or not path.is_file():
        raise IdentityError(f"{path} is not a regular file")
    return Identity.from_seed_text(path.read_text(encoding="ascii", errors="replace"))


def trust_text(trusted: Sequence[str], operators: Sequence[str], trust_services: Sequence[str]) -> str:
    """The trust file of the containerised peers: the submitters they serve, operators, trust services."""
    lines = ["# generated by `meshjobs mesh secrets`: whom this container's peer runs commands for, whose",
             "# quarantine orders and reputation records count (README: Trust)"]  # fmt: skip
    for table, keys in (("peer", trusted), ("operator", operators), ("trust_service", trust_services)):
        for key in dict.fromkeys(keys):
            lines += ["", f"[[{table}]]", f"key = {json.dumps(key)}"]
    return "\n".join(lines) + "\n"


def _hand_over(paths: Iterable[Path], uid: int, gid: int) -> None:
    for top in paths:
        for root, _, names in os.walk(top):
            os.chown(root, uid, gid)
            for name in names:
                os.chown(Path(root) / name, uid, gid, follow_symlinks=False)


def ensure_secrets(topology: Topology, out: Path, trusted: Sequence[str]) -> ServiceSecrets:
    """Create what the compose deployment in *out* needs and nobody commits; keeps what exists.

    The brokers' credentials, one identity per service (its MESHJOBS_HOME,
    with a trust file listing *trusted* and the topology's operators, rewritten
    every time), and ``.env`` naming the user the containers run as: this
    user, or uid 10001 when this is root (the files are then handed to it).
    """
    ensure_credentials(topology, out / BROKERS)
    folder = out / SECRETS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    keys = {}
    for service in service_homes(topology):
        home = folder / service
        home.mkdir(mode=0o700, exist_ok=True)
        os.chmod(home, 0o700)
        keys[service] = _service_identity(home / IDENTITY_FILE).public_key
    trust = trust_text(trusted, topology.mesh.operators, [*topology.mesh.trust_services, keys[TRUST_SERVICE]])
    for service in service_homes(topology):
        write_private(folder / service / TRUST_FILE, trust)
    if os.geteuid() == 0:
        uid = gid = SERVICE_UID
        _hand_over([folder, out / BROKERS / SECRETS_DIR], uid, gid)
    else:
        uid, gid = os.getuid(), os.getgid()
    env = "# generated by `meshjobs mesh secrets`: the user the containers run as (owner of the secrets)\n"
    env += f"MESHJOBS_UID={uid}\nMESHJOBS_GID={gid}\nCOMPOSE_PROJECT_NAME=meshjobs-{topology.mesh.name}\n"
    (out / ENV_FILE).write_text(env)
    return ServiceSecrets(keys, uid, gid)


def missing_secrets(topology: Topology, out: Path) -> list[str]:
    """What :func:`ensure_secrets` would still have to make in *out* (relative paths)."""
    wanted = [f"{BROKERS}/{SECRETS_DIR}/credentials.toml", ENV_FILE]
    wanted += [f"{SECRETS_DIR}/{service}/{IDENTITY_FILE}" for service in service_homes(topology)]
    return [rel for rel in wanted if not os.path.lexists(out / rel)]
