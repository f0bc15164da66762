"""``meshjobs dashboard``: the live web dashboard (starlette + uvicorn, server-sent events)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import urllib.parse
from collections.abc import Generator
from pathlib import Path
from typing import Any

import click

from meshjobs.cli._common import DAY_S, Seconds, guarded, home, identity_for_use, local_policy, run, server_option
from meshjobs.cli._common import servers as server_list
from meshjobs.errors import UsageError
from meshjobs.trust.policy import TRUST_FILE

DEFAULT_PORT = 8765
MONITOR_PORT = 8222


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires the access token.")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on (0: any free port).")  # fmt: skip
@click.option("--operator", is_flag=True,
              help="Enable quarantine and release, signed with this identity, which must be an [[operator]] of "
                   "the local trust policy. Always needs the access token.")  # fmt: skip
@click.option("--token", envvar="MESHJOBS_DASHBOARD_TOKEN",
              help="Access token (env MESHJOBS_DASHBOARD_TOKEN) [default: generated when one is needed; "
                   "passing one also requires it on loopback].")  # fmt: skip
@click.option("--monitor", "monitors", multiple=True, metavar="URL",
              help="A server's monitoring URL (repeatable) [default: the --server host, port 8222].")  # fmt: skip
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Show every server of this topology file, checked like `mesh status`.")  # fmt: skip
@click.option("--poll", type=Seconds(max=DAY_S, positive=True), default=2.0, show_default=True,
              help="Seconds between discovery and health polls.")  # fmt: skip
@server_option
@guarded
def dashboard(
    host: str,
    port: int,
    operator: bool,
    token: str | None,
    monitors: tuple[str, ...],
    topology_path: Path | None,
    poll: float,
    server: str,
) -> None:
    """Serve a live web dashboard of the mesh: servers, peers, jobs, reputation, quarantine.

    Read-only unless started with --operator by an operator. Binds 127.0.0.1
    by default; bound anywhere else, every request needs the access token
    printed at start (or given with --token). Stop it with Ctrl-C.
    """
    try:
        import uvicorn  # noqa: F401 - checked here to say which extra is missing

        from meshjobs.observe.dashboard import access as _access  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"the dashboard needs the observe extra: pip install 'meshjobs[observe]' ({exc})") from None
    from meshjobs.infra.topology import load_topology
    from meshjobs.observe.dashboard.access import Access, token_problem
    from meshjobs.observe.dashboard.health import check_monitor_url
    from meshjobs.observe.dashboard.view import ViewSettings

    urls = server_list(server)
    if monitors and topology_path:
        raise UsageError("give --monitor URLs or --topology, not both")
    if token is not None and (problem := token_problem(token)):
        raise UsageError(f"--token: {problem}")
    topology = load_topology(topology_path) if topology_path else None
    checked = tuple(check_monitor_url(u) for u in monitors) or (_default_monitor(urls),)
    identity = identity_for_use()
    policy = local_policy()
    operators = policy.operators
    if operator and identity.public_key not in operators:
        raise UsageError(
            f"--operator: this key ({identity.public_key[:12]}…) is not an operator: list it as [[operator]] in "
            f"{home() / TRUST_FILE}"
        )
    access = Access.for_bind(host, token=token, operator=operator)
    settings = ViewSettings(
        operators, policy.trust_services, actions=operator, monitors=checked, topology=topology, poll_s=poll
    )
    sock = _listen(host, port)
    try:
        run(_serve(sock, urls, identity, settings, access))
    finally:
        sock.close()


def _default_monitor(urls: list[str]) -> str:
    """The monitoring endpoint `meshjobs up` opens, on the host of the first server URL."""
    host = urllib.parse.urlsplit(urls[0] if "://" in urls[0] else f"nats://{urls[0]}").hostname or "127.0.0.1"
    return f"http://{_url_host(host)}:{MONITOR_PORT}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything else starts (so --port 0 can say which port it got)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"--host {host!r}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _page_url(sock: socket.socket, host: str, token: str | None) -> str:
    bound = sock.getsockname()
    shown = host if host not in ("0.0.0.0", "::", "") else "<this machine's address>"
    query = f"/?token={urllib.parse.quote(token)}" if token else "/"
    return f"http://{_url_host(shown)}:{bound[1]}{query}"


def _quiet_server(base: type[Any]) -> type[Any]:
    """uvicorn's server without its own signal handling: the dashboard's handlers also end the event streams."""

    class Server(base):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return Server


async def _serve(sock: socket.socket, urls: list[str], identity: Any, settings: Any, access: Any) -> None:
    import uvicorn

    from meshjobs._nats import connect
    from meshjobs.observe.dashboard.access import is_loopback
    from meshjobs.observe.dashboard.app import create_app
    from meshjobs.observe.dashboard.view import MeshView

    # Fail at once, with the usual exit code, when no broker answers; then stay
    # connected for good (a dashboard outlives broker restarts).
    probe = await connect(urls, identity, name="meshjobs-dashboard")
    await probe.close()
    nc = await connect(urls, identity, name="meshjobs-dashboard", forever=True)
    view = MeshView(nc, identity, settings)
    try:
        await view.start()
        config = uvicorn.Config(
            create_app(view, access),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
        server = _quiet_server(uvicorn.Server)(config)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            server.should_exit = True
            view.closing.set()  # ends the event streams, so the shutdown does not wait on them

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        host = sock.getsockname()[0]
        mode = f"operator: orders signed by {identity.public_key}" if settings.actions else "read-only"
        click.echo(f"meshjobs dashboard: {_page_url(sock, host, access.token)} ({mode})")
        if not is_loopback(host):
            click.echo(
                "meshjobs: warning: plain HTTP on a non-loopback address: the token travels in the clear; "
                "use it on a trusted network or through a tunnel (ssh -L)",
                err=True,
            )
        await server.serve(sockets=[sock])
    finally:
        await view.close()
        await nc.close()
