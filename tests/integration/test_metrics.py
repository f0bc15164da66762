"""Prometheus metrics scraped from real processes.

A worker's values move with the real jobs it runs, exactly; the trust service's gauges carry the
scores and quarantine states of the records it signs and the orders it honours.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshjobs import App, Client, Identity, Rejected, TrustPolicy, Worker
from meshjobs.client import Outcome
from meshjobs.durable import Durable
from meshjobs.infra.broker import NatsServer
from meshjobs.infra.services import TRUST_READY
from meshjobs.trust.evidence import Kind
from meshjobs.trust.quarantine import issue_order
from meshjobs.trust.record import Record
from meshjobs.trust.reputation import ReputationBook
from tests.conftest import REPO, WorkerProcess, cli_env, wait_for_instances

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_url(worker: WorkerProcess, timeout: float = 20, after: str = "") -> str:
    """The endpoint the process printed, once its output also shows *after* (a ready line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = worker.output()
        if (match := re.search(r"metrics at (http://\S+/metrics)", output)) and after in output:
            return match.group(1)
        assert worker.proc.poll() is None, f"the process exited:\n{output}"
        time.sleep(0.1)
    raise AssertionError(f"the process never said where its metrics are:\n{worker.output()}")


@pytest.fixture
def observed(broker: NatsServer, home: Path, identity: Identity, tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess.launch(
        "tests.observe_apps:app", home, broker.url, tmp_path / "worker.log",
        "--metrics-port", "0", "--max-attempts", "2", "--retry-delay", "0.1",
    )  # fmt: skip
    try:
        asyncio.run(wait_for_instances(broker.url, identity, 1, "obs.ok"))
        yield worker
    finally:
        assert worker.terminate() == 0, worker.output()


async def test_a_real_endpoint_counts_real_jobs(
    observed: WorkerProcess, broker: NatsServer, identity: Identity
) -> None:
    url = metrics_url(observed)
    assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
    before = scrape(url)
    async with await Client.connect(broker.url, identity) as client:
        await asyncio.gather(*(client.submit("obs.ok", {"n": i}) for i in range(7)))
        for _ in range(2):
            with pytest.raises(Exception, match="obs.fail always fails"):
                await client.submit("obs.fail")
        slow = asyncio.create_task(client.submit("obs.slow", {"seconds": 1.5}))
        await asyncio.sleep(0.7)
        during = scrape(url)
        await slow
    async with await Client.connect(broker.url, Identity.generate()) as stranger:
        for _ in range(3):
            with pytest.raises(Rejected, match="untrusted"):
                await stranger.submit("obs.ok", {"n": 1})
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("meshjobs_jobs_total", capability="obs.ok", path="queue", outcome="ok") == 7
    assert moved("meshjobs_jobs_total", capability="obs.fail", path="queue", outcome="error") == 2
    assert moved("meshjobs_jobs_total", capability="obs.slow", path="queue", outcome="ok") == 1
    assert moved("meshjobs_job_duration_seconds_count", capability="obs.ok", path="queue") == 7
    assert moved("meshjobs_job_duration_seconds_sum", capability="obs.slow", path="queue") >= 1.5
    assert moved("meshjobs_rejections_total", reason="untrusted") == 3
    assert value(during, "meshjobs_jobs_in_flight", capability="obs.slow") == 1
    assert value(after, "meshjobs_jobs_in_flight", capability="obs.slow") == 0


async def test_durable_retries_and_dead_letters_show(
    observed: WorkerProcess, broker: NatsServer, identity: Identity
) -> None:
    url = metrics_url(observed)
    before = scrape(url)
    async with await Client.connect(broker.url, identity) as client:
        durable = await Durable.open(client.nc)
        ok = await durable.submit(identity, "obs.ok", {"n": 5})
        dead = await durable.submit(identity, "obs.fail", {})
        assert (await durable.wait(ok, 20))[0].value == 5
        assert (await durable.wait(dead, 20))[0].error.code == "DeadLetter"
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("meshjobs_jobs_total", capability="obs.ok", path="durable", outcome="ok") == 1
    assert moved("meshjobs_jobs_total", capability="obs.fail", path="durable", outcome="error") == 2  # --max-attempts 2
    assert moved("meshjobs_durable_redeliveries_total", capability="obs.fail") == 1
    assert moved("meshjobs_durable_dead_lettered_total", capability="obs.fail") == 1


# -- the trust service -----------------------------------------------------------------

honest = App("metrics-honest")
cheating = App("metrics-cheating")


@honest.capability("metrics.square", deterministic=True)
async def square(x: int) -> int:
    return x * x


@cheating.capability("metrics.square", deterministic=True)
async def wrong_square(x: int) -> int:
    return x * x + 1


def launch_trust_service(home: Path, url: str, log: Path) -> WorkerProcess:
    """`meshjobs trust serve --metrics-port 0` as *home*'s identity, output in *log*."""
    with open(os.devnull, "rb") as devnull, log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "trust", "serve", "--metrics-port", "0"],
            env=cli_env(home, url),
            cwd=REPO,
            stdin=devnull,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return WorkerProcess(proc, log)


async def scraped_until(url: str, holds: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """A scrape of *url* for which *holds* is true, failing with the last one after *timeout*."""
    deadline = time.monotonic() + timeout
    while not holds(samples := await asyncio.to_thread(scrape, url)):
        assert time.monotonic() < deadline, f"metrics not as expected within {timeout} s: {samples}"
        await asyncio.sleep(0.1)
    return samples


async def signed_record(book: ReputationBook, peer: str, until: Callable[[Record], bool]) -> Record:
    """The peer's record as a reader accepting only the service's key finds it, once *until* holds."""
    deadline = time.monotonic() + 5
    while not until(record := await book.record(peer)):
        assert time.monotonic() < deadline, f"record not as expected within 5 s: {record}"
        await asyncio.sleep(0.05)
    return record


def shows(peer: str, record: Record, quarantined: bool) -> Callable[[Samples], bool]:
    """Whether a scrape exports *record*'s score (it decays over days: equal to 1e-4) and this quarantine state."""

    def check(samples: Samples) -> bool:
        score = samples.get(("meshjobs_peer_trust_score", frozenset({("peer", peer)})))
        flag = samples.get(("meshjobs_peer_quarantined", frozenset({("peer", peer)})))
        return score == pytest.approx(record.score(), abs=1e-4) and flag == (1.0 if quarantined else 0.0)

    return check


async def test_the_trust_service_exports_the_scores_and_quarantines_it_signs(
    broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    """Real evidence about real results: the gauges follow the signed records, the orders, and a restart."""
    anchor, fair, cheat = Identity.generate(), Identity.generate(), Identity.generate()
    (home / "trust.toml").write_text(
        f'[[operator]]\nkey = "{identity.public_key}"\n[[pretrusted]]\nkey = "{anchor.public_key}"\n'
    )
    workers, conns = [], []
    for key, app in ((anchor, honest), (fair, honest), (cheat, cheating)):
        conns.append(wnc := await nats.connect(broker.url))
        workers.append(worker := Worker(app, key, TrustPolicy(frozenset({identity.public_key}))))
        await worker.start(wnc)
    service = launch_trust_service(home, broker.url, tmp_path / "trust-1.log")
    try:
        url = metrics_url(service, after=TRUST_READY)
        assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
        async with await Client.connect(broker.url, identity) as client:
            book = await ReputationBook.open(client.nc, identity, trust_services={identity.public_key})

            async def run(peer: Identity, x: int, job: str) -> Outcome:
                return await client.submit("metrics.square", {"x": x}, peer=peer.public_key, job_id=job, timeout=10)

            async def report(kind: Kind, peer: Identity, job: str, done: Outcome, other: Outcome) -> None:
                proof = [(other.request, other.frame)]
                await book.report(
                    kind, peer.public_key, job_id=job, capability="metrics.square",
                    request=done.request, result=done.frame, proof=proof,
                )  # fmt: skip

            try:
                # A verified agreement with the anchor: a real, positive score, exported as signed.
                job = "job-metrics-00001"
                mine, right = await run(fair, 3, job), await run(anchor, 3, job)
                await report("agree", fair, job, mine, right)
                record = await signed_record(book, fair.public_key, lambda r: r.verified == 1)
                assert record.score() > 0.2 and record.service == identity.public_key
                samples = await scraped_until(url, shows(fair.public_key, record, quarantined=False))
                assert value(samples, "meshjobs_evidence_total", outcome="folded") >= 1
                # A wrong result outweighed by the anchor: quarantined automatically, gauge 1.
                job = "job-metrics-00002"
                bad, right = await run(cheat, 4, job), await run(anchor, 4, job)
                await report("wrong", cheat, job, bad, right)
                cheated = await signed_record(book, cheat.public_key, lambda r: r.quarantined)
                await scraped_until(url, shows(cheat.public_key, cheated, quarantined=True))
                # An operator's release order: honoured, the record written again, gauge 0.
                await issue_order(client.nc, identity, cheat.public_key, "release", "appeal granted")
                released = await signed_record(book, cheat.public_key, lambda r: not r.quarantined)
                await scraped_until(url, shows(cheat.public_key, released, quarantined=False))
                # An operator's quarantine order: the record stays as it is, the gauge turns 1.
                await issue_order(client.nc, identity, fair.public_key, "quarantine", "under investigation")
                await scraped_until(url, shows(fair.public_key, record, quarantined=True))
                assert (await book.record(fair.public_key)).seq == record.seq
            finally:
                await book.close()
        assert service.terminate() == 0, service.output()
        # Started again, it exports what it holds before any new evidence arrives.
        service = launch_trust_service(home, broker.url, tmp_path / "trust-2.log")
        url = metrics_url(service, after=TRUST_READY)
        samples = await asyncio.to_thread(scrape, url)
        assert shows(fair.public_key, record, quarantined=True)(samples), samples
        assert shows(cheat.public_key, released, quarantined=False)(samples), samples
    finally:
        assert service.terminate() == 0, service.output()
        for worker in workers:
            await worker.drain()
        for wnc in conns:
            await wnc.close()
