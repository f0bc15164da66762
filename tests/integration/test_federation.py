"""The example topology booted for real: two regions of three hub nodes, one community leaf each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import tomlkit

from meshjobs import Client, ConnectError
from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.errors import KeyExists
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.mesh import LocalMesh, provision
from meshjobs.infra.topology import Topology, load_topology
from meshjobs.state import open_bucket
from tests.closed_mesh import free_ports
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs

pytestmark = pytest.mark.integration


@dataclass
class Fed:
    topology: Topology
    topology_path: Path
    mesh: LocalMesh
    ids: dict[str, Identity]
    homes: dict[str, Path]
    root: Path

    def url(self, server: str) -> str:
        return self.topology.client_url(server)


def federation_topology(tmp_path: Path, ids: dict[str, Identity]) -> tuple[Topology, Path]:
    """The example topology with free ports and test peers admitted."""
    example = load_topology(REPO / "config" / "topology.toml").with_ports(free_ports(40))
    data = example.model_dump()
    data["mesh"]["peers"] = [ids["op"].public_key]
    data["mesh"]["operators"] = [ids["op"].public_key]  # provisions mesh state: peers may not
    data["community"][0]["peers"] = [ids["lab-worker"].public_key, ids["lab-user"].public_key]
    data["community"][1]["peers"] = [ids["garage-worker"].public_key]
    topology = Topology.model_validate(data)
    path = tmp_path / "topology.json"
    path.write_text(topology.model_dump_json())
    return topology, path


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    root = tmp_path_factory.mktemp("federation")
    ids = {name: Identity.generate() for name in ("op", "lab-worker", "lab-user", "garage-worker")}
    homes = {}
    trust = "".join(f'[[peer]]\nkey = "{ids[n].public_key}"\n' for n in ("op", "lab-user"))
    for name, identity in ids.items():
        homes[name] = root / name
        save_identity(identity, homes[name] / IDENTITY_FILE)
        (homes[name] / "trust.toml").write_text(trust)
    topology, path = federation_topology(root, ids)
    mesh = LocalMesh(topology, root / "state", detach=False)
    mesh.up(timeout=90)
    try:
        asyncio.run(provision(topology, ids["op"], MESH_STATE))
        yield Fed(topology, path, mesh, ids, homes, root)
    finally:
        for server in mesh.started.values():
            server.stop()


def start_worker(
    fed: Fed, who: str, server: str, region: str, community: str, attestation: Path | None = None
) -> WorkerProcess:
    log = fed.root / f"{who}-{server}-{len(list(fed.root.glob(f'{who}-{server}-*.log')))}.log"
    args = ("--region", region, "--community", community)
    args += ("--attestation", str(attestation)) if attestation else ()
    return WorkerProcess.launch("workers.demo:app", fed.homes[who], fed.url(server), log, *args)


async def wait_for_peers(client: Client, peers: set[str], timeout: float = 30) -> list[dict[str, str]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [p.as_dict() for p in await client.peers(timeout=1.0)]
        if peers <= {p["peer"] for p in found} or loop.time() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_work_stays_in_the_community_then_crosses_regions(fed: Fed) -> None:
    lab = start_worker(fed, "lab-worker", "lab", "eu", "lab")
    garage = start_worker(fed, "garage-worker", "garage", "us", "garage")
    lab_key, garage_key = fed.ids["lab-worker"].public_key, fed.ids["garage-worker"].public_key
    try:
        async with await Client.connect(fed.url("lab"), fed.ids["lab-user"], liveness=1.0) as client:
            await wait_for_peers(client, {lab_key, garage_key})
            local = await asyncio.gather(*(client.submit("demo.add", {"a": i, "b": 1}) for i in range(30)))
            assert {o.worker for o in local} == {lab_key}
            lab.kill()  # SIGKILL by PID: the community has no worker left
            remote = [await client.submit("demo.add", {"a": i, "b": 2}, timeout=20) for i in range(10)]
            assert {o.worker for o in remote} == {garage_key}
            assert [o.value for o in remote] == [i + 2 for i in range(10)]
    finally:
        lab.kill()
        garage.terminate()


async def test_discovery_from_any_node_lists_every_region_and_community(fed: Fed) -> None:
    lab = start_worker(fed, "lab-worker", "lab", "eu", "lab")
    garage = start_worker(fed, "garage-worker", "garage", "us", "garage")
    expected = {fed.ids["lab-worker"].public_key: ("eu", "lab"), fed.ids["garage-worker"].public_key: ("us", "garage")}
    try:
        for server, who in [("eu-1", "op"), ("us-3", "op"), ("lab", "lab-user"), ("garage", "garage-worker")]:
            async with await Client.connect(fed.url(server), fed.ids[who]) as client:
                found = await wait_for_peers(client, set(expected))
            seen = {p["peer"]: (p["region"], p["community"]) for p in found}
            assert {k: seen.get(k) for k in expected} == expected, (server, found)
        out = meshjobs("peers", "--json", env=cli_env(fed.homes["op"], fed.url("us-2")))
        assert out.returncode == 0, out.stderr
        rows = {p["peer"]: p for p in json.loads(out.stdout)}
        assert rows[fed.ids["garage-worker"].public_key]["community"] == "garage"
    finally:
        lab.terminate()
        garage.terminate()


async def test_kv_read_and_write_from_a_leaf(fed: Fed) -> None:
    leaf = await connect(fed.url("garage"), fed.ids["garage-worker"])
    hub = await connect(fed.url("eu-2"), fed.ids["op"])
    try:
        # A bucket peers may read whole and write (approval requests), provisioned by the operator.
        state = fed.topology.state_region.name
        kv = await open_bucket(leaf, "approvals", create=False)
        first = await kv.put("leaftest-alpha", b"1")
        assert (await kv.get("leaftest-alpha")).value == b"1"  # type: ignore[union-attr]
        second = await kv.update("leaftest-alpha", b"2", last=first)
        with pytest.raises(KeyExists):
            await kv.update("leaftest-alpha", b"3", last=first)  # a stale compare-and-set loses
        with pytest.raises(KeyExists):
            await kv.create("leaftest-alpha", b"4")
        from_hub = await open_bucket(hub, "approvals", create=False)
        entry = await from_hub.get("leaftest-alpha")
        assert entry is not None and entry.value == b"2" and entry.revision == second
        info = await hub.jetstream(domain="hub").stream_info("KV_approvals")
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.name == state
    finally:
        await leaf.close()
        await hub.close()


async def test_anonymous_unknown_and_foreign_subscriptions_are_refused(fed: Fed) -> None:
    for server in ("eu-1", "lab"):
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await nats.connect(fed.url(server), allow_reconnect=False, connect_timeout=2)
        with pytest.raises(ConnectError, match="refused this peer's key"):
            await connect(fed.url(server), Identity.generate())
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    garage_key = fed.ids["garage-worker"].public_key
    lab = await nats.connect(
        fed.url("lab"), nkeys_seed_str=fed.ids["lab-user"].seed_text(), error_cb=on_error,
        inbox_prefix=f"_INBOX.{fed.ids['lab-user'].public_key}",
    )  # fmt: skip
    hub = await connect(fed.url("us-1"), fed.ids["op"])
    try:
        received: list[bytes] = []

        async def keep(msg: nats.aio.msg.Msg) -> None:
            received.append(msg.data)

        await lab.subscribe(f"mesh.peer.{garage_key}.cmd.demo.add", cb=keep)
        await lab.subscribe("_INBOX.someone-else.>", cb=keep)
        await lab.flush()
        await asyncio.sleep(0.5)
        for _ in range(5):
            await hub.publish(f"mesh.peer.{garage_key}.cmd.demo.add", b"secret")
            await hub.publish("_INBOX.someone-else.x", b"secret")
        await hub.flush()
        await asyncio.sleep(0.5)
        assert received == []
        assert sum("permissions violation" in str(e) for e in errors) == 2
    finally:
        await lab.close()
        await hub.close()


async def test_killing_a_hub_node_loses_no_acknowledged_write(fed: Fed) -> None:
    lab = start_worker(fed, "lab-worker", "lab", "eu", "lab")
    hub = await connect(fed.url("eu-1"), fed.ids["op"])
    try:
        state = fed.topology.state_region.name
        kv = await open_bucket(hub, "durable", replicas=3, placement=state)
        info = await hub.jetstream(domain="hub").stream_info("KV_durable")
        leader = info.cluster.leader if info.cluster else None
        victim_name = leader if leader and leader != "eu-1" else "eu-2"
        acked: dict[str, bytes] = {}

        async def writer() -> None:
            for i in range(400):
                key, value = f"k{i}", str(i).encode()
                await kv.put(key, value)  # retries 503 and timeouts itself, within 30 s
                acked[key] = value

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.3)
        fed.mesh.started[victim_name].kill()  # SIGKILL by PID
        await asyncio.wait_for(task, 120)
        assert len(acked) == 400
        for key, value in acked.items():
            entry = await kv.get(key)
            assert entry is not None and entry.value == value, key
        async with await Client.connect(fed.url("lab"), fed.ids["lab-user"]) as client:
            await wait_for_peers(client, {fed.ids["lab-worker"].public_key})
            outcome = await client.submit("demo.add", {"a": 20, "b": 22}, timeout=20)
            assert outcome.value == 42
    finally:
        await hub.close()
        lab.terminate()
        victim = fed.mesh.started.get(victim_name)  # bring it back for later tests
        if victim is not None and victim.process is None:
            victim.start()
            fed.mesh.wait_healthy(60)


async def test_a_community_leaf_credential_carries_only_its_own_peers_subjects(fed: Fed) -> None:
    """Even a leaf run by a hostile community operator (its own config, anyone may connect to it,
    the community's real leaf credential) receives nothing addressed to another community's peers."""
    from meshjobs.infra.broker import NatsServer
    from meshjobs.infra.natsconf import Include, render

    region = next(r for r in fed.topology.region if r.name == "eu")
    seed_file = fed.mesh.state_dir / "secrets" / "leaf-lab.conf"
    rogue_dir = fed.root / "rogue"
    rogue_dir.mkdir(exist_ok=True)
    (rogue_dir / "seed.conf").write_text(seed_file.read_text())
    config = {
        "server_name": "rogue",
        "listen": "127.0.0.1:-1",
        "leafnodes": {
            "remotes": [
                {
                    "urls": [f"nats-leaf://127.0.0.1:{n.leaf_port}" for n in region.nodes],
                    "seed": Include("seed.conf"),
                }
            ]
        },
    }
    rogue = NatsServer(render(config), rogue_dir, name="rogue").start()
    lab_key = fed.ids["lab-worker"].public_key
    garage_key = fed.ids["garage-worker"].public_key
    spy = await nats.connect(rogue.url)  # the rogue leaf lets anyone in
    hub = await connect(fed.url("eu-3"), fed.ids["op"])
    try:
        got: dict[str, list[bytes]] = {"own": [], "foreign": []}

        async def own(msg: nats.aio.msg.Msg) -> None:
            got["own"].append(msg.data)

        async def foreign(msg: nats.aio.msg.Msg) -> None:
            got["foreign"].append(msg.data)

        await spy.subscribe(f"mesh.peer.{lab_key}.cmd.x", cb=own)
        await spy.subscribe(f"mesh.peer.{garage_key}.cmd.x", cb=foreign)
        await spy.subscribe(f"_INBOX.{garage_key}.>", cb=foreign)
        await spy.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not got["own"] and loop.time() < deadline:  # until the leaf link carries interest
            await hub.publish(f"mesh.peer.{lab_key}.cmd.x", b"for lab")
            await hub.publish(f"mesh.peer.{garage_key}.cmd.x", b"for garage")
            await hub.publish(f"_INBOX.{garage_key}.reply", b"for garage")
            await hub.flush()
            await asyncio.sleep(0.2)
        assert got["own"], "the rogue leaf never connected (positive control)"
        assert got["foreign"] == []
    finally:
        await spy.close()
        await hub.close()
        rogue.stop()


async def test_routed_submission_across_the_federation(fed: Fed) -> None:
    """Trust routing works through leaves: an attested region picks the other region, evidence lands in the hub."""
    attestations = fed.root / "attestations"
    topology_toml = fed.root / "topology.toml"  # the operator's file, as `mesh attest` reads it
    topology_toml.write_text(tomlkit.dumps(fed.topology.model_dump(exclude_none=True)))
    made = meshjobs(
        "mesh", "attest", "--topology", str(topology_toml), "--out", str(attestations), env=cli_env(fed.homes["op"])
    )
    assert made.returncode == 0, made.stderr
    garage_key = fed.ids["garage-worker"].public_key
    lab = start_worker(fed, "lab-worker", "lab", "eu", "lab")
    garage = start_worker(fed, "garage-worker", "garage", "us", "garage", attestations / f"{garage_key}.attestation")
    user_home = fed.homes["lab-user"]
    trust = (user_home / "trust.toml").read_text()
    (user_home / "trust.toml").write_text(trust + f'[[operator]]\nkey = "{fed.ids["op"].public_key}"\n')
    try:
        async with await Client.connect(fed.url("lab"), fed.ids["lab-user"]) as client:
            await wait_for_peers(client, {fed.ids["lab-worker"].public_key, garage_key})
        env = cli_env(user_home, fed.url("lab"))
        out = await asyncio.to_thread(
            meshjobs, "submit", "demo.add", '{"a": 1, "b": 2}', "--region", "us", "--trace", env=env
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "3\n"
        assert f"trace: {fed.ids['garage-worker'].public_key[:12]}… success" in out.stderr
        shown = await asyncio.to_thread(
            meshjobs, "reputation", fed.ids["garage-worker"].public_key, "--evidence", "--json",
            env=cli_env(fed.homes["op"], fed.url("us-2")),
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        # The record itself is folded by the trust service, the only writer of
        # the reputation bucket (not run here); the evidence is the submitter's.
        assert any(e["valid"] and e["submitter"] == fed.ids["lab-user"].public_key for e in report["evidence"]), report
    finally:
        (user_home / "trust.toml").write_text(trust)
        lab.terminate()
        garage.terminate()
