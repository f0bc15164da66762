"""Discovery over the NATS services protocol (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``).

Every worker answers as service ``meshjobs`` so standard NATS tooling
(``nats micro ls``) sees it too. Its metadata carries the peer key, display
name, kind, region and community; each capability is an endpoint.

We answer the protocol ourselves rather than through ``nats.micro`` because
micro runs each endpoint's handler serially and times it, while our handlers
run concurrently and keep their own statistics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

SERVICE_NAME = "meshjobs"
INFO_TYPE = "io.nats.micro.v1.info_response"
PING_TYPE = "io.nats.micro.v1.ping_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"
MAX_REPLY_BYTES = 1024 * 1024


@dataclass
class EndpointStats:
    """Counters for one endpoint, in the units the protocol uses (nanoseconds)."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0
    last_error: str = ""

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


class ServiceResponder:
    """Answers ``$SRV`` requests for one worker process."""

    def __init__(self, instance_id: str, version: str, description: str, metadata: dict[str, str]) -> None:
        self.instance_id = instance_id
        self.version = version
        self.description = description
        self.metadata = metadata
        self.endpoints: list[Endpoint] = []
        self.started = datetime.now(UTC)
        self._subs: list[Subscription] = []

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "name": SERVICE_NAME,
            "id": self.instance_id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def info(self) -> dict[str, Any]:
        return {
            **self._identity(INFO_TYPE),
            "description": self.description,
            "endpoints": [
                {"name": e.name, "subject": e.subject, "queue_group": e.queue_group, "metadata": e.metadata}
                for e in self.endpoints
            ],
        }

    def stats(self) -> dict[str, Any]:
        endpoints = []
        for e in self.endpoints:
            s = e.stats
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
                }
            )
        started = self.started.isoformat().replace("+00:00", "Z")
        return {**self._identity(STATS_TYPE), "started": started, "endpoints": endpoints}

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
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()


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
        await sub.unsubscribe()
    return replies


@dataclass(frozen=True)
class PeerInfo:
    """One worker process as discovery sees it."""

    peer: str
    name: str
    kind: str
    region: str
    community: str
    instance: str
    version: str
    capabilities: tuple[str, ...]
    deterministic: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "name": self.name,
            "kind": self.kind,
            "region": self.region,
            "community": self.community,
            "instance": self.instance,
            "version": self.version,
            "capabilities": list(self.capabilities),
            "deterministic": list(self.deterministic),
        }


def _as_peer(info: dict[str, Any]) -> PeerInfo | None:
    if info.get("type") != INFO_TYPE or info.get("name") != SERVICE_NAME:
        return None
    meta = info.get("metadata") or {}
    endpoints = info.get("endpoints") or []
    if not isinstance(meta, dict) or not isinstance(endpoints, list):
        return None
    metas = [
        e["metadata"]
        for e in endpoints
        if isinstance(e, dict) and isinstance(e.get("metadata"), dict) and "capability" in e["metadata"]
    ]
    caps = sorted({str(m["capability"]) for m in metas})
    deterministic = sorted({str(m["capability"]) for m in metas if m.get("deterministic") == "true"})
    return PeerInfo(
        peer=str(meta.get("peer", "")),
        name=str(meta.get("name", "")),
        kind=str(meta.get("kind", "")),
        region=str(meta.get("region", "")),
        community=str(meta.get("community", "")),
        instance=str(info.get("id", "")),
        version=str(info.get("version", "")),
        capabilities=tuple(caps),
        deterministic=tuple(deterministic),
    )


async def discover(nc: NATS, *, timeout: float = 1.0, capability: str | None = None) -> list[PeerInfo]:
    """Every meshjobs worker that answers ``$SRV.INFO.meshjobs`` within *timeout*.

    Discovery metadata is self-reported and unsigned: it is for display and
    routing hints, never for identity (results are verified by signature).
    """
    peers = [p for p in map(_as_peer, await collect(nc, f"$SRV.INFO.{SERVICE_NAME}", timeout=timeout)) if p]
    if capability is not None:
        peers = [p for p in peers if capability in p.capabilities]
    return sorted(peers, key=lambda p: (p.region, p.community, p.name, p.peer, p.instance))
