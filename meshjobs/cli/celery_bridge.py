"""``meshjobs celery-bridge``: offer a Celery app's tasks on the mesh, as a worker."""

from __future__ import annotations

from typing import Any

import click

from meshjobs.cli._common import (
    DAY_S,
    Seconds,
    guarded,
    run,
    worker_options,
    worker_setup,
)
from meshjobs.errors import UsageError


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
@worker_options
@guarded
def celery_bridge(
    celery_spec: str,
    glob: str,
    mapping: tuple[str, ...],
    timeout: float,
    **opts: Any,
) -> None:
    """Offer a Celery app's tasks as capabilities: meshjobs celery-bridge proj.celery:app

    Each job is verified like any worker's, sent over the Celery app's own
    broker, and answered with the task's result, signed by this peer.
    """
    from meshjobs import Worker
    from meshjobs.bridges.celery import bridge_app, load_celery_app, plan

    overrides = _overrides(mapping)
    celery_app = load_celery_app(celery_spec)
    app = bridge_app(
        celery_app, glob, overrides=overrides, name=opts["name"], timeout=timeout, concurrency=opts["concurrency"]
    )
    for task, capability in plan(celery_app, glob, overrides).items():
        click.echo(f"meshjobs: Celery task {task} -> capability {capability}", err=True)
    identity, policy, config, urls = worker_setup(opts)
    run(Worker(app, identity, policy, config).serve(urls))
