"""A deployment's secrets: route and gateway passwords and community leaf keys.

Kept in ``<dir>/secrets/`` (mode 0700, files 0600), next to the rendered
configs that include them. ``credentials.toml`` is the source; the small
``.conf`` files nats-server includes are derived from it and the topology, so
they follow topology changes (new nodes, new communities) while passwords and
keys stay the same. Nothing here is ever printed or logged.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

from meshjobs._files import write_private
from meshjobs.errors import UsageError
from meshjobs.identity import Identity
from meshjobs.infra.natsconf import SECRETS_DIR, leaf_key_var
from meshjobs.infra.topology import Topology

SOURCE = "credentials.toml"


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def ensure_credentials(topology: Topology, base: Path) -> Path:
    """Create missing secrets under *base*/secrets and (re)write the included files.

    Returns the secrets directory. Existing passwords and leaf seeds are kept.
    """
    folder = base / SECRETS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    source = folder / SOURCE
    data = _load(source)
    changed = False
    for name in ("route_password", "gateway_password"):
        if not isinstance(data.get(name), str):
            data[name] = secrets.token_urlsafe(24)
            changed = True
    leaves = data.setdefault("leaf_seeds", {})
    for community in topology.community:
        if community.name not in leaves:
            leaves[community.name] = Identity.generate().seed_text()
            changed = True
    if changed or not source.exists():
        lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if isinstance(v, str)]
        lines += ["", "[leaf_seeds]"] + [f"{k} = {json.dumps(v)}" for k, v in sorted(leaves.items())]
        write_private(source, "\n".join(lines) + "\n")
    _derive(topology, folder, data)
    return folder


def _derive(topology: Topology, folder: Path, data: dict[str, Any]) -> None:
    host = topology.mesh.host
    route_pw, gateway_pw = data["route_password"], data["gateway_password"]
    for region in topology.region:
        routes = [f"nats-route://route:{route_pw}@{host}:{n.cluster_port}" for n in region.nodes]
        text = f'authorization {{ user: "route", password: {json.dumps(route_pw)} }}\nroutes: {json.dumps(routes)}\n'
        write_private(folder / f"routes-{region.name}.conf", text)
    gateways = [
        {"name": r.name, "urls": [f"nats://gateway:{gateway_pw}@{host}:{n.gateway_port}" for n in r.nodes]}
        for r in topology.region
    ]
    write_private(
        folder / "gateways.conf",
        f'authorization {{ user: "gateway", password: {json.dumps(gateway_pw)} }}\ngateways: {json.dumps(gateways)}\n',
    )
    keys = []
    for community in topology.community:
        seed = data["leaf_seeds"][community.name]
        write_private(folder / f"leaf-{community.name}.conf", f"nkey: {json.dumps(seed)}\n")
        keys.append(f"{leaf_key_var(community.name)}: {json.dumps(Identity.from_seed_text(seed).public_key)}")
    if keys:
        write_private(folder / "leaf-keys.conf", "\n".join(keys) + "\n")
