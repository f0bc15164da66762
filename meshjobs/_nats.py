"""The one place meshjobs talks to nats-py directly: connecting and translating errors."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
from nats.aio.client import Client as NATS

from meshjobs.errors import ConnectError, UsageError
from meshjobs.identity import Identity

log = logging.getLogger("meshjobs.nats")


class _GuardedClient(NATS):
    """A nats-py client whose nkey login refuses to sign unusual nonces.

    Upstream gap (nats-py 2.16): the nkey login callback signs whatever nonce
    the server sends. We wrap the private ``_setup_nkeys_seed_connect`` so the
    callback goes through :meth:`Identity.sign_login_nonce`, which refuses
    anything that could be the bytes of a meshjobs envelope.
    """

    meshjobs_identity: Identity | None = None
    meshjobs_denied: deque[tuple[str, float]]

    def _setup_nkeys_seed_connect(self) -> None:
        super()._setup_nkeys_seed_connect()
        identity = self.meshjobs_identity
        if identity is not None:
            import base64

            self._signature_cb = lambda nonce: base64.b64encode(identity.sign_login_nonce(nonce))


#: nats-py reports a refused publish only to the error callback (lower-cased):
#: ``nats: permissions violation for publish to "$js.hub.api.stream.create.jobs"``.
_DENIED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


def denied(nc: NATS, subject: str, within: float = 60.0) -> bool:
    """Whether the server refused a publish to *subject* on this connection in the last *within* seconds.

    A refused JetStream request otherwise looks like a timeout; this tells the
    two apart so callers can fail at once instead of retrying.
    """
    wanted, since = _forms(subject.lower()), time.monotonic() - within
    return any(s in wanted and at >= since for s, at in getattr(nc, "meshjobs_denied", ()))


_DOMAIN_API = re.compile(r"^\$js\.[^.]+\.api\.")


def _forms(subject: str) -> set[str]:
    # A hub server maps $JS.<domain>.API.$KV.x to $KV.x and $JS.<domain>.API.x
    # to $JS.API.x before checking permissions, and names the mapped subject
    # when it refuses one.
    rest = _DOMAIN_API.sub("", subject, count=1)
    if rest == subject:
        return {subject}
    return {subject, rest if rest.startswith("$kv.") else "$js.api." + rest}


async def connect(
    servers: str | list[str],
    identity: Identity | None = None,
    *,
    name: str = "meshjobs",
    forever: bool = False,
    connect_timeout: float = 2.0,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to NATS.

    ``forever=True`` is for long-running workers: reconnect without limit
    (nats-py gives up after about two minutes by default) and keep trying the
    first connection too. Otherwise a few quick attempts, then
    :class:`ConnectError`.
    """
    urls = check_urls([servers] if isinstance(servers, str) else list(servers))

    errors: list[Exception] = []
    refused = asyncio.Event()

    async def error_cb(exc: Exception) -> None:
        if refused_publish := _DENIED_PUBLISH.search(str(exc)):
            client.meshjobs_denied.append((refused_publish.group(1).lower(), time.monotonic()))
            log.debug("nats: %s", exc)
            return
        errors.append(exc)
        del errors[:-3]
        if "Authorization Violation" in str(exc):
            if forever and not refused.is_set():
                log.warning("the server refused this peer's key; retrying until it is admitted")
            refused.set()
        log.debug("nats: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        if client.is_closed:  # our own close(): a normal shutdown, nothing to reconnect
            return
        log.warning("disconnected from NATS; reconnecting")
        if on_disconnect is not None:
            await on_disconnect()

    async def reconnected_cb() -> None:
        log.warning("reconnected to NATS at %s", client.connected_url.netloc if client.connected_url else "?")

    client = _GuardedClient()
    client.meshjobs_identity = identity
    client.meshjobs_denied = deque(maxlen=64)
    options = _options(urls, identity, name, connect_timeout, forever)
    options["error_cb"] = error_cb
    if forever:
        options["disconnected_cb"] = disconnected_cb
        options["reconnected_cb"] = reconnected_cb
    try:
        if forever:
            await client.connect(**options)
        else:
            await _connect_or_refused(client, options, refused)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise ConnectError(f"cannot connect to NATS at {', '.join(urls)}: {_describe(exc, errors)}") from exc
    return client


def _options(urls: list[str], identity: Identity | None, name: str, timeout: float, forever: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": urls,
        "name": name,
        "connect_timeout": timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1 if forever else 2,
        "reconnect_time_wait": 1.0 if forever else 0.2,
        "pending_size": 8 * 1024 * 1024,
    }
    if identity is not None:
        options["nkeys_seed_str"] = identity.seed_text()
        # A private inbox per peer: closed meshes only let a peer subscribe
        # to _INBOX.<its key>.>, so nobody else can read its replies.
        options["inbox_prefix"] = f"_INBOX.{identity.public_key}"
    return options


SCHEMES = ("nats", "tls", "ws", "wss")


def check_urls(urls: list[str]) -> list[str]:
    """The server URLs, checked: ``nats|tls|ws|wss://host[:port]`` (or ``host:port``), else :class:`UsageError`.

    nats-py takes any scheme and then fails to connect, which reads like a
    broker that is down; a typo deserves its own message.
    """
    if not urls:
        raise UsageError("invalid URL: no server given")
    for url in urls:
        text = url if "://" in url else f"nats://{url}"
        try:
            parsed = urlsplit(text)
            port = parsed.port
        except ValueError as exc:
            raise UsageError(f"invalid URL {url[:80]!r}: {exc}") from None
        if parsed.scheme not in SCHEMES:
            raise UsageError(f"invalid URL {url[:80]!r}: the scheme must be one of {', '.join(SCHEMES)}")
        if not parsed.hostname or (port is not None and not 0 < port < 65536):
            raise UsageError(f"invalid URL {url[:80]!r}: expected {parsed.scheme}://HOST[:PORT]")
    return urls


async def close_quietly(nc: NATS) -> None:
    """Close *nc*, ignoring errors of a connection that is already gone (a lost broker is not news at exit)."""
    if nc.is_closed:
        return
    try:
        await nc.close()
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        log.debug("closing the connection: %s: %s", type(exc).__name__, exc)


async def _connect_or_refused(client: NATS, options: dict[str, Any], refused: asyncio.Event) -> None:
    """Connect, but give up at the first authorization refusal.

    Upstream gap (nats-py 2.16): against a cluster, an authorization error
    makes the initial connect loop over the discovered servers forever,
    whatever max_reconnect_attempts says. A refused key is final for us.
    """
    attempt = asyncio.ensure_future(client.connect(**options))
    waiter = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({attempt, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if attempt.done():
        attempt.result()
        return
    attempt.cancel()
    await asyncio.gather(attempt, return_exceptions=True)
    await client.close()
    raise nats.errors.Error("nats: 'Authorization Violation'")


def _describe(exc: BaseException, seen: list[Exception]) -> str:
    text = " ".join(str(e) for e in [*seen, exc])
    if "Authorization" in text or "authorization" in text:
        return "the server refused this peer's key (not admitted; see `meshjobs broker add-peer`)"
    if isinstance(exc, nats.errors.NoServersError):
        return "no server answered (is `meshjobs up` running?)"
    return str(exc) or type(exc).__name__
