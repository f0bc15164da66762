"""Mesh state in JetStream KV buckets of the hub domain, reachable from any node or leaf.

Two nats-py gaps are worked around here, and only here:

- ``create_key_value(placement=...)`` ignores placement, so the bucket's
  ``KV_<bucket>`` stream is created by us with replicas and placement;
- KV writes publish on raw ``$KV.<bucket>.<key>``, which never crosses a leaf
  link; we publish on ``$JS.<domain>.API.$KV.<bucket>.<key>`` instead, as
  nats.go does. Reads and watches go through the domain and work as they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Placement,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from .errors import ConnectError, UsageError

DOMAIN = "hub"
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WRONG_LAST_SEQUENCE = 10071


class KeyExists(Exception):
    """A create or compare-and-set lost: the key is not at the expected revision."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class MeshKV:
    """One KV bucket of mesh state. Writes go through the hub domain, so they work from leaves."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, domain: str | None) -> None:
        self._js = js
        self._kv = kv
        # Reads through the stream leader instead of any replica ("direct get").
        self._leader_kv = KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=False)
        self._direct_works = True
        self.bucket = bucket
        self.write_timeout = 30.0
        self._write_prefix = f"$JS.{domain}.API.$KV.{bucket}." if domain else f"$KV.{bucket}."

    async def get(self, key: str) -> Entry | None:
        """The current value, or None when the key does not exist (or was deleted)."""
        try:
            if self._direct_works:
                try:
                    entry = await self._kv.get(key)
                except nats.errors.TimeoutError:
                    # nats-server#4819: a direct get from a leaf attached to a
                    # region without replicas of the bucket never gets its
                    # answer. Reads through the leader do; use them from now on.
                    self._direct_works = False
                    entry = await self._leader_kv.get(key)
            else:
                entry = await self._leader_kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return Entry(key, entry.value or b"", int(entry.revision or 0))

    async def put(self, key: str, value: bytes) -> int:
        """Write *value*; returns the new revision."""
        return await self._publish(key, value, None)

    async def create(self, key: str, value: bytes) -> int:
        """Write only if the key does not exist (or was deleted); raises :class:`KeyExists` otherwise."""
        try:
            return await self._publish(key, value, 0)
        except KeyExists:
            try:
                await self._leader_kv.get(key)
            except nats.js.errors.KeyNotFoundError as missing:
                # A deleted key keeps a marker (nats-py reports it as "not
                # found", with the marker's entry): create over the marker,
                # as nats-py's own create does.
                entry = getattr(missing, "entry", None)
                if entry is not None and entry.revision:
                    return await self._publish(key, value, int(entry.revision))
            raise

    async def delete(self, key: str) -> int:
        """Mark the key deleted (its history keeps what it was)."""
        return await self._publish(key, b"", None, {"KV-Operation": "DEL"})

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Compare-and-set: write only if the key is still at revision *last*."""
        return await self._publish(key, value, last)

    async def _publish(self, key: str, value: bytes, last: int | None, extra: dict[str, str] | None = None) -> int:
        # Every logical write carries one message id, so a retry after a
        # timeout whose write was in fact applied is deduplicated by
        # JetStream (it answers with the first write's ack) instead of
        # applied twice or failing its own compare-and-set.
        headers = {"Nats-Msg-Id": uuid.uuid4().hex, **(extra or {})}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        try:
            ack = await publish_retrying(
                self._js, self._write_prefix + key, value, headers, self.write_timeout, f"write to {self.bucket}/{key}"
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise KeyExists(f"{self.bucket}/{key} is not at revision {last}") from None
            raise
        return int(ack.seq)


#: 503 answers that are not transient: the stream is full (messages, bytes).
FULL_STREAM_CODES = frozenset({10077, 10027, 10078})


async def publish_retrying(
    js: JetStreamContext, subject: str, data: bytes, headers: dict[str, str], timeout: float, what: str
) -> PubAck:
    """Publish to a stream, retrying 503 and missing answers with backoff (nats-py does not) within *timeout*.

    Other API errors, and a full stream (also a 503), are raised for the
    caller to interpret. Give *headers* a ``Nats-Msg-Id`` so a retry whose
    first attempt was stored is deduplicated.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    while True:
        try:
            return await js.publish(subject, data, headers=headers)
        except nats.js.errors.APIError as exc:
            if not isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.err_code in FULL_STREAM_CODES:
                raise
            problem: Exception = exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
            problem = exc
        if loop.time() + delay > deadline:
            raise ConnectError(f"{what} not acknowledged: {problem}") from problem
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def read_subject(js: JetStreamContext, stream: str, subject: str, *, last_per_subject: bool = False) -> list[Msg]:
    """Every message of *subject* in *stream* (or the last of each subject), oldest first.

    Read with an ephemeral pull consumer: pull requests are request/reply,
    which crosses leaf links and gateways like any other request.
    """
    policy = DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=policy, inactive_threshold=30.0, max_ack_pending=-1
    )
    sub = await js.pull_subscribe(subject, durable=None, stream=stream, config=config)
    out: list[Msg] = []
    try:
        remaining = (await sub.consumer_info()).num_pending or 0
        while remaining > 0:
            msgs = await sub.fetch(min(remaining, 256), timeout=5)
            remaining -= len(msgs)
            out += msgs
    finally:
        await sub.unsubscribe()
    return out


def _kv_config(bucket: str, replicas: int, placement: str | None, history: int) -> StreamConfig:
    # The same settings nats-py's create_key_value uses, plus placement.
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        max_msgs_per_subject=history,
        discard=DiscardPolicy.NEW,
        storage=StorageType.FILE,
        num_replicas=replicas,
        placement=Placement(cluster=placement) if placement else None,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        duplicate_window=120.0,
    )


#: JetStream answers this on a single server asked for more than one replica.
#: (A cluster short of servers answers "insufficient resources" instead; that
#: is retried, never taken as a reason to create under-replicated state.)
_NOT_CLUSTERED = {10074}


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, timeout: float = 10.0) -> None:
    """Create *config*'s stream if missing; retry 503 with backoff within *timeout*.

    ``num_replicas=None`` means three replicas where the cluster has the
    servers for it, one on a single server such as ``meshjobs up``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.1
    replicas = [config.num_replicas] if config.num_replicas else [3, 1]
    while True:
        try:
            for count in replicas:
                try:
                    await js.add_stream(dataclasses.replace(config, num_replicas=count))
                    return
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code == 10058:  # exists already (perhaps with other settings)
                        return
                    if exc.err_code == 10023:  # insufficient resources: a cluster still forming
                        raise nats.js.errors.ServiceUnavailableError(err_code=10023) from exc
                    if exc.err_code in _NOT_CLUSTERED and count != replicas[-1]:
                        continue
                    raise
                except nats.js.errors.ServerError as exc:
                    if exc.err_code in _NOT_CLUSTERED and count != replicas[-1]:
                        continue
                    if exc.err_code == 10023:
                        raise nats.js.errors.ServiceUnavailableError(err_code=10023) from exc
                    raise
            return
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if loop.time() + delay > deadline:
                raise ConnectError(f"JetStream did not answer: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def open_bucket(
    nc: NATS,
    bucket: str,
    *,
    domain: str | None = DOMAIN,
    replicas: int | None = 1,
    placement: str | None = None,
    history: int = 1,
    create: bool = True,
    timeout: float = 10.0,
) -> MeshKV:
    """Open (and by default create) a bucket of mesh state in the hub domain.

    ``replicas=None`` picks three where the cluster allows, else one. JetStream
    may answer 503 while a cluster elects leaders; that is retried with
    backoff within *timeout*.
    """
    if not _BUCKET_RE.match(bucket):
        raise UsageError(f"invalid bucket name {bucket!r}")
    js = nc.jetstream(domain=domain, timeout=min(timeout, 2.0))
    if create:
        config = _kv_config(bucket, replicas or 0, placement, history)
        await ensure_stream(js, dataclasses.replace(config, num_replicas=replicas), timeout=timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.1
    while True:
        try:
            kv = await js.key_value(bucket)
            return MeshKV(js, kv, bucket, domain)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            if loop.time() + delay > deadline:
                raise ConnectError(f"JetStream in domain {domain!r} did not answer: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def watch_bucket(kv: MeshKV, on_entry: Callable[[Entry], None], ready: asyncio.Event) -> None:
    """Feed every current and future entry of *kv* to *on_entry*; set *ready* once caught up.

    Runs until cancelled. A broken watch (for example across a leader change)
    is restarted.
    """
    while True:
        watcher = await kv._kv.watchall()  # noqa: SLF001 - our own wrapper's KeyValue
        try:
            async for update in watcher:
                if update is None:  # marks the end of the current values
                    ready.set()
                    continue
                on_entry(Entry(update.key, update.value or b"", int(update.revision or 0)))
            ready.set()
        except (TimeoutError, nats.errors.Error):
            await asyncio.sleep(0.5)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except nats.errors.Error:
                pass  # the connection is closing: nothing left to stop
