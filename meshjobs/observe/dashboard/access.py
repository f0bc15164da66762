"""Who may see the dashboard and who may act through it: token, host and same-origin checks.

Rules (checked on every HTTP request by :class:`AccessGuard`):

- **Token.** Bound to a loopback address, a read-only dashboard needs none;
  bound anywhere else, or able to act (``--operator``: its buttons sign
  orders with the operator's key, and any local user can reach a loopback
  port), every request must carry the token: ``Authorization: Bearer <token>``
  or the cookie set by a first visit to ``/?token=<token>``. That visit is
  answered with a redirect to the same page without the token, so it does not
  stay in the address bar, history or referrers. Comparison is constant-time.
- **Host.** On a loopback bind the ``Host`` header must name a loopback host
  (127.0.0.1, localhost, ::1): a page on another site that rebinds its DNS
  name to 127.0.0.1 is refused (DNS rebinding).
- **Same origin.** A state-changing request (anything but GET and HEAD) must
  come from the dashboard's own page: its ``Origin`` header must equal the
  dashboard's origin, ``Sec-Fetch-Site`` (when sent) must be ``same-origin``
  and the body must be JSON, so a form on another site cannot post one (CSRF).
  The cookie is ``SameSite=Strict`` and ``HttpOnly`` as well.

Responses carry a strict Content-Security-Policy: the page runs only its own
script, with no inline code, which backs up the page's rule of never putting
peer-supplied text into HTML.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "meshjobs_dashboard"
#: Shortest token accepted from ``--token``: 128 bits of urlsafe base64 and then some.
MIN_TOKEN_LENGTH = 22
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """Whether *host* (an address or name to bind or a Host header's host) is this machine only."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh access token (256 random bits)."""
    return secrets.token_urlsafe(32)


def token_problem(token: str) -> str | None:
    """Why *token* (from ``--token``) is too weak to guard a dashboard, or None."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"a token needs at least {MIN_TOKEN_LENGTH} characters (use the generated one)"
    if not token.isascii() or not token.isprintable() or any(c in token for c in " ;,\"'\\"):
        return "a token is printable ASCII without spaces, quotes, commas, semicolons or backslashes"
    return None


@dataclass(frozen=True)
class Access:
    """What a dashboard demands of requests: a token (or None) and whether Host must be loopback."""

    token: str | None
    loopback: bool

    @classmethod
    def for_bind(cls, host: str, *, token: str | None, operator: bool) -> Access:
        """The rules for a dashboard bound to *host*: a token is generated where one is required but missing."""
        loopback = is_loopback(host)
        if token is None and (operator or not loopback):
            token = new_token()
        return cls(token, loopback)

    def check_token(self, offered: str | None) -> bool:
        if self.token is None:
            return True
        if not offered:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "replace"), self.token.encode())


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _host_name(host_header: str) -> str:
    """The host part of a Host header (``[::1]:8765`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def offered_token(headers: dict[str, str]) -> str | None:
    """The token a request carries: the Authorization header first, then the cookie."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except CookieError:  # junk carries no token
        return None
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel is not None else None


def same_origin_problem(method: str, headers: dict[str, str], scheme: str) -> str | None:
    """Why a state-changing request may not come from the dashboard's own page (CSRF), or None."""
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if not origin or origin != f"{scheme}://{headers.get('host', '')}":
        return "cross-origin request refused"
    if headers.get("sec-fetch-site", "same-origin") != "same-origin":
        return "cross-site request refused"
    if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return "a JSON body is required"
    return None


class AccessGuard:
    """ASGI middleware enforcing :class:`Access` on every HTTP request, and adding security headers."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.access.loopback and not is_loopback(_host_name(headers.get("host", ""))):
            await _plain(send, 421, "this dashboard answers only to a loopback host name")
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if "token" in query and self.access.token is not None and scope["method"] in SAFE_METHODS:
            await self._first_visit(scope, send, query)
            return
        if not self.access.check_token(offered_token(headers)):
            await _plain(send, 401, "an access token is required: open the URL the dashboard printed at start")
            return
        problem = same_origin_problem(scope["method"], headers, scope.get("scheme", "http"))
        if problem:
            await _plain(send, 403, problem)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _first_visit(self, scope: Scope, send: Send, query: dict[str, str]) -> None:
        """``?token=``: check it, set the cookie, and send the browser to the same page without it."""
        if not self.access.check_token(query.pop("token")):
            await _plain(send, 401, "wrong access token")
            return
        # One leading slash, percent-encoded: never a protocol-relative URL to another site.
        location = "/" + quote(scope.get("path", "/").lstrip("/")) + (f"?{urlencode(query)}" if query else "")
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{COOKIE}={self.access.token}; Path=/; HttpOnly; SameSite=Strict{secure}"
        await _plain(
            send, 303, "see the page without the token", [(b"location", location.encode()), cookie_header(cookie)]
        )


def cookie_header(value: str) -> tuple[bytes, bytes]:
    return (b"set-cookie", value.encode("latin-1"))


async def _plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (text + "\n").encode()
    headers: list[Any] = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
