"""Operator commands: rendering, admitting peers, a local mesh up / status / down, compose."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest

from meshjobs import ConnectError
from meshjobs._nats import connect
from meshjobs.errors import UsageError
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import find_nats_server, is_our_server
from meshjobs.infra.compose import CONTAINER_DATA, render_compose
from meshjobs.infra.natsconf import node_config
from meshjobs.infra.topology import load_topology, parse_topology
from tests.closed_mesh import free_ports
from tests.conftest import REPO, cli_env, meshjobs

EXAMPLE = REPO / "config" / "topology.toml"


def test_committed_brokers_and_compose_are_current() -> None:
    """brokers/*.conf and docker-compose.yml are the rendering of config/topology.toml."""
    topology = load_topology(EXAMPLE)
    for name in topology.server_names():
        committed = (REPO / "brokers" / f"{name}.conf").read_text()
        assert committed == node_config(topology, name, Path(CONTAINER_DATA)), f"brokers/{name}.conf is stale"
    assert (REPO / "docker-compose.yml").read_text() == render_compose(topology, "config/topology.toml")


def test_mesh_compose_writes_what_is_committed(tmp_path: Path) -> None:
    out = meshjobs("mesh", "compose", "--topology", "config/topology.toml", "--out", str(tmp_path),
                   env=cli_env(tmp_path / "h"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "docker-compose.yml").read_text() == (REPO / "docker-compose.yml").read_text()
    for conf in (REPO / "brokers").glob("*.conf"):
        assert (tmp_path / "brokers" / conf.name).read_text() == conf.read_text()
    for recipe in ("Dockerfile", "worker.Dockerfile"):
        assert (tmp_path / "brokers" / recipe).read_text() == (REPO / "brokers" / recipe).read_text()
    # Secrets come from `meshjobs mesh secrets` only (tests/integration/test_compose.py).
    assert not (tmp_path / "brokers" / "secrets").exists()


def test_rendered_configs_are_valid(tmp_path: Path) -> None:
    out = tmp_path / "cfg"
    for name in load_topology(EXAMPLE).server_names():
        done = meshjobs("broker", "config", "--topology", str(EXAMPLE), "--node", name, "--out", str(out),
                        env=cli_env(tmp_path / "h"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        check = subprocess.run([find_nats_server(), "-t", "-c", out / f"{name}.conf"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    secrets = out / "secrets"
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in secrets.iterdir())
    printed = meshjobs("broker", "config", "--topology", str(EXAMPLE), "--node", "eu-1", env=cli_env(tmp_path / "h"))
    assert (out / "secrets" / "credentials.toml").read_text().split('"')[1] not in printed.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        (("client_port = 4302", "client_port = 4301"), "port 4301 is already used"),
        (('region = "eu"\nclient_port', 'region = "mars"\nclient_port'), "no region named 'mars'"),
        (("state_replicas = 3", "state_replicas = 4"), "mesh.state_replicas"),
        (('sync_interval = "2m"', 'sync_interval = "sometimes"'), "region[1].sync_interval"),
        (('name = "lab"', 'name = "Lab!"'), "community[0].name"),
        (("[mesh]", "[mesh]\ncolour = 'blue'"), "mesh.colour: unknown field"),
    ],
)
def test_topology_errors_name_the_key(change: tuple[str, str], message: str) -> None:
    text = EXAMPLE.read_text()
    assert change[0] in text
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_topology(text.replace(change[0], change[1], 1), Path("t.toml"))


def mini_topology(tmp_path: Path, peer: str) -> Path:
    ports = free_ports(20)
    node = (
        '{{ name = "{}", client_port = {}, cluster_port = {}, gateway_port = {}, leaf_port = {}, monitor_port = {} }}'
    )
    text = f"""
[mesh]
name = "mini"
state_replicas = 1
peers = ["{peer}"]
operators = ["{peer}"]

[[region]]
name = "north"
nodes = [{node.format("n-1", *[next(ports) for _ in range(5)])}]

[[region]]
name = "south"
nodes = [{node.format("s-1", *[next(ports) for _ in range(5)])}]

[[community]]
name = "club"   # a community
region = "south"
client_port = {next(ports)}
monitor_port = {next(ports)}
peers = []
"""
    path = tmp_path / "mini.toml"
    path.write_text(text)
    return path


def test_mesh_up_status_add_peer_down(tmp_path: Path) -> None:
    operator = Identity.generate()
    save_identity(operator, tmp_path / "home" / IDENTITY_FILE)  # the CLI runs as the admitted operator
    path = mini_topology(tmp_path, operator.public_key)
    env = cli_env(tmp_path / "home")
    state = tmp_path / "state"
    try:
        up = meshjobs("mesh", "up", "--topology", str(path), "--state", str(state), env=env, timeout=120)
        assert up.returncode == 0, up.stderr
        assert "healthy in" in up.stdout
        assert "mesh state in region north, 1 replicas" in up.stdout

        async def placed() -> tuple[str, str]:
            nc = await connect(load_topology(path).client_url("s-1"), operator)
            try:
                info = await nc.jetstream(domain="hub").stream_info("JOBS")
                kv = await nc.jetstream(domain="hub").stream_info("KV_reputation")
            finally:
                await nc.close()
            return (info.cluster.name if info.cluster else ""), (kv.cluster.name if kv.cluster else "")

        assert asyncio.run(placed()) == ("north", "north")
        status = meshjobs("mesh", "status", "--topology", str(path), "--json", env=env)
        assert status.returncode == 0, status.stdout
        report = json.loads(status.stdout)
        assert report["healthy"] and report["meta_leader"] in {"n-1", "s-1"}
        servers = {s["name"]: s for s in report["servers"]}
        assert servers["n-1"]["gateways"] == ["south"] and servers["club"]["leafnodes"] == 1

        newcomer = Identity.generate()
        club = load_topology(path).client_url("club")
        with pytest.raises(ConnectError):
            asyncio.run(connect(club, newcomer))
        added = meshjobs("broker", "add-peer", "--topology", str(path), "--community", "club", newcomer.public_key,
                         "--state", str(state), env=env)  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "reloaded" in added.stdout
        assert "# a community" in path.read_text()  # comments survive the edit

        async def admitted() -> None:
            for _ in range(50):
                try:
                    nc = await connect(club, newcomer)
                except ConnectError:
                    await asyncio.sleep(0.1)
                    continue
                await nc.close()
                return
            raise AssertionError("the admitted key was still refused")

        asyncio.run(admitted())
        pids = {p.stem: int(p.read_text()) for p in state.glob("*.pid")}
        assert sorted(pids) == ["club", "n-1", "s-1"]
    finally:
        down = meshjobs("mesh", "down", "--topology", str(path), "--state", str(state), env=env, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not any(is_our_server(pid, state / f"{name}.conf") for name, pid in pids.items())
    after = meshjobs("mesh", "status", "--topology", str(path), "--json", env=env)
    assert after.returncode == 1
    assert all("not running" in p for p in json.loads(after.stdout)["problems"])


def test_add_peer_refuses_bad_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(EXAMPLE.read_text())
    env = cli_env(tmp_path / "h")
    bad = meshjobs("broker", "add-peer", "--topology", str(path), "--community", "lab", "UNOTAKEY", env=env)
    assert bad.returncode == 2 and "not a peer key" in bad.stderr
    key = Identity.generate().public_key
    nowhere = meshjobs("broker", "add-peer", "--topology", str(path), "--community", "attic", key, env=env)
    assert nowhere.returncode == 2 and "no community named 'attic'" in nowhere.stderr
    assert path.read_text() == EXAMPLE.read_text()
