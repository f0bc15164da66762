"""Mesh state in JetStream KV buckets of the hub domain, reachable from any node or leaf.

Two nats-py gaps are worked around here, and only here:

- ``create_key_value(placement=...)`` ignores placement, so the bucket's
  ``KV_<bucket>`` stream is created by us with replicas and placement;
- KV writes publish on raw ``$KV.<bucket>.<key>``, which never crosses a leaf
  link; we publish on ``$JS.<domain>.API.$KV.<bucket>.<key>`` instead, as
  nats.go does. Reads and watches go through the domain and work as they are;
- a KV watch's "caught up" marker can come before the history it announces
  (see :class:`Replay`): every watch of mesh state goes through :func:`replay`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

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
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from meshjobs._nats import denied
from meshjobs.errors import ConnectError, KeyExists, Reason, Rejected, UsageError

log = logging.getLogger("meshjobs.state")

DOMAIN = "hub"
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WRONG_LAST_SEQUENCE = 10071


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class MeshKV:
    """One KV bucket of mesh state. Writes go through the hub domain, so they work from leaves."""

    def __init__(
        self, js: JetStreamContext, kv: KeyValue, bucket: str, domain: str | None, *, nc: NATS | None = None
    ) -> None:
        self._js = js
        self._nc = nc  # to tell a write the server refused from a slow one
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

    async def watchall(self) -> Replay:
        """A watch over every key: current values, a ``None`` marker, then updates."""
        return await replay(self._js, self.bucket, history=False, kv=self._kv)

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
                self._js,
                self._write_prefix + key,
                value,
                headers,
                self.write_timeout,
                f"write to {self.bucket}/{key}",
                nc=self._nc,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise KeyExists(f"{self.bucket}/{key} is not at revision {last}") from None
            raise
        return int(ack.seq)


#: 503 answers that are not transient: the stream is full (messages, bytes).
FULL_STREAM_CODES = frozenset({10077, 10027, 10078})

#: What JetStream answers while it elects leaders or a cluster forms: worth another try.
TRANSIENT = (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError)

T = TypeVar("T")


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    what: str,
    first_delay: float = 0.05,
    refused: Callable[[], str | None] | None = None,
) -> T:
    """Run *op* until it succeeds, retrying :data:`TRANSIENT` failures with backoff within *timeout* seconds.

    The one retry loop of mesh state: nats-py does not retry 503 from
    JetStream. A full stream (also a 503) is not transient and is raised, as is
    any other error; running out of time raises :class:`ConnectError`. A
    request the server refused (a permissions violation looks like a timeout
    to nats-py) is not retried: *refused* names the refused subject, if any,
    and :class:`Rejected` (``denied``) is raised at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = first_delay
    while True:
        try:
            return await op()
        except (*TRANSIENT, nats.js.errors.NoStreamResponseError) as exc:
            if isinstance(exc, nats.js.errors.APIError) and exc.err_code in FULL_STREAM_CODES:
                raise
            if refused is not None and (subject := refused()):
                raise Rejected(Reason.DENIED, f"{what}: this key may not publish to {subject}") from exc
            if loop.time() + delay > deadline:
                raise ConnectError(f"{what}: JetStream did not answer: {exc}") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def publish_retrying(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    headers: dict[str, str],
    timeout: float,
    what: str,
    *,
    nc: NATS | None = None,
) -> PubAck:
    """Publish to a stream, retrying 503 and missing answers (see :func:`retrying`).

    Give *headers* a ``Nats-Msg-Id`` so a retry whose first attempt was stored
    is deduplicated. With *nc*, a publish the server refused fails at once.
    """
    return await retrying(
        lambda: js.publish(subject, data, headers=headers), timeout=timeout, what=what, refused=_refusal(nc, subject)
    )


def _refusal(nc: NATS | None, *subjects: str) -> Callable[[], str | None] | None:
    """A check for :func:`retrying`: the first of *subjects* the server refused on *nc*."""
    if nc is None:
        return None
    return lambda: next((s for s in subjects if denied(nc, s)), None)


