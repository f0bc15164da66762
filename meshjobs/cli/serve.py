"""Long-running commands: ``up`` (the embedded broker) and ``worker``."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import click

from meshjobs.cli._common import (
    DAY_S,
    Seconds,
    fail,
    guarded,
    home,
    identity_for_use,
    load_app,
    run,
    server_option,
    servers,
)
from meshjobs.runtime.app import PEER_KINDS, App
from meshjobs.trust.policy import TRUST_FILE, load_trust

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
    "--concurrency", "-c", type=click.IntRange(1, 10000), default=16, show_default=True, help="Jobs run at once."
)
@click.option("--name", help="Display name in discovery [default: the app's name].")
@click.option(
    "--kind", type=click.Choice(PEER_KINDS), help="What answers: system, ai, human or hybrid [default: the app's]."
)
@click.option("--region", default="", help="Region label shown in discovery.")
@click.option("--community", default="", help="Community label shown in discovery.")
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust file [default: MESHJOBS_HOME/trust.toml].",
)
@click.option("--drain-timeout", type=Seconds(max=DAY_S), default=30.0, show_default=True,
              help="Seconds to finish in-flight jobs on SIGTERM.")  # fmt: skip
@click.option("--max-attempts", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Runs of a failing durable job before it goes to the dead-letter queue.")  # fmt: skip
@click.option("--retry-delay", type=Seconds(max=DAY_S), default=1.0, show_default=True,
              help="Seconds before a failed durable job runs again; doubles each time.")  # fmt: skip
@server_option
@guarded
def worker(
    app_spec: str,
    concurrency: int,
    name: str | None,
    kind: str | None,
    region: str,
    community: str,
    trust_file: Path | None,
    drain_timeout: float,
    max_attempts: int,
    retry_delay: float,
    server: str,
) -> None:
    """Run a worker app, like `celery -A`: meshjobs worker workers.demo:app"""
    from meshjobs.runtime.config import WorkerConfig
    from meshjobs.runtime.worker import Worker

    logging.getLogger("meshjobs").setLevel(min(logging.getLogger().level, logging.INFO))
    app = load_app(app_spec)
    if kind:
        app = App(app.name, kind=kind, description=app.description, capabilities=app.capabilities)  # type: ignore[arg-type]
    identity = identity_for_use()
    policy = load_trust(trust_file or home() / TRUST_FILE, required=trust_file is not None)
    config = WorkerConfig(
        concurrency=concurrency,
        name=name,
        region=region,
        community=community,
        drain_timeout_s=drain_timeout,
        max_attempts=max_attempts,
        retry_delay_s=retry_delay,
    )
    run(Worker(app, identity, policy, config).serve(servers(server)))
