"""The dashboard's ASGI app (starlette): the page, a JSON API and a server-sent event stream.

=========================  ====================================================
``GET /``                  the page (static HTML, JS and CSS; no build step)
``GET /api/state``         everything the page shows, as JSON
``GET /api/events``        ``text/event-stream``: a ``snapshot``, then changes
``GET /api/peers/{key}``   one peer's reputation, quarantine order and evidence
``POST /api/orders``       ``{"peer", "action": "quarantine"|"release", "reason"}``
                           signed with the dashboard's operator key; 403 unless
                           started with ``--operator`` by an operator
=========================  ====================================================

Every request passes :class:`~meshjobs.observe.dashboard.access.AccessGuard`
first (token, Host, same origin). The page builds its DOM with
``textContent`` only: names, capabilities, reasons and details are
peer-supplied and never parsed as HTML.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from meshjobs.errors import KeyExists, MeshError, Rejected, UsageError
from meshjobs.identity import is_public_key
from meshjobs.observe.dashboard.access import Access, AccessGuard
from meshjobs.observe.dashboard.view import MeshView

STATIC = Path(__file__).resolve().parent / "static"
#: Seconds between keep-alive comments on an idle event stream (proxies close silent connections).
KEEPALIVE_S = 15
MAX_BODY_BYTES = 16 * 1024


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(message: str, status: int) -> JSONResponse:
    return _json({"error": message}, status)


def sse(event: str, data: Any) -> str:
    """One server-sent event (JSON never contains a raw newline, so one ``data:`` line suffices)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Endpoints:
    """The request handlers, bound to one :class:`MeshView`."""

    def __init__(self, view: MeshView) -> None:
        self.view = view

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def state(self, request: Request) -> Response:
        return _json(self.view.snapshot())

    async def events(self, request: Request) -> Response:
        view = self.view
        subscriber = view.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n" + sse("snapshot", view.snapshot())
                idle = 0.0
                # Wake every second to notice a shutting-down server or a subscriber cut off for lagging.
                while not view.closing.is_set() and not subscriber.cut_off:
                    try:
                        event, data = await asyncio.wait_for(subscriber.queue.get(), 1.0)
                    except TimeoutError:
                        idle += 1.0
                        if idle >= KEEPALIVE_S:
                            idle = 0.0
                            yield ": keep-alive\n\n"
                        continue
                    idle = 0.0
                    yield sse(event, data)
            finally:
                view.unsubscribe(subscriber)

        headers = {"x-accel-buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def peer(self, request: Request) -> Response:
        key = request.path_params["key"]
        if not is_public_key(key):
            return _error("not a peer key", 400)
        try:
            return _json(await self.view.peer_detail(key))
        except UsageError as exc:
            return _error(str(exc), 503)
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            return _error(f"could not read the reputation: {exc}", 502)

    async def orders(self, request: Request) -> Response:
        if not self.view.settings.actions:
            return _error("this dashboard is read-only: start it with --operator, as an operator", 403)
        body = await _body(request)
        if body is None:
            return _error(f"send a JSON object of at most {MAX_BODY_BYTES} bytes", 400)
        peer, action, reason = body.get("peer"), body.get("action"), body.get("reason", "")
        if not isinstance(peer, str) or not is_public_key(peer):
            return _error("peer: not a peer key", 400)
        if action not in ("quarantine", "release"):
            return _error("action: quarantine or release", 400)
        if not isinstance(reason, str) or len(reason) > 1000:
            return _error("reason: text of at most 1000 characters", 400)
        try:
            order = await self.view.order(peer, action, reason.strip())
        except KeyExists as exc:
            return _error(str(exc), 409)
        except UsageError as exc:
            return _error(str(exc), 400)
        except Rejected as exc:
            return _error(str(exc), 403)
        except (MeshError, nats.errors.Error, TimeoutError) as exc:
            return _error(f"the order was not stored: {exc}", 502)
        return _json({"order": order})


async def _body(request: Request) -> dict[str, Any] | None:
    """The request's JSON object, or None (too large, not JSON, not an object)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def create_app(view: MeshView, access: Access) -> ASGIApp:
    """The dashboard for *view*, guarded by *access*."""
    endpoints = Endpoints(view)
    routes = [
        Route("/", endpoints.index),
        Route("/api/state", endpoints.state),
        Route("/api/events", endpoints.events),
        Route("/api/peers/{key}", endpoints.peer),
        Route("/api/orders", endpoints.orders, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return AccessGuard(Starlette(routes=routes), access)
