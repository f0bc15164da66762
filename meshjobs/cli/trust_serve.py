"""``meshjobs trust serve``: the trust service, the one writer of reputation."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click

from meshjobs.cli._common import (
    guarded,
    home,
    identity_for_use,
    metrics_options,
    run,
    server_option,
    servers,
    start_metrics,
)
from meshjobs.infra.services import TRUST_READY
from meshjobs.trust.policy import TRUST_FILE, load_trust

#: What ``trust serve`` prints once it reads evidence; ``meshjobs up`` waits for it.
READY = TRUST_READY


@click.group()
def trust() -> None:
    """The trust service: checks evidence and its proof, writes signed reputation records."""


@trust.command("serve")
@click.option("--trust", "trust_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Trust file: operators, [[pretrusted]] keys [default: MESHJOBS_HOME/trust.toml].")  # fmt: skip
@server_option
@metrics_options
@guarded
def trust_serve(trust_file: Path | None, server: str, metrics_port: int | None, metrics_host: str) -> None:
    """Fold verified evidence into signed reputation records, as this identity, until stopped.

    Run exactly one per mesh. Readers accept its records when they list its key
    as [[trust_service]] in their trust file (or when it is their own key).
    With --metrics-port it exports each peer's score and quarantine state.
    """
    import logging

    from meshjobs._nats import connect
    from meshjobs.trust.service import TrustService, serve

    logging.getLogger("meshjobs").setLevel(min(logging.getLogger().level, logging.INFO))
    identity = identity_for_use()
    policy = load_trust(trust_file or home() / TRUST_FILE, required=trust_file is not None)
    # Before the service loads its records: it exports them as it reads them.
    metrics_server = start_metrics(metrics_port, metrics_host)

    def ready(service: TrustService) -> None:
        anchors = len(service.anchors) - 1
        click.echo(
            f"{READY}: {identity.public_key}, {len(service.records)} records, resuming after evidence "
            f"#{service.state.last_seq}, {anchors} operator or pre-trusted key(s)"
        )
        sys.stdout.flush()

    async def go() -> None:
        nc = await connect(servers(server), identity, name="meshjobs-trust", forever=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        task: asyncio.Task[Any] = asyncio.create_task(serve(nc, identity, policy, on_ready=ready))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stopping):
                pending.cancel()
            await asyncio.gather(task, stopping, return_exceptions=True)
            await nc.close()
            if metrics_server is not None:
                metrics_server.close()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        click.echo("meshjobs trust service stopped")

    run(go())
