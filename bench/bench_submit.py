"""Side by side, in one run: raw nats-py request/reply, the meshjobs submit path, Celery on Redis.

Each system gets one worker process and the same no-op job; the client runs in
this process. meshjobs pays for signing the envelope, verifying it, checking
policy and replay, signing the result and verifying that: everything a real
submission does. Throughput at 1 and 256 in flight, p50/p99 latency, and the
worker's peak memory; a table on stdout and JSON in bench/results/.

``--claim`` measures instead what the mesh-wide replay claim costs: the same
echo handler declared ``idempotent=True`` (no claim) and not (a JetStream KV
create per job before it runs), on one worker (bench/claim_worker.py), next to
raw nats-py, at the same in-flight levels.

    python bench/bench_submit.py            # the full run reported in the README
    python bench/bench_submit.py --claim    # the claim cost: raw, echo idempotent, echo claimed
    python bench/bench_submit.py --quick    # a smoke run (also with --claim)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.claim_worker import UNCAPPED_SENDER_RATE  # noqa: E402
from bench.harness import (  # noqa: E402
    REPO,
    Child,
    Sample,
    demo_worker,
    drive_async,
    drive_threads,
    peak_rss_mib,
    peer_home,
    publish_report,
    python,
    start_redis,
)
from meshjobs.infra.broker import embedded, find_nats_server  # noqa: E402

FULL = {
    "raw": (5000, 40000),
    "meshjobs": (3000, 20000),
    "routed": (2000, 10000),
    "replicas3": (1000, 5000),
    "durable": (1000, 5000),
    "celery": (1000, 4000),
    "claim": (3000, 20000),
}
QUICK = {
    "raw": (200, 1000),
    "meshjobs": (200, 1000),
    "routed": (100, 500),
    "replicas3": (50, 300),
    "durable": (50, 300),
    "celery": (100, 300),
    "claim": (200, 1000),
}
ECHO_ARGS = {"n": 1}


async def bench_raw(url: str, work: Path, counts: tuple[int, int], levels: list[int]) -> list[Sample]:
    import nats

    responder = Child([python(), "bench/raw_responder.py", url], work / "raw.log")
    try:
        responder.wait_for("ready")
        nc = await nats.connect(url)
        samples = []
        for level, count in zip(levels, counts, strict=True):
            sample = await drive_async("raw nats-py", lambda: nc.request("bench.raw", b"", timeout=10), count, level)
            sample.worker_rss_mib = peak_rss_mib(responder.proc.pid)
            samples.append(sample)
        await nc.close()
        return samples
    finally:
        responder.stop()


async def bench_meshjobs(url: str, work: Path, counts: tuple[int, int], levels: list[int]) -> list[Sample]:
    from meshjobs import Client
    from meshjobs.identity import Identity

    identity = Identity.generate()
    worker = demo_worker(url, peer_home(work / "home", identity), work / "meshjobs-worker.log")
    try:
        worker.wait_for("serving")
        async with await Client.connect(url, identity) as client:
            samples = []
            for level, count in zip(levels, counts, strict=True):
                sample = await drive_async("meshjobs", lambda: client.submit("demo.noop", {}), count, level)
                sample.worker_rss_mib = peak_rss_mib(worker.proc.pid)
                samples.append(sample)
        return samples
    finally:
        worker.stop()


async def bench_routed(url: str, work: Path, counts: dict[str, tuple[int, int]], levels: list[int]) -> list[Sample]:
    """Routed rows: trust filter plus direct send (one worker), and --replicas 3 (three workers)."""
    from meshjobs import Client
    from meshjobs.identity import Identity
    from meshjobs.router import Constraints, Router
    from meshjobs.verify import Verifier

    submitter = Identity.generate()
    workers = [
        demo_worker(
            url, peer_home(work / f"routed-{n}", Identity.generate(), [submitter.public_key]), work / f"routed-{n}.log"
        )
        for n in range(3)
    ]
    try:
        for worker in workers:
            worker.wait_for("serving")
        async with await Client.connect(url, submitter) as client:
            while len(await client.peers(timeout=0.5, capability="demo.noop")) < 3:
                pass
            router = await Router.open(client, frozenset())
            # No trust service runs here, so every score is 0 (a lower credible bound): the rows
            # measure the routed path (signed manifests, records and quarantine read, ranking, direct
            # send, evidence filed), not a trust threshold nobody could pass.
            anyone = Constraints()
            samples = []
            only = (await router.candidates("demo.noop", anyone))[0].peer
            one = Constraints(peer=only)
            for level, count in zip(levels, counts["routed"], strict=True):
                sample = await drive_async(
                    "meshjobs routed", lambda: router.submit("demo.noop", {}, constraints=one), count, level
                )
                await router.flush()
                samples.append(sample)
            for level, count in zip(levels, counts["replicas3"], strict=True):
                sample = await drive_async(
                    "meshjobs x3 quorum 2",
                    lambda: Verifier(router).submit_quorum("demo.noop", {}, replicas=3, quorum=2, constraints=anyone),
                    count,
                    level,
                )
                await router.flush()
                samples.append(sample)
            for sample in samples:
                sample.worker_rss_mib = max(peak_rss_mib(w.proc.pid) for w in workers)
            await router.close()
        return samples
    finally:
        for worker in workers:
            worker.stop()


async def bench_durable(url: str, work: Path, counts: tuple[int, int], levels: list[int]) -> list[Sample]:
    """Durable rows: submit to the JOBS stream, one worker, until the signed result is stored and seen."""
    from meshjobs._nats import connect
    from meshjobs.durable import Durable
    from meshjobs.identity import Identity

    identity = Identity.generate()
    worker = demo_worker(url, peer_home(work / "durable", identity), work / "durable.log")
    nc = await connect(url, identity)
    try:
        worker.wait_for("serving")
        durable = await Durable.open(nc)

        async def one() -> None:
            # What a user's `submit --durable` then `jobs wait` does: the signed result, checked
            # against the frame this submitter signed and the claim of the worker that ran it.
            job_id = await durable.submit(identity, "demo.noop", {})
            await durable.wait(job_id, 60.0)

        samples = []
        for level, count in zip(levels, counts, strict=True):
            sample = await drive_async("meshjobs durable", one, count, level, warmup=20)
            sample.worker_rss_mib = peak_rss_mib(worker.proc.pid)
            samples.append(sample)
        return samples
    finally:
        await nc.close()
        worker.stop()


async def bench_claim(
    url: str, work: Path, counts: tuple[int, int], levels: list[int], sender_rate: float
) -> list[Sample]:
    """The echo handler idempotent (no claim) and claimed (a KV create per job), on one worker."""
    from bench.claim_worker import CLAIMED, IDEMPOTENT
    from meshjobs import Client
    from meshjobs.identity import Identity

    identity = Identity.generate()
    home = peer_home(work / "claim", identity)
    env = {**os.environ, "MESHJOBS_HOME": str(home)}
    args = [python(), "bench/claim_worker.py", url, "--sender-rate", str(sender_rate)]
    worker = Child(args, work / "claim-worker.log", env)
    try:
        worker.wait_for("serving")
        async with await Client.connect(url, identity) as client:
            # The first claimed job waits for the worker's claim store: not part of any sample.
            await client.submit(CLAIMED, ECHO_ARGS)
            samples = []
            for level, count in zip(levels, counts, strict=True):
                for name, capability in (("echo idempotent", IDEMPOTENT), ("echo claimed", CLAIMED)):
                    sample = await drive_async(name, lambda c=capability: client.submit(c, ECHO_ARGS), count, level)
                    sample.worker_rss_mib = peak_rss_mib(worker.proc.pid)
                    samples.append(sample)
        return samples
    finally:
        worker.stop()


def bench_celery(work: Path, counts: tuple[int, int], levels: list[int], acks_late: bool = False) -> list[Sample]:
    redis, redis_url = start_redis(work / ("redis-late" if acks_late else "redis"))
    env = {**os.environ, "BENCH_REDIS_URL": redis_url, "BENCH_ACKS_LATE": "1" if acks_late else "0"}
    os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ["BENCH_ACKS_LATE"] = env["BENCH_ACKS_LATE"]
    import importlib

    import bench.celery_app

    importlib.reload(bench.celery_app)  # pick up this run's broker URL and acks_late
    worker = Child(
        [python(), "-m", "celery", "-A", "bench.celery_app", "worker", "-c", "2", "--loglevel", "INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        work / ("celery-late.log" if acks_late else "celery-worker.log"),
        env,
    )  # fmt: skip
    try:
        worker.wait_for("ready.", timeout=60)
        from bench.celery_app import noop

        samples = []
        for level, count in zip(levels, counts, strict=True):
            name = "celery+redis acks_late" if acks_late else "celery+redis"
            sample = drive_threads(name, lambda: noop.delay().get(timeout=60), count, level)
            sample.worker_rss_mib = _tree_rss(worker.proc.pid)
            samples.append(sample)
        return samples
    finally:
        worker.stop()
        redis.stop()


def _tree_rss(pid: int) -> float:
    # A prefork Celery worker is a parent plus its pool processes.
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return peak_rss_mib(pid) + sum(peak_rss_mib(int(c)) for c in children)


def ratios(samples: list[Sample]) -> dict[str, Any]:
    by = {(s.system, s.in_flight): s for s in samples}
    out: dict[str, Any] = {}
    for level in sorted({s.in_flight for s in samples}):
        raw, mesh, cel = by.get(("raw nats-py", level)), by.get(("meshjobs", level)), by.get(("celery+redis", level))
        if raw and mesh:
            out[f"meshjobs/raw throughput @{level}"] = round(mesh.throughput / raw.throughput, 3)
            out[f"meshjobs/raw p50 latency @{level}"] = round(
                mesh.as_dict()["p50_ms"] / raw.as_dict()["p50_ms"],
                3,  # type: ignore[operator]
            )
        if cel and mesh:
            out[f"meshjobs/celery throughput @{level}"] = round(mesh.throughput / cel.throughput, 2)
        durable, late = by.get(("meshjobs durable", level)), by.get(("celery+redis acks_late", level))
        if durable and late:
            out[f"durable/celery acks_late throughput @{level}"] = round(durable.throughput / late.throughput, 2)
        for name in ("meshjobs routed", "meshjobs x3 quorum 2", "meshjobs durable"):
            row = by.get((name, level))
            if row and mesh:
                out[f"{name}/queue throughput @{level}"] = round(row.throughput / mesh.throughput, 3)
                out[f"{name}/queue p50 @{level}"] = round(
                    row.as_dict()["p50_ms"] / mesh.as_dict()["p50_ms"],
                    3,  # type: ignore[operator]
                )
        idem, claimed = by.get(("echo idempotent", level)), by.get(("echo claimed", level))
        if idem and claimed:
            i, c = idem.as_dict(), claimed.as_dict()
            out[f"claimed/idempotent throughput @{level}"] = round(claimed.throughput / idem.throughput, 3)
            out[f"claimed/idempotent p50 @{level}"] = round(c["p50_ms"] / i["p50_ms"], 3)  # type: ignore[operator]
            out[f"claimed/idempotent p99 @{level}"] = round(c["p99_ms"] / i["p99_ms"], 3)  # type: ignore[operator]
            out[f"claim cost, p50 ms added @{level}"] = round(c["p50_ms"] - i["p50_ms"], 3)  # type: ignore[operator]
        for name, row in (("idempotent", idem), ("claimed", claimed)):
            if raw and row:
                out[f"echo {name}/raw throughput @{level}"] = round(row.throughput / raw.throughput, 3)
                out[f"echo {name}/raw p50 @{level}"] = round(
                    row.as_dict()["p50_ms"] / raw.as_dict()["p50_ms"],
                    3,  # type: ignore[operator]
                )
    return out


def table(samples: list[Sample], summary: dict[str, Any]) -> str:
    lines = [
        f"{'system':<22}{'in flight':>10}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'worker MiB':>12}"
    ]
    for s in samples:
        d = s.as_dict()
        lines.append(
            f"{s.system:<22}{s.in_flight:>10}{s.requests:>10}{d['throughput_per_s']:>10.0f}"
            f"{d['p50_ms']:>9.3f}{d['p99_ms']:>9.3f}{d['worker_peak_rss_mib']:>12.1f}"
        )
    lines.append("")
    lines += [f"{k:<46}{v:>8}" for k, v in summary.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run, numbers not meaningful")
    parser.add_argument("--levels", default="1,256", help="in-flight levels, comma-separated (default 1,256)")
    parser.add_argument(
        "--claim", action="store_true", help="only the claim cost: raw nats-py, echo idempotent, echo claimed"
    )
    parser.add_argument(
        "--sender-rate",
        type=float,
        default=None,
        help="--claim: the worker's per-submitter rate limit, jobs/s (default: uncapped, so the claim is measured)",
    )
    parser.add_argument("--requests", type=int, default=None, help="N requests per row and level (a tiny smoke run)")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default bench/results/submit.json, "
                        "or claim.json with --claim)")  # fmt: skip
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    counts = QUICK if args.quick else FULL
    if args.requests is not None:
        counts = {name: (args.requests,) * len(levels) for name in counts}
    name = "claim" if args.claim else "submit"
    out = args.out or REPO / "bench" / "results" / f"{name}.json"
    sender_rate = args.sender_rate or UNCAPPED_SENDER_RATE
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="meshjobs-bench-") as tmp:
        work = Path(tmp)
        broker = embedded(work / "nats").start()
        try:
            samples += asyncio.run(bench_raw(broker.url, work, counts["raw"], levels))
            if args.claim:
                samples += asyncio.run(bench_claim(broker.url, work, counts["claim"], levels, sender_rate))
            else:
                samples += asyncio.run(bench_meshjobs(broker.url, work, counts["meshjobs"], levels))
                samples += asyncio.run(bench_routed(broker.url, work, counts, levels))
                samples += asyncio.run(bench_durable(broker.url, work, counts["durable"], levels))
        finally:
            broker.stop()
        if not args.claim:
            samples += bench_celery(work, counts["celery"], levels)
            samples += bench_celery(work, counts["celery"], levels, acks_late=True)
    summary = ratios(samples)
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {
        "benchmark": name,
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nats_server": version},
        "samples": [s.as_dict() for s in samples],
        "ratios": summary,
    }
    if args.claim:
        report["claim_worker_sender_rate"] = sender_rate
    publish_report(report, out, args.json, table(samples, summary))


if __name__ == "__main__":
    main()
