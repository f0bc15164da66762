"""Side by side, in one run: raw nats-py request/reply, the meshjobs submit path, Celery on Redis.

Each system gets one worker process and the same no-op job; the client runs in
this process. meshjobs pays for signing the envelope, verifying it, checking
policy and replay, signing the result and verifying that: everything a real
submission does. Throughput at 1 and 256 in flight, p50/p99 latency, and the
worker's peak memory; a table on stdout and JSON in bench/results/.

    python bench/bench_submit.py            # the full run reported in the README
    python bench/bench_submit.py --quick    # a smoke run (CI uses it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import REPO, Child, Sample, drive_async, drive_threads, peak_rss_mib, python, start_redis  # noqa: E402
from meshjobs.broker import embedded, find_nats_server  # noqa: E402

FULL = {"raw": (5000, 40000), "meshjobs": (3000, 20000), "celery": (1000, 4000)}
QUICK = {"raw": (200, 1000), "meshjobs": (200, 1000), "celery": (100, 300)}


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
    from meshjobs.identity import IDENTITY_FILE, Identity, save_identity

    home = work / "home"
    identity = Identity.generate()
    save_identity(identity, home / IDENTITY_FILE)
    env = {**os.environ, "MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": url}
    worker = Child([python(), "-m", "meshjobs", "worker", "workers.demo:app"], work / "meshjobs-worker.log", env)
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


def bench_celery(work: Path, counts: tuple[int, int], levels: list[int]) -> list[Sample]:
    redis, redis_url = start_redis(work / "redis")
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    os.environ["BENCH_REDIS_URL"] = redis_url
    worker = Child(
        [python(), "-m", "celery", "-A", "bench.celery_app", "worker", "-c", "2", "--loglevel", "INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        work / "celery-worker.log",
        env,
    )  # fmt: skip
    try:
        worker.wait_for("ready.", timeout=60)
        from bench.celery_app import noop

        samples = []
        for level, count in zip(levels, counts, strict=True):
            sample = drive_threads("celery+redis", lambda: noop.delay().get(timeout=60), count, level)
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
    return out


def table(samples: list[Sample], summary: dict[str, Any]) -> str:
    lines = [
        f"{'system':<14}{'in flight':>10}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'worker MiB':>12}"
    ]
    for s in samples:
        d = s.as_dict()
        lines.append(
            f"{s.system:<14}{s.in_flight:>10}{s.requests:>10}{d['throughput_per_s']:>10.0f}"
            f"{d['p50_ms']:>9.3f}{d['p99_ms']:>9.3f}{d['worker_peak_rss_mib']:>12.1f}"
        )
    lines.append("")
    lines += [f"{k:<36}{v:>8}" for k, v in summary.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run, numbers not meaningful")
    parser.add_argument("--levels", default="1,256", help="in-flight levels, comma-separated (default 1,256)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "submit.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    counts = QUICK if args.quick else FULL
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="meshjobs-bench-") as tmp:
        work = Path(tmp)
        broker = embedded(work / "nats").start()
        try:
            samples += asyncio.run(bench_raw(broker.url, work, counts["raw"], levels))
            samples += asyncio.run(bench_meshjobs(broker.url, work, counts["meshjobs"], levels))
        finally:
            broker.stop()
        samples += bench_celery(work, counts["celery"], levels)
    summary = ratios(samples)
    print(table(samples, summary))
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "submit",
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nats_server": version},
        "samples": [s.as_dict() for s in samples],
        "ratios": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
