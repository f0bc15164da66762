"""``meshjobs celery-bridge``: offer a Celery app's tasks on the mesh, as a worker."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from meshjobs.cli._common import DAY_S, Seconds, guarded, home, identity_for_use, run, server_option, servers
from meshjobs.errors import UsageError
from meshjobs.trust.policy import TRUST_FILE, load_trust


def _overrides(items: tuple[str, ...]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in items:
        task, sep, capability = item.partition("=")
        if not sep or not task or not capability:
            raise UsageError(f"--map expects TASK=CAPABILITY, got {item!r}")
        if task in overrides:
            raise UsageError(f"--map names task {task!r} twice")
        overrides[task] = capability
    return overrides


@click.command("celery-bridge")
@click.argument("celery_spec", metavar="CELERY_APP")
@click.option("--tasks", "glob", default="*", show_default=True, help="Glob of the task names to offer.")
@click.option("--map", "mapping", multiple=True, metavar="TASK=CAPABILITY",
              help="Offer TASK under this capability name (repeatable).")  # fmt: skip
@click.option("--timeout", type=Seconds(max=DAY_S, positive=True), default=60.0, show_default=True,
              help="Seconds a job may take, waiting in Celery's queue included.")  # fmt: skip
@click.option(
    "--concurrency", "-c", type=click.IntRange(1, 10000), default=16, show_default=True, help="Jobs run at once."
)
@click.option("--name", help="Display name in discovery [default: the Celery app's name].")
@click.option("--region", default="", help="Region label shown in discovery.")
@click.option("--community", default="", help="Community label shown in discovery.")
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust file [default: MESHJOBS_HOME/trust.toml].",
)
@click.option(
    "--drain-timeout",
    type=Seconds(max=DAY_S),
    default=30.0,
    show_default=True,
    help="Seconds to finish in-flight jobs on SIGTERM.",
)
@server_option
@guarded
def celery_bridge(
    celery_spec: str,
    glob: str,
    mapping: tuple[str, ...],
    timeout: float,
    concurrency: int,
    name: str | None,
    region: str,
    community: str,
    trust_file: Path | None,
    drain_timeout: float,
    server: str,
) -> None:
    """Offer a Celery app's tasks as capabilities: meshjobs celery-bridge proj.celery:app

    Each job is verified like any worker's, sent over the Celery app's own
    broker, and answered with the task's result, signed by this peer.
    """
    from meshjobs import Worker, WorkerConfig
    from meshjobs.bridges.celery import bridge_app, load_celery_app, plan

    logging.getLogger("meshjobs").setLevel(min(logging.getLogger().level, logging.INFO))
    overrides = _overrides(mapping)
    celery_app = load_celery_app(celery_spec)
    app = bridge_app(celery_app, glob, overrides=overrides, name=name, timeout=timeout, concurrency=concurrency)
    for task, capability in plan(celery_app, glob, overrides).items():
        click.echo(f"meshjobs: Celery task {task} -> capability {capability}", err=True)
    identity = identity_for_use()
    policy = load_trust(trust_file or home() / TRUST_FILE, required=trust_file is not None)
    config = WorkerConfig(
        concurrency=concurrency, name=name, region=region, community=community, drain_timeout_s=drain_timeout
    )
    run(Worker(app, identity, policy, config).serve(servers(server)))
