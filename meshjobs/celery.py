"""Send work from a Celery task to the mesh: one synchronous call.

::

    from celery import shared_task
    from meshjobs.celery import submit
    from meshjobs.errors import JobTimeout, NoPeerError

    @shared_task(autoretry_for=(NoPeerError, JobTimeout), retry_backoff=True)
    def resize(path: str) -> str:
        return submit("img.resize", {"path": path, "width": 640}, timeout=60)

The command is signed with the identity in ``home`` (default: the directory
in ``MESHJOBS_HOME``, else ``~/.meshjobs``) and sent to ``server`` (default:
``MESHJOBS_SERVER``, else ``nats://127.0.0.1:4222``); the verified result's
value is returned. Failures are meshjobs errors (:class:`~meshjobs.errors.HandlerError`,
``UsageError``, ``NoPeerError``, ``JobTimeout``, ``Rejected``, ``ConnectError``),
so a task can ``autoretry_for`` them. Reading those two environment variables
here is deliberate: this helper stands in for the CLI inside a Celery worker.

``routing`` goes to :meth:`meshjobs.Client.submit` (``peer``, ``job_id``,
``peer_wait``, ``valid_for``). Passing the Celery task's id as ``job_id``
(``self.request.id`` in a bound task, 8-64 of ``[A-Za-z0-9_-]``) makes a
Celery retry of the same task the same mesh job.

Each call connects, submits and closes in a fresh event loop: it is for
synchronous code (Celery tasks); async code uses :class:`meshjobs.Client`.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from meshjobs import Client
from meshjobs.errors import UsageError
from meshjobs.identity import IDENTITY_FILE, load_identity

DEFAULT_SERVER = "nats://127.0.0.1:4222"

__all__ = ["submit"]


def submit(
    capability: str,
    args: dict[str, Any] | None = None,
    *,
    server: str | None = None,
    home: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    **routing: Any,
) -> Any:
    """Run *capability* on the mesh with *args* and return its verified value."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise UsageError("meshjobs.celery.submit is for synchronous code; in async code use meshjobs.Client")
    directory = Path(home or os.environ.get("MESHJOBS_HOME") or Path.home() / ".meshjobs").expanduser()
    identity = load_identity(directory / IDENTITY_FILE)
    servers = [s.strip() for s in (server or os.environ.get("MESHJOBS_SERVER") or DEFAULT_SERVER).split(",")]

    async def run() -> Any:
        async with await Client.connect([s for s in servers if s], identity) as client:
            outcome = await client.submit(capability, args, timeout=timeout, **routing)
            return outcome.value

    return asyncio.run(run())
