"""Discovery over the NATS services protocol (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``).

Every worker answers as service ``meshjobs`` so standard NATS tooling
(``nats micro ls``) sees it too. Its metadata carries the peer key, display
name, kind, region and community; each capability is an endpoint. What
meshjobs acts on is the ``manifest`` metadata field: the same facts signed by
the peer's key (:mod:`meshjobs.manifest`), with any attestations operators
gave it. An answer without a valid manifest for the key and instance that
answered is not a peer.

We answer the protocol ourselves rather than through ``nats.micro`` because
micro runs each endpoint's handler serially and times it, while our handlers
run concurrently and keep their own statistics. The replies follow the micro
schema exactly (nats-py's ``ServicePing``/``ServiceInfo``/``ServiceStats.from_dict``
parse them; a test holds us to that). ``$SRV.STATS`` counts the jobs each
endpoint ran: the queue-group and direct subjects for live jobs, and a
``<capability>-durable`` endpoint (subject ``mesh.jobs.<capability>``, queue
group: the shared JetStream consumer) for durable runs, whose ``data`` adds
redeliveries and dead-lettered jobs. Refusals before any handler ran are not
requests here; Prometheus counts them by reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from meshjobs.compare import EXACT
from meshjobs.errors import MeshError
from meshjobs.manifest import ATTESTABLE, open_manifest
from meshjobs.observe.metrics import JobObserver
from meshjobs.subjects import PEER_QUEUE

SERVICE_NAME = "meshjobs"
INFO_TYPE = "io.nats.micro.v1.info_response"
PING_TYPE = "io.nats.micro.v1.ping_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"
MAX_REPLY_BYTES = 1024 * 1024
log = logging.getLogger("meshjobs.discovery")


DURABLE_SUFFIX = "-durable"


@dataclass
class EndpointStats:
    """Counters for one endpoint, in the units the protocol uses (nanoseconds)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0
    last_error: str = ""
    redeliveries: int = 0
    dead_lettered: int = 0

    def record(self, elapsed_ns: int, error: str | None = None) -> None:
        self.num_requests += 1
        self.processing_time += elapsed_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = error[:256]


@dataclass
class Endpoint:
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]
    stats: EndpointStats = field(default_factory=EndpointStats)

    @property
    def path(self) -> str:
        """How jobs reach this endpoint: ``queue``, ``direct`` or ``durable`` (as :class:`JobObserver` says)."""
        if self.name.endswith(DURABLE_SUFFIX):
            return "durable"
        return "direct" if self.queue_group == PEER_QUEUE else "queue"


class EndpointStatsObserver(JobObserver):
    """Keeps the ``$SRV.STATS`` counters of a responder's endpoints from what the worker reports."""

    def __init__(self, responder: ServiceResponder) -> None:
        self.responder = responder

    def _endpoint(self, capability: str, path: str) -> Endpoint | None:
        for endpoint in self.responder.all_endpoints():
            if endpoint.metadata.get("capability") == capability and endpoint.path == path:
                return endpoint
        return None

    def job_finished(self, capability: str, path: str, outcome: str, seconds: float, error: str | None) -> None:
        if (endpoint := self._endpoint(capability, path)) is not None:
            endpoint.stats.record(int(seconds * 1e9), None if outcome == "ok" else (error or outcome))

    def redelivered(self, capability: str) -> None:
        if (endpoint := self._endpoint(capability, "durable")) is not None:
            endpoint.stats.redeliveries += 1

    def dead_lettered(self, capability: str) -> None:
        if (endpoint := self._endpoint(capability, "durable")) is not None:
            endpoint.stats.dead_lettered += 1


