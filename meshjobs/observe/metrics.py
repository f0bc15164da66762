"""Prometheus metrics for workers, long-running submitters and the trust service.

The runtime reports what happens to a :class:`JobObserver` (the base class does
nothing, so a worker without metrics pays one method call per event). A
process that wants ``/metrics`` calls :func:`enable` (or :func:`serve_metrics`,
which also starts the HTTP endpoint): that creates the process's
:class:`MeshMetrics` in its own ``CollectorRegistry`` — never at import time,
and never in prometheus-client's global registry — and from then on workers
built without an explicit observer report to it, and :func:`count_verification`,
:func:`set_peer_trust`, :func:`count_evidence` and :func:`set_awaited` record
into it. Before :func:`enable` those functions do nothing.

prometheus-client is the optional ``observe`` extra: it is imported only when
metrics are enabled, and its absence is a clear :class:`UsageError`.

Metric names (all ``meshjobs_``; counters end in ``_total``, durations are seconds):

=====================================================  =========  ===========================================
name                                                   type       labels
=====================================================  =========  ===========================================
``meshjobs_jobs_total``                                counter    capability, path (queue|direct|durable), outcome
``meshjobs_job_duration_seconds``                      histogram  capability, path
``meshjobs_jobs_in_flight``                            gauge      capability
``meshjobs_rejections_total``                          counter    reason (the wire reason code)
``meshjobs_durable_redeliveries_total``                counter    capability
``meshjobs_durable_dead_lettered_total``               counter    capability
``meshjobs_verification_executions_total``             counter    capability, outcome
``meshjobs_peer_trust_score``                          gauge      peer
``meshjobs_peer_quarantined``                          gauge      peer (1 quarantined, 0 not)
``meshjobs_evidence_total``                            counter    outcome (folded|duplicate|invalid)
``meshjobs_awaited_jobs``                              gauge      state (pending|done)
=====================================================  =========  ===========================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshjobs.errors import UsageError

#: Latency buckets, seconds: sub-millisecond no-ops up to jobs of minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class JobObserver:
    """What a worker reports as it works. This base ignores everything; subclass what you need.

    *path* is how the job arrived: ``queue`` (the capability's queue group),
    ``direct`` (the peer's own subject) or ``durable`` (JetStream). *outcome*
    is the signed result's status (``ok``, ``error``, ``invalid``,
    ``timeout``, ``rejected``). Methods are called on the event loop and
    must not block.
    """

    def job_started(self, capability: str, path: str) -> None:
        """A job was accepted and starts (waiting for a slot counts as started)."""

    def job_finished(self, capability: str, path: str, outcome: str, seconds: float, error: str | None) -> None:
        """A started job has a signed result after *seconds*; *error* is its message when it failed."""

    def rejected(self, reason: str) -> None:
        """A message was refused with this reason code before any handler ran."""

    def redelivered(self, capability: str) -> None:
        """JetStream delivered a durable job again (a retry after a failure, or after a lost worker)."""

    def dead_lettered(self, capability: str) -> None:
        """A durable job went to the dead-letter queue."""


class Observers(JobObserver):
    """Several observers as one, called in order."""

    def __init__(self, observers: Iterable[JobObserver | None]) -> None:
        self.observers = tuple(o for o in observers if o is not None)

    def job_started(self, capability: str, path: str) -> None:
        for o in self.observers:
            o.job_started(capability, path)

    def job_finished(self, capability: str, path: str, outcome: str, seconds: float, error: str | None) -> None:
        for o in self.observers:
            o.job_finished(capability, path, outcome, seconds, error)

    def rejected(self, reason: str) -> None:
        for o in self.observers:
            o.rejected(reason)

    def redelivered(self, capability: str) -> None:
        for o in self.observers:
            o.redelivered(capability)

    def dead_lettered(self, capability: str) -> None:
        for o in self.observers:
            o.dead_lettered(capability)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError("metrics need prometheus-client: pip install 'meshjobs[observe]'") from None
    return prometheus_client


class MeshMetrics:
    """One process's metrics, in a registry of their own (pass one to share it)."""

    def __init__(self, registry: Any = None) -> None:
        prom = _prometheus()
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.jobs = prom.Counter(
            "meshjobs_jobs", "Jobs this worker finished, by how they arrived and their outcome.",
            ["capability", "path", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = prom.Histogram(
            "meshjobs_job_duration_seconds", "Seconds from accepting a job to its signed result.",
            ["capability", "path"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = prom.Gauge(
            "meshjobs_jobs_in_flight", "Jobs accepted and not finished.", ["capability"], registry=r
        )
        self.rejections = prom.Counter(
            "meshjobs_rejections", "Messages refused before any handler ran, by reason code.", ["reason"], registry=r
        )
        self.redeliveries = prom.Counter(
            "meshjobs_durable_redeliveries", "Durable jobs delivered again.", ["capability"], registry=r
        )
        self.dead_lettered = prom.Counter(
            "meshjobs_durable_dead_lettered", "Durable jobs moved to the dead-letter queue.", ["capability"], registry=r
        )
        self.verifications = prom.Counter(
            "meshjobs_verification_executions",
            "Extra executions run to check a result on independent peers, by outcome.",
            ["capability", "outcome"], registry=r,
        )  # fmt: skip
        self.trust_score = prom.Gauge(
            "meshjobs_peer_trust_score", "Current reputation score (0-1).", ["peer"], registry=r
        )
        self.quarantined = prom.Gauge(
            "meshjobs_peer_quarantined", "1 while the peer is quarantined, else 0.", ["peer"], registry=r
        )
        self.evidence = prom.Counter(
            "meshjobs_evidence",
            "Evidence the trust service processed since it started, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.awaited = prom.Gauge(
            "meshjobs_awaited_jobs", "Durable jobs this submitter waits for, by state.", ["state"], registry=r
        )

    def observer(self) -> JobObserver:
        """An observer that records a worker's jobs here."""
        return MetricsObserver(self)

    def text(self) -> str:
        """The exposition text, as a scrape would see it."""
        return str(_prometheus().generate_latest(self.registry).decode())


class MetricsObserver(JobObserver):
    """Records a worker's jobs into :class:`MeshMetrics`."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics

    def job_started(self, capability: str, path: str) -> None:
        self.metrics.in_flight.labels(capability).inc()

    def job_finished(self, capability: str, path: str, outcome: str, seconds: float, error: str | None) -> None:
        m = self.metrics
        m.in_flight.labels(capability).dec()
        m.jobs.labels(capability, path, outcome).inc()
        m.duration.labels(capability, path).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.metrics.rejections.labels(reason).inc()

    def redelivered(self, capability: str) -> None:
        self.metrics.redeliveries.labels(capability).inc()

    def dead_lettered(self, capability: str) -> None:
        self.metrics.dead_lettered.labels(capability).inc()


# -- the process's metrics -----------------------------------------------------------

_lock = threading.Lock()
_active: MeshMetrics | None = None


def enable(registry: Any = None) -> MeshMetrics:
    """Create this process's metrics (once; later calls return the same object)."""
    global _active
    with _lock:
        if _active is None:
            _active = MeshMetrics(registry)
        return _active


def active() -> MeshMetrics | None:
    """This process's metrics, or None when nobody enabled them."""
    return _active


def process_observer() -> JobObserver | None:
    """An observer for this process's metrics, or None when they are off."""
    metrics = _active
    return metrics.observer() if metrics is not None else None


def count_verification(capability: str, outcome: str, executions: int = 1) -> None:
    """Count *executions* runs made to verify a result (routers and submitters call this)."""
    if _active is not None:
        _active.verifications.labels(capability, outcome).inc(executions)


def set_peer_trust(peer: str, score: float, quarantined: bool) -> None:
    """Publish a peer's current score and quarantine state (the trust service calls this)."""
    if _active is not None:
        _active.trust_score.labels(peer).set(score)
        _active.quarantined.labels(peer).set(1 if quarantined else 0)


def count_evidence(outcome: str) -> None:
    """Count one piece of evidence the trust service processed: ``folded``, ``duplicate`` or ``invalid``."""
    if _active is not None:
        _active.evidence.labels(outcome).inc()


def forget_peer(peer: str) -> None:
    """Stop exporting a peer's trust gauges (it left the mesh)."""
    if _active is None:
        return
    for gauge in (_active.trust_score, _active.quarantined):
        try:
            gauge.remove(peer)
        except KeyError:
            pass


def set_awaited(pending: int, done: int) -> None:
    """How many durable jobs a waiting submitter still waits for, and how many are done."""
    if _active is not None:
        _active.awaited.labels("pending").set(pending)
        _active.awaited.labels("done").set(done)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); :meth:`close` stops it."""

    host: str
    port: int
    metrics: MeshMetrics
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(port: int, host: str = "127.0.0.1", metrics: MeshMetrics | None = None) -> MetricsServer:
    """Serve this process's metrics (enabled here if needed) on ``http://HOST:PORT/metrics``.

    *port* 0 picks a free one (see :attr:`MetricsServer.port`). Loopback by
    default: metrics name peers and capabilities, so exposing them further is
    the operator's choice.
    """
    metrics = metrics or enable()
    try:
        server, thread = _prometheus().start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(host, int(server.server_port), metrics, server, thread)