async def read_subject(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    last_per_subject: bool = False,
    start_seq: int | None = None,
    limit: int | None = None,
    timeout: float = 10.0,
) -> list[Msg]:
    """Every message of *subject* in *stream* (or the last of each subject), oldest first.

    *start_seq* starts at that stream sequence; *limit* stops after that many
    messages. Read with an ephemeral pull consumer: pull requests are
    request/reply, which crosses leaf links and gateways like any other
    request. A pull made before the new consumer's interest has reached the
    server we are connected to is answered 503 (no responders): that, like any
    :data:`TRANSIENT` failure, is retried within *timeout* seconds.
    """
    if last_per_subject:
        policy = DeliverPolicy.LAST_PER_SUBJECT
    elif start_seq is not None:
        policy = DeliverPolicy.BY_START_SEQUENCE
    else:
        policy = DeliverPolicy.ALL
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=policy,
        opt_start_seq=start_seq,
        filter_subject=subject,
        inactive_threshold=30.0,
        max_ack_pending=-1,
    )
    # Unnamed: the server names the consumer ($JS.API.CONSUMER.CREATE.<stream>),
    # so peers need no right to create named consumers, which would let them
    # redefine somebody else's.
    info = await js.add_consumer(stream, config=config)
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
    out: list[Msg] = []
    try:
        remaining = info.num_pending or 0
        if limit is not None:
            remaining = min(remaining, limit)
        while remaining > 0:
            pull = functools.partial(sub.fetch, min(remaining, 256), timeout=5)
            msgs = await retrying(pull, timeout=timeout, what=f"read {stream} {subject}")
            remaining -= len(msgs)
            out += msgs
    finally:
        await sub.unsubscribe()
    return out


