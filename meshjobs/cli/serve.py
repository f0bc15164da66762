"""Long-running commands: ``up`` (the embedded broker) and ``worker``."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import click

from meshjobs.cli._common import (
    fail,
    guarded,
    home,
    identity_for_use,
    load_app,
    run,
    server_option,
    worker_options,
    worker_setup,
)
from meshjobs.errors import UsageError
from meshjobs.identity import Identity, is_public_key
from meshjobs.runtime.app import PEER_KINDS, App

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
@server_option
@guarded
def up(port: int, monitor_port: int, store: Path | None, closed: bool, admit: tuple[str, ...], server: str) -> None:
    """Run the embedded broker: nats-server with JetStream on loopback, in the foreground.

    Open to any local client by default; --closed admits only the keys it is given.
    """
    from meshjobs.infra.broker import closed_roles, embedded

    if admit and not closed:
        raise UsageError("--admit needs --closed (an open broker admits everyone)")
    for key in admit:
        if not is_public_key(key):
            raise UsageError(f"--admit {key[:16]!r}: not a peer key (56 characters starting with U)")
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
    try:
        access = "open to every local client"
        if identity is not None:
            created = run(_provision(broker.url, identity))
            others = f" and {len(set(admit) - {identity.public_key})} more key(s) as peers" if admit else ""
            access = (
                f"closed: admits {identity.public_key} as operator, trust service and peer{others}; "
                f"mesh state ready ({len(created)} streams and buckets)"
            )
        click.echo(
            f"meshjobs broker ready at {broker.url} ({access}; monitoring http://127.0.0.1:{broker.monitor_port}, "
            f"data {broker.workdir}, log {broker.log_path}); Ctrl-C to stop",
        )
        while not stop["signal"]:
            if broker.process is None or broker.process.poll() is not None:
                fail(f"nats-server exited unexpectedly; see {broker.log_path}", 1)
            time.sleep(0.2)
    finally:
        broker.stop()
    click.echo("meshjobs broker stopped")


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