class ServiceResponder:
    """Answers ``$SRV`` requests for one worker process."""

    def __init__(self, instance_id: str, version: str, description: str, metadata: dict[str, str]) -> None:
        self.instance_id = instance_id
        self.version = version
        self.description = description
        self.metadata = metadata
        self.endpoints: list[Endpoint] = []
        """The endpoints jobs arrive on (the worker subscribes to each)."""
        self.durable_names: Callable[[str], tuple[str, str]] | None = None
        """Capability -> (subject, consumer) of its durable queue, when the worker consumes durable jobs:
        each queue endpoint then gets a ``-durable`` twin in INFO and STATS (jobs are pulled, not
        delivered on that subject, so it is never in :attr:`endpoints`)."""
        self._durable_stats: dict[str, EndpointStats] = {}
        self.manifest: Callable[[], str] | None = None
        """Signs a fresh manifest for each INFO answer (free slots change), when set."""
        self.started = datetime.now(UTC)
        self._subs: list[Subscription] = []

    def all_endpoints(self) -> list[Endpoint]:
        """:attr:`endpoints`, each queue endpoint followed by its durable twin when there is one."""
        if self.durable_names is None:
            return list(self.endpoints)
        out = []
        for e in self.endpoints:
            out.append(e)
            capability = e.metadata.get("capability")
            if e.path == "queue" and capability:
                subject, consumer = self.durable_names(capability)
                stats = self._durable_stats.setdefault(capability, EndpointStats())
                out.append(Endpoint(f"{e.name}{DURABLE_SUFFIX}", subject, consumer, e.metadata, stats))
        return out

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "name": SERVICE_NAME,
            "id": self.instance_id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def info(self) -> dict[str, Any]:
        identity = self._identity(INFO_TYPE)
        if self.manifest is not None:
            identity["metadata"] = {**self.metadata, "manifest": self.manifest()}
        return {
            **identity,
            "description": self.description,
            "endpoints": [
                {"name": e.name, "subject": e.subject, "queue_group": e.queue_group, "metadata": e.metadata}
                for e in self.all_endpoints()
            ],
        }

    def stats(self) -> dict[str, Any]:
        endpoints = []
        for e in self.all_endpoints():
            s = e.stats
            data: dict[str, Any] = {"path": e.path}
            if e.path == "durable":
                data.update(redeliveries=s.redeliveries, dead_lettered=s.dead_lettered)
            endpoints.append(
                {
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": e.queue_group,
                    "num_requests": s.num_requests,
                    "num_errors": s.num_errors,
                    "last_error": s.last_error,
                    "processing_time": s.processing_time,
                    "average_processing_time": s.processing_time // s.num_requests if s.num_requests else 0,
                    "data": data,
                }
            )
        # RFC 3339 with a fraction always present: micro clients parse "%Y-%m-%dT%H:%M:%S.%fZ"
        # (isoformat() drops the fraction when the microseconds happen to be zero).
        started = self.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {**self._identity(STATS_TYPE), "started": started, "endpoints": endpoints}

    def stats_observer(self) -> JobObserver:
        """An observer that keeps this responder's ``$SRV.STATS`` counters."""
        return EndpointStatsObserver(self)

    async def start(self, nc: NATS) -> None:
        answers: dict[str, Callable[[], dict[str, Any]]] = {
            "PING": lambda: self._identity(PING_TYPE),
            "INFO": self.info,
            "STATS": self.stats,
        }
        for verb, answer in answers.items():

            async def handler(msg: Msg, answer: Callable[[], dict[str, Any]] = answer) -> None:
                if msg.reply:
                    await nc.publish(msg.reply, json.dumps(answer()).encode())

            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{SERVICE_NAME}",
                f"$SRV.{verb}.{SERVICE_NAME}.{self.instance_id}",
            ):
                self._subs.append(await nc.subscribe(subject, cb=handler))

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:  # the connection is closed already: nothing to stop
                pass


async def collect(nc: NATS, subject: str, *, timeout: float = 1.0, stall: float = 0.25) -> list[dict[str, Any]]:
    """Publish one request and gather every JSON reply until *timeout* or a quiet *stall*.

    ``nc.request`` returns only the first reply; discovery needs them all.
    """
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        await queue.put(msg)

    sub = await nc.subscribe(inbox, cb=on_reply)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + timeout
        wait = timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(queue.get(), min(left, wait))
            except TimeoutError:
                break
            wait = stall
            if len(msg.data) > MAX_REPLY_BYTES or (msg.headers and msg.headers.get("Status")):
                continue
            try:
                reply = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(reply, dict):
                replies.append(reply)
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.ConnectionClosedError:
            pass  # closed while we listened: nothing left to stop
    return replies


