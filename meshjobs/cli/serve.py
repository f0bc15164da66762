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
    load_app,
    run,
    server_option,
    worker_options,
    worker_setup,
)
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
@server_option
@guarded
def up(port: int, monitor_port: int, store: Path | None, server: str) -> None:
    """Run the embedded broker: nats-server with JetStream on loopback, in the foreground."""
    from meshjobs.infra.broker import embedded

    broker = embedded(store or home() / "broker", port=port or None, monitor_port=monitor_port or None)
    stop = {"signal": 0}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.start()
    click.echo(
        f"meshjobs broker ready at {broker.url} (monitoring http://127.0.0.1:{broker.monitor_port}, "
        f"data {broker.workdir}, log {broker.log_path}); Ctrl-C to stop",
    )
    try:
        while not stop["signal"]:
            if broker.process is None or broker.process.poll() is not None:
                fail(f"nats-server exited unexpectedly; see {broker.log_path}", 1)
            time.sleep(0.2)
    finally:
        broker.stop()
    click.echo("meshjobs broker stopped")


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