@dataclass(frozen=True)
class StreamSpec:
    """A stream of mesh state, declared by the module that owns it and created by :func:`provision`."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 0.0
    work_queue: bool = False
    max_msgs: int = -1
    duplicate_window_s: float = 120.0

    def config(self, replicas: int | None, placement: str | None) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.WORK_QUEUE if self.work_queue else RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW if self.work_queue else DiscardPolicy.OLD,
            max_msgs=self.max_msgs,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
            num_replicas=replicas,
            placement=Placement(cluster=placement) if placement else None,
        )


@dataclass(frozen=True)
class BucketSpec:
    """A KV bucket of mesh state. Its ``KV_<name>`` stream is ours to create (nats-py ignores placement)."""

    name: str
    history: int = 1
    ttl_s: float = 0.0
    """Keys older than this are dropped (0: kept)."""

    def config(self, replicas: int | None, placement: str | None) -> StreamConfig:
        # The same settings nats-py's create_key_value uses, plus placement.
        return StreamConfig(
            name=f"KV_{self.name}",
            subjects=[f"$KV.{self.name}.>"],
            max_msgs_per_subject=self.history,
            max_age=self.ttl_s,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            num_replicas=replicas,
            placement=Placement(cluster=placement) if placement else None,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            duplicate_window=120.0,
        )


StateSpec = StreamSpec | BucketSpec


#: JetStream answers this on a single server asked for more than one replica.
#: (A cluster short of servers answers "insufficient resources" instead; that
#: is retried, never taken as a reason to create under-replicated state.)
_NOT_CLUSTERED = {10074}
_EXISTS = 10058
_INSUFFICIENT_RESOURCES = 10023


async def _add_stream(js: JetStreamContext, config: StreamConfig) -> None:
    # Look before creating: most keys may read mesh state but only operators
    # may create it, and what exists keeps its settings anyway.
    try:
        await js.stream_info(str(config.name))
        return
    except nats.js.errors.NotFoundError:
        pass
    replicas = [config.num_replicas] if config.num_replicas else [3, 1]
    for count in replicas:
        try:
            await js.add_stream(dataclasses.replace(config, num_replicas=count))
            return
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as exc:
            if exc.err_code == _EXISTS:  # exists already (perhaps with other settings, which it keeps)
                return
            if exc.err_code == _INSUFFICIENT_RESOURCES:  # a cluster still forming
                raise nats.js.errors.ServiceUnavailableError(err_code=_INSUFFICIENT_RESOURCES) from exc
            if exc.err_code in _NOT_CLUSTERED and count != replicas[-1]:
                continue
            raise


async def ensure_stream(
    js: JetStreamContext,
    config: StreamConfig,
    *,
    timeout: float = 10.0,
    nc: NATS | None = None,
    domain: str | None = DOMAIN,
) -> None:
    """Create *config*'s stream if missing, retrying while JetStream is unavailable.

    ``num_replicas=None`` means three replicas where the cluster has the
    servers for it, one on a single server such as ``meshjobs up``. With
    *nc*, a missing stream this key may not create fails at once with
    :class:`Rejected` (``denied``): an operator provisions it.
    """
    api = f"$JS.{domain}.API" if domain else "$JS.API"
    name = str(config.name)
    try:
        await retrying(
            lambda: _add_stream(js, config),
            timeout=timeout,
            what=f"creating {name}",
            first_delay=0.1,
            refused=_refusal(nc, f"{api}.STREAM.INFO.{name}", f"{api}.STREAM.CREATE.{name}"),
        )
    except Rejected as exc:
        hint = "mesh state is provisioned by an operator (`meshjobs mesh up`, `meshjobs up --closed`)"
        raise Rejected(Reason.DENIED, f"{exc.message}; {hint}") from exc


async def provision(
    nc: NATS,
    specs: Iterable[StateSpec],
    *,
    domain: str | None = DOMAIN,
    replicas: int | None = None,
    placement: str | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Create every declared stream and bucket that is missing: the one place mesh state is created.

    Existing ones keep their settings (an operator's ``meshjobs mesh up`` may
    have provisioned them with other replicas and placement). Returns the names.
    """
    js = nc.jetstream(domain=domain, timeout=min(timeout, 2.0))
    names = []
    for spec in specs:
        await ensure_stream(js, spec.config(replicas, placement), timeout=timeout, nc=nc, domain=domain)
        names.append(spec.name)
    return names


async def open_bucket(
    nc: NATS,
    bucket: str | BucketSpec,
    *,
    domain: str | None = DOMAIN,
    replicas: int | None = 1,
    placement: str | None = None,
    create: bool = True,
    timeout: float = 10.0,
) -> MeshKV:
    """Open a bucket of mesh state in the hub domain, provisioning it first unless *create* is false.

    ``replicas=None`` picks three where the cluster allows, else one.
    """
    spec = bucket if isinstance(bucket, BucketSpec) else BucketSpec(bucket)
    if not _BUCKET_RE.match(spec.name):
        raise UsageError(f"invalid bucket name {spec.name!r}")
    if create:
        await provision(nc, [spec], domain=domain, replicas=replicas, placement=placement, timeout=timeout)
    js = nc.jetstream(domain=domain, timeout=min(timeout, 2.0))

    async def lookup() -> MeshKV:
        return MeshKV(js, await js.key_value(spec.name), spec.name, domain, nc=nc)

    return await retrying(lookup, timeout=timeout, what=f"opening bucket {spec.name}", first_delay=0.1)


#: How long a broken watch waits before it is opened again, and the longest stopping one may take.
REWATCH_S = 0.5
STOP_WATCH_S = 5.0

#: How long a replay waits, once nats-py says it is caught up, for revisions it has not handed over yet.
REPLAY_GRACE = 2.0