@dataclass(frozen=True)
class PeerInfo:
    """One worker process as its signed manifest describes it."""

    peer: str
    name: str
    kind: str
    region: str
    community: str
    instance: str
    version: str
    capabilities: tuple[str, ...]
    deterministic: tuple[str, ...] = ()
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(capability, its tags) pairs: the specialties the worker claims for each."""
    comparisons: tuple[tuple[str, str], ...] = ()
    """(capability, comparison) pairs for capabilities not compared exactly (see :mod:`meshjobs.compare`)."""
    attested: tuple[str, ...] = ()
    """Which of kind, region and community an operator of the reader's policy vouches for
    (those fields then hold the operator's values); the rest are the peer's own claim."""
    attesters: tuple[str, ...] = ()
    price: float = 0.0
    slots: int = 0
    """Jobs it could start when it answered discovery."""

    def tags_of(self, capability: str) -> tuple[str, ...]:
        return dict(self.tags).get(capability, ())

    def compare_of(self, capability: str) -> str:
        """How this worker says results of *capability* compare (``exact`` unless it declared otherwise)."""
        return dict(self.comparisons).get(capability, EXACT)

    def is_attested(self, field: str) -> bool:
        return field in self.attested

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "name": self.name,
            "kind": self.kind,
            "region": self.region,
            "community": self.community,
            "attested": list(self.attested),
            "attesters": list(self.attesters),
            "instance": self.instance,
            "version": self.version,
            "capabilities": list(self.capabilities),
            "deterministic": list(self.deterministic),
            "tags": {cap: list(tags) for cap, tags in self.tags},
            "compare": dict(self.comparisons),
            "price": self.price,
            "slots": self.slots,
        }


_refused: set[str] = set()


def _as_peer(info: dict[str, Any], operators: frozenset[str]) -> PeerInfo | None:
    """The peer behind one INFO answer, if it carries a valid manifest for the key and instance that answered."""
    if info.get("type") != INFO_TYPE or info.get("name") != SERVICE_NAME:
        return None
    meta = info.get("metadata") or {}
    frame = meta.get("manifest") if isinstance(meta, dict) else None
    instance = str(info.get("id", ""))
    if not isinstance(frame, str):
        return None
    try:
        checked = open_manifest(frame, operators)
    except MeshError as exc:
        _log_refusal(instance, f"its manifest is refused: {exc}")
        return None
    m = checked.manifest
    if m.instance != instance or meta.get("peer") != m.peer:
        _log_refusal(instance, "its manifest names another key or instance than the answer")
        return None
    return PeerInfo(
        peer=m.peer,
        name=m.name,
        kind=checked.attested.get("kind", m.kind),
        region=checked.attested.get("region", m.region),
        community=checked.attested.get("community", m.community),
        instance=instance,
        version=str(info.get("version", "")),
        capabilities=tuple(sorted({o.name for o in m.capabilities})),
        deterministic=tuple(sorted({o.name for o in m.capabilities if o.deterministic})),
        tags=tuple(sorted((o.name, tuple(o.tags)) for o in m.capabilities)),
        comparisons=tuple(sorted((o.name, o.compare) for o in m.capabilities if o.compare)),
        attested=tuple(f for f in ATTESTABLE if f in checked.attested),
        attesters=checked.attesters,
        price=m.price,
        slots=m.slots,
    )


def _log_refusal(instance: str, why: str) -> None:
    """Say once per instance why a discovery answer was not taken as a peer."""
    if instance in _refused or len(_refused) >= 10_000:
        return
    _refused.add(instance)
    level = logging.WARNING if len(_refused) <= 20 else logging.DEBUG  # a flood of fakes stays quiet
    log.log(level, "discovery: ignored the answer of instance %r: %s", instance[:32], why)


async def discover(
    nc: NATS, *, timeout: float = 1.0, capability: str | None = None, operators: frozenset[str] = frozenset()
) -> list[PeerInfo]:
    """Every meshjobs worker that answers ``$SRV.INFO.meshjobs`` within *timeout* with a valid manifest.

    The manifest is signed by the peer's key, so no peer can advertise
    another's key or capabilities; kind, region and community count as
    attested only where an operator in *operators* signed for them (see
    :mod:`meshjobs.manifest`). Results are still verified by signature.
    """
    replies = await collect(nc, f"$SRV.INFO.{SERVICE_NAME}", timeout=timeout)
    peers = [p for p in (_as_peer(r, operators) for r in replies) if p]
    if capability is not None:
        peers = [p for p in peers if capability in p.capabilities]
    return sorted(peers, key=lambda p: (p.region, p.community, p.name, p.peer, p.instance))
