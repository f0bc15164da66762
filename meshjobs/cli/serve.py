"""Long-running commands: ``up`` (the embedded broker) and ``worker``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshjobs.cli._common import (
    fail,
    guarded,
    home,
    identity_for_use,
    load_app,
    run,
    worker_options,
    worker_setup,
)
from meshjobs.errors import BrokerError, MeshError, UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.runtime.app import PEER_KINDS, App

if TYPE_CHECKING:
    from meshjobs.infra.broker import NatsServer
    from meshjobs.infra.services import ServiceProcess

# -- broker ------------------------------------------------------------------


@click.command()
@click.option(
    "--port", type=click.IntRange(0, 65535), default=4222, show_default=True, help="Client port (0: any free)."
)
@click.option(
    "--monitor-port",
    type=click.IntRange(0, 65535),
    default=8222,
    show_default=True,
    help="HTTP monitoring port (0: any free).",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="JetStream data dir [default: MESHJOBS_HOME/broker].",
)
@click.option(
    "--closed",
    is_flag=True,
    help="Require nkey login: admit this peer's identity (operator, trust service and peer) and each --admit key "
    "(ordinary peer), with role permissions; provision the mesh state.",
)
@click.option(
    "--admit",
    multiple=True,
    metavar="KEY",
    help="With --closed: also admit KEY (what `meshjobs id` prints) as an ordinary peer. Repeatable.",
)
@click.option(
    "--no-trust-service",
    "no_trust",
    is_flag=True,
    help="Do not run the trust service (the one writer of reputation) as this identity next to the broker.",
)
@guarded
def up(port: int, monitor_port: int, store: Path | None, closed: bool, admit: tuple[str, ...], no_trust: bool) -> None:
    """Run the embedded broker: nats-server with JetStream on loopback, in the foreground.

    Open to any local client by default; --closed admits only the keys it is given.
    The trust service runs next to it as this identity (its log is in the data dir).
    """
    from meshjobs.infra.broker import closed_roles, embedded

    if admit and not closed:
        raise UsageError("--admit needs --closed (an open broker admits everyone)")
    for key in admit:
        if not is_public_key(key):
            raise UsageError(f"--admit {key[:16]!r}: not a peer key (56 characters starting with U)")
    for number, what in ((port, "--port"), (monitor_port, "--monitor-port")):
        _check_free(number, what)
    identity = identity_for_use() if closed else None
    admitted = closed_roles(identity.public_key, admit) if identity else None
    broker = embedded(
        store or home() / "broker", port=port or None, monitor_port=monitor_port or None, admitted=admitted
    )
    stop = {"signal": 0}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.start()
    trust = None
    try:
        access = "open to every local client"
        if identity is not None:
            created = run(_provision(broker.url, identity))
            others = f" and {len(set(admit) - {identity.public_key})} more key(s) as peers" if admit else ""
            access = (
                f"closed: admits {identity.public_key} as operator, trust service and peer{others}; "
                f"mesh state ready ({len(created)} streams and buckets)"
            )
        if not no_trust:
            trust, key = _trust_service(broker.url, broker.workdir)
            access += f"; trust service {key} (log {trust.log_path})"
        click.echo(
            f"meshjobs broker ready at {broker.url} ({access}; monitoring http://127.0.0.1:{broker.monitor_port}, "
            f"data {broker.workdir}, log {broker.log_path}); Ctrl-C to stop",
        )
        _supervise(broker, trust, stop)
    finally:
        if trust is not None:
            trust.stop()
        broker.stop()
    click.echo("meshjobs broker stopped")


def _trust_service(url: str, workdir: Path) -> tuple[ServiceProcess, str]:
    """Start the trust service as this identity (``meshjobs trust serve``), waiting until it reads evidence.

    Returns it and its key. The service creates the identity if there is none
    yet (said in its log), so the first line `up` prints stays the ready line.
    """
    import os

    from meshjobs.identity import IDENTITY_FILE, load_identity
    from meshjobs.infra.services import trust_service

    env = dict(os.environ, MESHJOBS_HOME=str(home()), MESHJOBS_SERVER=url)
    service = trust_service([url], workdir, env=env).start()
    return service, load_identity(home() / IDENTITY_FILE).public_key


def _supervise(broker: NatsServer, trust: ServiceProcess | None, stop: dict[str, int]) -> None:
    """Until a signal: fail when the broker dies; start the trust service again when it dies (at most every 5 s)."""
    restarted = 0.0
    while not stop["signal"]:
        if broker.process is None or broker.process.poll() is not None:
            fail(f"nats-server exited unexpectedly; see {broker.log_path}", 1)
        if trust is not None and not trust.alive() and time.monotonic() - restarted > 5:
            click.echo(
                f"meshjobs: warning: the trust service exited; starting it again (log {trust.log_path})", err=True
            )
            restarted = time.monotonic()
            try:
                trust.start()
            except MeshError as exc:
                click.echo(f"meshjobs: warning: {exc}", err=True)
        time.sleep(0.2)


def _check_free(port: int, option: str) -> None:
    """Refuse a taken port with a clear line (nats-server would only say it failed to start)."""
    import socket

    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server does: TIME_WAIT is not taken
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise BrokerError(
                f"port {port} on 127.0.0.1 is taken (is another `meshjobs up` running?): stop it, "
                f"or choose another with {option} (0 picks a free one)"
            ) from None


async def _provision(url: str, identity: Identity) -> list[str]:
    """Create every stream and bucket of mesh state as the local operator (peers may not)."""
    from meshjobs._nats import connect
    from meshjobs.catalog import MESH_STATE
    from meshjobs.state import provision

    nc = await connect(url, identity, name="meshjobs-up")
    try:
        return await provision(nc, MESH_STATE)
    finally:
        await nc.close()


# -- worker --------------------------------------------------------------------


@click.command()
@click.argument("app_spec", metavar="MODULE:ATTR")
@click.option(
    "--kind", type=click.Choice(PEER_KINDS), help="What answers: system, ai, human or hybrid [default: the app's]."
)
@worker_options
@guarded
def worker(app_spec: str, kind: str | None, **opts: Any) -> None:
    """Run a worker app, like `celery -A`: meshjobs worker workers.demo:app"""
    from meshjobs.runtime.worker import Worker

    app = load_app(app_spec)
    if kind:
        app = App(app.name, kind=kind, description=app.description, capabilities=app.capabilities)  # type: ignore[arg-type]
    identity, policy, config, urls = worker_setup(opts)
    run(Worker(app, identity, policy, config).serve(urls))
