"""Rough edges found by trying meshjobs as a new user (issue 14), with real processes and brokers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer, embedded
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs, wait_for_instances
from tests.integration.test_metrics import metrics_url, scrape, value

pytestmark = pytest.mark.integration


@pytest.fixture
def lost_broker(tmp_path: Path) -> Iterator[NatsServer]:
    """A broker of its own, for tests that take it away."""
    server = embedded(tmp_path / "lost-broker").start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_broker_gone_mid_job_is_one_line_exit_3_and_the_worker_stops_cleanly(
    lost_broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    worker = WorkerProcess.launch(
        "workers.demo:app", home, lost_broker.url, tmp_path / "worker.log", "--metrics-port", "0"
    )
    try:
        asyncio.run(wait_for_instances(lost_broker.url, identity, 1, "demo.sleep"))
        submit = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "submit", "demo.sleep", '{"seconds": 10}'],
            env=cli_env(home, lost_broker.url), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(lambda: value(scrape(metrics_url(worker)), "meshjobs_jobs_in_flight", capability="demo.sleep") == 1)
        lost_broker.kill()  # while the job runs
        stdout, stderr = submit.communicate(timeout=30)
        assert submit.returncode == 3, stderr
        assert stderr.strip().splitlines() == ["meshjobs: lost the connection to NATS: nats: connection closed"]
        wait_for(lambda: "disconnected from NATS; reconnecting" in worker.output())
        worker.proc.send_signal(signal.SIGINT)  # Ctrl-C while the broker is away
        assert worker.proc.wait(20) == 0
    finally:
        worker.kill()
    assert "Traceback" not in worker.output() and "worker stopped" in worker.output()


def test_a_second_ctrl_c_stops_a_draining_worker_at_once(
    broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    args = ("--drain-timeout", "60", "--metrics-port", "0")
    worker = WorkerProcess.launch("workers.demo:app", home, broker.url, tmp_path / "worker.log", *args)
    submit = None
    try:
        asyncio.run(wait_for_instances(broker.url, identity, 1, "demo.sleep"))
        submit = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "submit", "demo.sleep", '{"seconds": 30}', "--peer-wait", "0"],
            env=cli_env(home, broker.url), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        url = metrics_url(worker)
        wait_for(lambda: value(scrape(url), "meshjobs_jobs_in_flight", capability="demo.sleep") == 1)
        worker.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "draining: 1 job(s) in flight" in worker.output())
        time.sleep(0.5)
        assert worker.proc.poll() is None  # the first Ctrl-C drains: it waits for the job
        stopped = time.monotonic()
        worker.proc.send_signal(signal.SIGINT)
        assert worker.proc.wait(10) == 0
        assert time.monotonic() - stopped < 5
        _, stderr = submit.communicate(timeout=30)
        # The job was handed back (shutting_down) and nobody else offers it.
        assert submit.returncode == 3, stderr
    finally:
        worker.kill()
        if submit is not None and submit.poll() is None:
            submit.kill()
    out = worker.output()
    assert "stopping now: handing back 1 unfinished job(s)" in out and "Traceback" not in out


def test_a_normal_shutdown_logs_no_reconnect_warning(
    broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    worker = WorkerProcess.launch("workers.demo:app", home, broker.url, tmp_path / "worker.log")
    asyncio.run(wait_for_instances(broker.url, identity, 1, "demo.add"))
    assert worker.terminate() == 0
    out = worker.output()
    # The session broker is shared: other tests' trust services and operators
    # leave state this worker rightly skips (and may log). What must not
    # appear is anything about the connection or the shutdown itself.
    shutdown = [line for line in out.splitlines() if "WARNING" in line and "meshjobs.trust" not in line]
    assert "worker stopped" in out and "disconnected" not in out and "reconnect" not in out, out
    assert not shutdown, out


def test_a_failing_durable_wait_shows_each_attempt(broker: NatsServer, home: Path, tmp_path: Path) -> None:
    worker = WorkerProcess.launch(
        "tests.observe_apps:app", home, broker.url, tmp_path / "worker.log",
        "--max-attempts", "3", "--retry-delay", "0.3",
    )  # fmt: skip
    try:
        out = meshjobs("submit", "--durable", "obs.fail", "--wait", "60", env=cli_env(home, broker.url))
    finally:
        worker.terminate()
    assert out.returncode == 1
    err = out.stderr
    first = err.index("attempt 1 failed: obs.fail always fails; retry in 0.3 s")
    second = err.index("attempt 2 failed: obs.fail always fails; retry in 0.6 s")  # as it happens, in order
    assert first < second < err.index("failed: DeadLetter: failed 3 time(s)")
    assert err.strip().splitlines()[-1].startswith("meshjobs: job ") and "Traceback" not in err
