"""The metrics module: per-process registries made at run time, lazy prometheus-client, helpers for other parts."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest

from meshjobs.errors import UsageError
from meshjobs.observe import metrics
from meshjobs.observe.metrics import JobObserver, MeshMetrics, Observers


def sample(m: MeshMetrics, name: str, **labels: str) -> float | None:
    found: float | None = m.registry.get_sample_value(name, labels)
    return found


def test_importing_creates_nothing_and_needs_no_prometheus() -> None:
    code = (
        "import sys, meshjobs.observe.metrics as m, meshjobs.runtime.worker; "
        "assert 'prometheus_client' not in sys.modules, 'imported at import time'; "
        "assert m.active() is None and m.process_observer() is None"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = MeshMetrics(), MeshMetrics()
    a.observer().job_finished("x.y", "queue", "ok", 0.01, None)
    assert sample(a, "meshjobs_jobs_total", capability="x.y", path="queue", outcome="ok") == 1
    assert sample(b, "meshjobs_jobs_total", capability="x.y", path="queue", outcome="ok") is None


def test_observer_records_every_event() -> None:
    m = MeshMetrics()
    seen: list[str] = []

    class Spy(JobObserver):
        def rejected(self, reason: str) -> None:
            seen.append(reason)

    o = Observers([m.observer(), None, Spy()])
    o.job_started("a.b", "durable")
    assert sample(m, "meshjobs_jobs_in_flight", capability="a.b") == 1
    o.job_finished("a.b", "durable", "error", 0.2, "boom")
    o.rejected("untrusted")
    o.redelivered("a.b")
    o.dead_lettered("a.b")
    assert sample(m, "meshjobs_jobs_in_flight", capability="a.b") == 0
    assert sample(m, "meshjobs_jobs_total", capability="a.b", path="durable", outcome="error") == 1
    assert sample(m, "meshjobs_job_duration_seconds_sum", capability="a.b", path="durable") == pytest.approx(0.2)
    assert sample(m, "meshjobs_rejections_total", reason="untrusted") == 1
    assert sample(m, "meshjobs_durable_redeliveries_total", capability="a.b") == 1
    assert sample(m, "meshjobs_durable_dead_lettered_total", capability="a.b") == 1
    assert seen == ["untrusted"]


def test_helpers_do_nothing_until_enabled_then_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_active", None)
    metrics.count_verification("math.square", "agree")  # no metrics: silently nothing
    metrics.set_peer_trust("UPEER", 0.9, False)
    m = MeshMetrics()
    monkeypatch.setattr(metrics, "_active", m)
    metrics.count_verification("math.square", "agree", 2)
    metrics.set_peer_trust("UPEER", 0.25, True)
    metrics.set_awaited(3, 1)
    assert sample(m, "meshjobs_verification_executions_total", capability="math.square", outcome="agree") == 2
    assert sample(m, "meshjobs_peer_trust_score", peer="UPEER") == 0.25
    assert sample(m, "meshjobs_peer_quarantined", peer="UPEER") == 1
    assert sample(m, "meshjobs_awaited_jobs", state="pending") == 3
    metrics.forget_peer("UPEER")
    metrics.forget_peer("UPEER")  # twice is fine
    assert sample(m, "meshjobs_peer_trust_score", peer="UPEER") is None


def test_serve_metrics_on_loopback_and_a_taken_port_is_a_usage_error() -> None:
    m = MeshMetrics()
    m.observer().rejected("expired")
    server = metrics.serve_metrics(0, metrics=m)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url, timeout=5) as response:
            text = response.read().decode()
        assert 'meshjobs_rejections_total{reason="expired"} 1.0' in text
        with pytest.raises(UsageError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            metrics.serve_metrics(server.port, metrics=MeshMetrics())
    finally:
        server.close()
    with socket.socket() as probe:  # closed: the port is free again (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
