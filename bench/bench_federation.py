"""The example topology on this machine: how long it takes to come up, and what a
cross-region command costs next to a community-local one, in one run.

A submitter on the ``lab`` leaf (region eu) runs ``demo.noop`` first while the
lab community has a worker (local: leaf to leaf on one server), then after that
worker is stopped, when the same command is served by the ``garage`` worker on
the other region's leaf (leaf, hub eu, gateway, hub us, leaf).

    python bench/bench_federation.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import REPO, Child, demo_worker, drive_async, peer_home  # noqa: E402
from meshjobs import Client  # noqa: E402
from meshjobs.catalog import MESH_STATE  # noqa: E402
from meshjobs.identity import Identity  # noqa: E402
from meshjobs.infra.mesh import LocalMesh, provision  # noqa: E402
from meshjobs.infra.topology import Topology, load_topology  # noqa: E402


def ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    found = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return found


def topology(ids: dict[str, Identity]) -> Topology:
    data = load_topology(REPO / "config" / "topology.toml").with_ports(iter(ports(40))).model_dump()
    data["community"][0]["peers"] = [ids["lab-worker"].public_key, ids["lab-user"].public_key]
    data["community"][1]["peers"] = [ids["garage-worker"].public_key]
    data["mesh"]["operators"] = [ids["op"].public_key]  # provisions mesh state: peers may not
    return Topology.model_validate(data)


async def measure(top: Topology, ids: dict[str, Identity], homes: dict[str, Path], work: Path, n: int) -> dict:
    def worker(who: str, server: str) -> Child:
        return demo_worker(top.client_url(server), homes[who], work / f"{who}.log")

    lab, garage = worker("lab-worker", "lab"), worker("garage-worker", "garage")
    try:
        lab.wait_for("serving")
        garage.wait_for("serving")
        async with await Client.connect(top.client_url("lab"), ids["lab-user"]) as client:
            while len(await client.peers(timeout=0.5, capability="demo.noop")) < 2:
                pass
            local = await drive_async("community-local", lambda: client.submit("demo.noop", {}), n, 1, warmup=50)
            assert (await client.submit("demo.noop", {})).worker == ids["lab-worker"].public_key
            lab.stop()
            remote = await drive_async("cross-region", lambda: client.submit("demo.noop", {}), n, 1, warmup=50)
            assert (await client.submit("demo.noop", {})).worker == ids["garage-worker"].public_key
        return {"local": local.as_dict(), "cross_region": remote.as_dict()}
    finally:
        lab.stop()
        garage.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "federation.json")
    args = parser.parse_args()
    ids = {name: Identity.generate() for name in ("lab-worker", "lab-user", "garage-worker", "op")}
    with tempfile.TemporaryDirectory(prefix="meshjobs-fed-") as tmp:
        work = Path(tmp)
        homes = {name: peer_home(work / name, identity, [ids["lab-user"].public_key]) for name, identity in ids.items()}
        top = topology(ids)
        mesh = LocalMesh(top, work / "state", detach=False)
        started = time.monotonic()
        try:
            mesh.up(timeout=120)
            up_seconds = time.monotonic() - started
            asyncio.run(provision(top, ids["op"], MESH_STATE))
            result = asyncio.run(measure(top, ids, homes, work, args.requests))
        finally:
            for server in mesh.started.values():
                server.stop()
    ratio = result["cross_region"]["p50_ms"] / result["local"]["p50_ms"]
    report = {"benchmark": "federation", "servers": len(top.server_names()), "up_seconds": round(up_seconds, 2),
              **result, "cross_region_over_local_p50": round(ratio, 2)}  # fmt: skip
    print(f"topology of {report['servers']} servers healthy in {report['up_seconds']} s")
    for key in ("local", "cross_region"):
        r = result[key]
        print(
            f"{key:<14} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
            f"{r['throughput_per_s']:.0f} req/s (1 in flight)"
        )
    print(f"cross-region / local p50: {report['cross_region_over_local_p50']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
