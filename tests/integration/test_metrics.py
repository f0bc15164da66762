"""Prometheus metrics scraped from a real worker process: values move with real jobs, exactly."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshjobs import Client, Identity, Rejected
from meshjobs.durable import Durable
from meshjobs.infra.broker import NatsServer
from tests.conftest import WorkerProcess, wait_for_instances

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


def metrics_url(worker: WorkerProcess, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(r"metrics at (http://\S+/metrics)", worker.output()):
            return match.group(1)
        time.sleep(0.1)
    raise AssertionError(f"the worker never said where its metrics are:\n{worker.output()}")


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
