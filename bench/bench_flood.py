"""Valid jobs' latency while a worker's capability subject is flooded with junk, in one run.

A closed embedded broker (127.0.0.1, random port) admits four keys: an
operator that provisions mesh state, the demo worker (``meshjobs worker
workers.demo:app``), a submitter the worker trusts, and a flooder the broker
admits but the worker does not trust. The submitter runs ``demo.noop``
through the library's submit path (sign, verify, policy, replay, mesh-wide
claim, signed result, verify), first unloaded, then while bench/flooder.py, a
paced publisher in its own process, sends junk to the same capability subject
(``mesh.cmd.demo.noop``): garbage bytes, envelopes signed by the flooder's
key, and envelopes signed by strangers' keys, every one with a reply subject.

Reported: p50/p99 of valid jobs unloaded and under flood, the ratio of the
p99s (target: within 3x), how much junk went out and at what rate, how many
signed rejections came back for it (flood control drops junk past the
worker's refusal budget unanswered, before any crypto: see
meshjobs/runtime/gate.py), and the CPU the worker, the broker and the flooder
spent in each phase. A table on stdout and JSON in bench/results/flood.json.

The flood is bounded in time (``--flood-seconds``, at most 20 s by default)
and count (``--rate`` times that); every process is stopped by its PID and
the temporary directory removed.

    python bench/bench_flood.py            # the full run
    python bench/bench_flood.py --quick    # a smoke run: numbers not meaningful
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
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    REPO,
    Child,
    Sample,
    cpu_seconds,
    demo_worker,
    drive_async,
    peak_rss_mib,
    peer_home,
    publish_report,
    python,
)
from meshjobs import Client  # noqa: E402
from meshjobs._nats import connect  # noqa: E402
from meshjobs.catalog import MESH_STATE  # noqa: E402
from meshjobs.errors import ConnectError, MeshError  # noqa: E402
from meshjobs.identity import Identity  # noqa: E402
from meshjobs.infra.broker import NatsServer, closed_roles, embedded, find_nats_server  # noqa: E402
from meshjobs.state import provision  # noqa: E402
from meshjobs.subjects import queue_subject  # noqa: E402

CAPABILITY = "demo.noop"
TARGET_P99_RATIO = 3.0
FULL = {"requests": 5000, "flood_seconds": 20.0, "settle": 1.0, "warmup": 200}
QUICK = {"requests": 100, "flood_seconds": 4.0, "settle": 0.5, "warmup": 20}


class Phase:
    """CPU seconds of the processes that matter, from the start of a phase to its end."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.perf_counter()
        self.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def percent(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        return {name: round(100 * (cpu_seconds(pid) - self.cpu[name]) / wall, 1) for name, pid in self.pids.items()}


async def stranger_refused(url: str) -> bool:
    """A key nobody admitted cannot log in to the closed broker."""
    try:
        nc = await connect(url, Identity.generate())
    except ConnectError:
        return True
    await nc.close()
    return False


async def measure(broker: NatsServer, ids: dict[str, Identity], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    url = broker.url
    nc = await connect(url, ids["operator"], name="meshjobs-bench-provision")
    try:
        await provision(nc, MESH_STATE)
    finally:
        await nc.close()
    refused = await stranger_refused(url)
    home = peer_home(work / "worker", ids["worker"], [ids["submitter"].public_key])
    worker = demo_worker(url, home, work / "worker.log")
    flooder: Child | None = None
    failures: dict[str, Counter[str]] = {"unloaded": Counter(), "under flood": Counter()}
    try:
        await asyncio.to_thread(worker.wait_for, "serving")
        async with await Client.connect(url, ids["submitter"]) as client:
            # The first job waits for the worker's claim store: not part of any sample.
            await client.submit(CAPABILITY, {}, timeout=30)

            def job(phase: str) -> Any:
                async def one() -> None:
                    try:
                        await client.submit(CAPABILITY, {}, timeout=args.job_timeout)
                    except MeshError as exc:
                        failures[phase][type(exc).__name__] += 1

                return one

            pids = {"worker": worker.proc.pid, "broker": broker.pid}
            quiet = Phase(pids)
            unloaded = await drive_async("unloaded", job("unloaded"), args.requests, args.in_flight, args.warmup)
            quiet_cpu = quiet.percent()

            env = {**os.environ, "MESHJOBS_HOME": str(peer_home(work / "flooder", ids["flooder"]))}
            flooder = Child(
                [python(), "bench/flooder.py", url, queue_subject(CAPABILITY), CAPABILITY,
                 "--rate", str(args.rate), "--seconds", str(args.flood_seconds), "--mix", args.mix],
                work / "flooder.log",
                env,
            )  # fmt: skip
            await asyncio.to_thread(flooder.wait_for, "flooding")
            flood_started = time.perf_counter()
            await asyncio.sleep(args.settle)  # past the refusal budget's burst: the steady state
            loud = Phase({**pids, "flooder": flooder.proc.pid})
            until = flood_started + args.flood_seconds - 0.5
            loaded = await drive_async("under flood", job("under flood"), args.requests, args.in_flight, 0, until)
            loud_cpu = loud.percent()
            unloaded.worker_rss_mib = loaded.worker_rss_mib = peak_rss_mib(worker.proc.pid)
            await asyncio.to_thread(flooder.stop)  # SIGTERM: it stops, waits for late replies, prints its summary
    finally:
        if flooder is not None:
            flooder.stop()
        worker.stop()
    if not loaded.latencies_ms:
        raise RuntimeError("the flood ended before any job under flood was measured; raise --flood-seconds")
    summary = [line for line in flooder.log.read_text().splitlines() if line.startswith("summary ")]
    if not summary:
        raise RuntimeError(f"the flooder printed no summary; see {flooder.log}")
    junk = json.loads(summary[-1].removeprefix("summary "))
    return {
        "unloaded": {**unloaded.as_dict(), "cpu_percent": quiet_cpu, "failed": dict(failures["unloaded"])},
        "under_flood": {
            **loaded.as_dict(),
            "cpu_percent": loud_cpu,
            "failed": dict(failures["under flood"]),
            "cut_short": loaded.requests < args.requests,
        },
        "flood": junk,
        "stranger_login_refused": refused,
        "_samples": (unloaded, loaded),
    }


def ratios(unloaded: Sample, loaded: Sample) -> dict[str, Any]:
    u, f = unloaded.as_dict(), loaded.as_dict()
    p99 = round(f["p99_ms"] / u["p99_ms"], 3)  # type: ignore[operator]
    return {
        "p99 under flood / unloaded": p99,
        "p50 under flood / unloaded": round(f["p50_ms"] / u["p50_ms"], 3),  # type: ignore[operator]
        "throughput under flood / unloaded": round(loaded.throughput / unloaded.throughput, 3),
        "p99 target": f"within {TARGET_P99_RATIO:g}x",
        "p99 target met": p99 <= TARGET_P99_RATIO,
    }


def table(result: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        f"{'valid jobs':<14}{'in flight':>10}{'jobs':>7}{'failed':>8}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'worker CPU':>12}{'broker CPU':>12}{'flooder CPU':>13}"
    ]
    for key in ("unloaded", "under_flood"):
        r = result[key]
        cpu = r["cpu_percent"]
        flooder = f"{cpu['flooder']:.0f}%" if "flooder" in cpu else "-"
        lines.append(
            f"{r['system']:<14}{r['in_flight']:>10}{r['requests']:>7}{sum(r['failed'].values()):>8}"
            f"{r['throughput_per_s']:>9.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}"
            f"{cpu['worker']:>11.0f}%{cpu['broker']:>11.0f}%{flooder:>13}"
        )
    junk = result["flood"]
    answered = junk["signed_rejections"] / junk["sent"] if junk["sent"] else 0.0
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in junk["sent_by_kind"].items())
    reasons = ", ".join(f"{code} {n:,}" for code, n in sorted(junk["rejection_reasons"].items())) or "none"
    verdict = "met" if summary["p99 target met"] else "NOT met"
    lines += [
        "",
        f"{'p99 under flood / unloaded':<36}{summary['p99 under flood / unloaded']:.2f}x "
        f"(target: {summary['p99 target']}: {verdict})",
        f"{'p50 under flood / unloaded':<36}{summary['p50 under flood / unloaded']:.2f}x",
        f"{'jobs/s under flood / unloaded':<36}{summary['throughput under flood / unloaded']:.2f}x",
        f"{'junk sent':<36}{junk['sent']:,} in {junk['seconds']:.1f} s ({junk['rate_asked_per_s']:,.0f}/s asked, "
        f"{junk['rate_held_per_s']:,.0f}/s held): {kinds}",
        f"{'signed rejections sent back':<36}{junk['signed_rejections']:,} ({answered:.1%} of the junk): {reasons}",
        f"{'other replies to the junk':<36}{junk['other_replies'] + junk['unverifiable_replies']:,}",
        f"{'a stranger key at login':<36}{'refused' if result['stranger_login_refused'] else 'ADMITTED'}",
    ]
    if result["under_flood"]["cut_short"]:
        lines.append(f"(the flood ended first: {result['under_flood']['requests']} jobs measured under flood)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, a short flood: numbers not meaningful")
    parser.add_argument("--requests", type=int, help="valid jobs per phase (default 5000; --quick 100)")
    parser.add_argument("--in-flight", type=int, default=1, help="valid jobs in flight (default 1)")
    parser.add_argument("--rate", type=float, default=4000.0, help="junk messages per second (default 4000)")
    parser.add_argument("--flood-seconds", type=float, help="the flood's cap in seconds (default 20; --quick 4)")
    parser.add_argument("--mix", default="garbage,untrusted,stranger", help="kinds of junk (see bench/flooder.py)")
    parser.add_argument("--job-timeout", type=float, default=10.0, help="each valid job's deadline, s (default 10)")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "flood.json")
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    args.requests = args.requests or profile["requests"]
    args.flood_seconds = args.flood_seconds or profile["flood_seconds"]
    args.settle, args.warmup = profile["settle"], profile["warmup"]
    if args.flood_seconds < args.settle + 1:
        parser.error(f"--flood-seconds must be at least {args.settle + 1:g}")
    ids = {name: Identity.generate() for name in ("operator", "worker", "submitter", "flooder")}
    admitted = closed_roles(ids["operator"].public_key, [ids[n].public_key for n in ("worker", "submitter", "flooder")])
    with tempfile.TemporaryDirectory(prefix="meshjobs-flood-") as tmp:
        work = Path(tmp)
        broker = embedded(work / "nats", admitted=admitted).start()
        try:
            result = asyncio.run(measure(broker, ids, work, args))
        finally:
            broker.stop()
    summary = ratios(*result.pop("_samples"))
    version = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "flood",
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "nats_server": version},
        "settings": {
            "capability": CAPABILITY,
            "requests": args.requests,
            "in_flight": args.in_flight,
            "rate_per_s": args.rate,
            "flood_seconds_max": args.flood_seconds,
            "settle_seconds": args.settle,
            "mix": args.mix.split(","),
        },
        **result,
        "ratios": summary,
    }
    publish_report(report, args.out, args.json, table(result, summary))


if __name__ == "__main__":
    main()