class Replay:
    """A KV watch whose ``None`` marker comes only after every revision the bucket held when it began.

    nats-py's own marker can come first (in 1 of 30 opens of a bucket holding
    300 revisions, before any of them): it compares the consumer's pending
    count, read after the server has pushed the history, with the messages its
    callback has handled, which may be none yet. A reader trusting it starts
    from part of the state: a quarantine board without an order, a trust
    service without its records. So a replay waits for the stream's last
    sequence as it was before the watch began; should that message be gone
    meanwhile (removed by age), it stops waiting :data:`REPLAY_GRACE` seconds
    after nats-py's marker.
    """

    def __init__(self, watcher: Any, target: int) -> None:
        self.watcher = watcher
        self.target = target

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._updates()

    async def _updates(self) -> AsyncIterator[Any]:
        caught = self.target == 0
        if caught:
            yield None
        early = False  # nats-py said "caught up" before the target arrived
        while True:
            try:
                update = await self.watcher.updates(timeout=REPLAY_GRACE if early and not caught else None)
            except nats.errors.TimeoutError:
                caught = True  # the last revision went away meanwhile: what came is all there is
                yield None
                continue
            if update is KeyValue.KeyWatcher.STOP_ITER:
                return
            if update is None:
                early = not caught
                continue
            yield update
            if not caught and int(update.revision or 0) >= self.target:
                caught = True
                yield None

    async def stop(self) -> None:
        await self.watcher.stop()


async def replay(
    js: JetStreamContext, bucket: str, key: str = ">", *, history: bool = True, kv: KeyValue | None = None
) -> Replay:
    """Watch *key* of *bucket* (``>``: every key): each revision kept (*history*) or the latest, then new ones.

    It reads the stream's info first (``STREAM.INFO`` of ``KV_<bucket>``): where the broker refuses that,
    the watch fails as the consumer would have. *kv*: the bucket already opened.
    """
    stream = f"KV_{bucket}"
    if key == ">":
        state = (await js.stream_info(stream)).state
        target = int(state.last_seq or 0) if state.messages else 0
    else:
        try:
            target = int((await js.get_last_msg(stream, f"$KV.{bucket}.{key}")).seq or 0)
        except nats.js.errors.NotFoundError:
            target = 0
    kv = kv or await js.key_value(bucket)
    return Replay(await kv.watch(key, include_history=history), target)


async def follow(
    open_watch: Callable[[], Awaitable[Any]],
    on_update: Callable[[Any], Awaitable[None] | None],
    *,
    what: str,
    errors: tuple[type[BaseException], ...] = (TimeoutError, nats.errors.Error),
) -> None:
    """Feed each update of the watch *open_watch* opens (``None``: caught up) to *on_update*, until cancelled.

    A watch that breaks (*errors*; a leader change, a lost connection) or ends
    is stopped, logged at debug level as *what*, and opened again after
    :data:`REWATCH_S`; stopping it is bounded (:data:`STOP_WATCH_S`), so a
    closing connection cannot hold the loop.
    """
    while True:
        watcher = None
        try:
            watcher = await open_watch()
            async for update in watcher:
                if (handled := on_update(update)) is not None:
                    await handled
        except errors as exc:
            log.debug("%s watch broke (%s); restarting", what, exc)
        finally:
            if watcher is not None:
                try:
                    await asyncio.wait_for(watcher.stop(), STOP_WATCH_S)
                except (nats.errors.Error, TimeoutError):
                    pass  # the connection is closing: nothing left to stop
        await asyncio.sleep(REWATCH_S)


async def watch_bucket(kv: MeshKV, on_entry: Callable[[Entry], None], ready: asyncio.Event) -> None:
    """Feed every current and future entry of *kv* to *on_entry*; set *ready* once caught up.

    Runs until cancelled. A broken watch (for example across a leader change)
    is restarted.
    """

    def on_update(update: Any) -> None:
        if update is None:  # marks the end of the current values
            ready.set()
        else:
            on_entry(Entry(update.key, update.value or b"", int(update.revision or 0)))

    await follow(kv.watchall, on_update, what=f"bucket {kv.bucket}")
