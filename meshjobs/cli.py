"""The ``meshjobs`` command line. Thin: parse, call the library, print one clear line.

Environment variables are read here and nowhere else: ``MESHJOBS_SERVER``
(default ``nats://127.0.0.1:4222``) and ``MESHJOBS_HOME`` (default
``~/.meshjobs``), which holds the identity and the trust file.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from ._version import __version__
from .app import PEER_KINDS, App
from .errors import MeshError, UsageError
from .identity import IDENTITY_FILE, Identity, load_identity, load_or_create, save_identity
from .policy import TRUST_FILE, load_trust

DEFAULT_SERVER = "nats://127.0.0.1:4222"
F = TypeVar("F", bound=Callable[..., Any])


def home() -> Path:
    return Path(os.environ.get("MESHJOBS_HOME") or Path.home() / ".meshjobs").expanduser()


def fail(message: str, code: int) -> None:
    click.echo(f"meshjobs: {message}", err=True)
    sys.exit(code)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine; expected failures become one line and their exit code."""
    try:
        return asyncio.run(coro)
    except MeshError as exc:
        result = getattr(exc, "result", None)
        if result is not None and getattr(click.get_current_context(), "meta", {}).get("json"):
            click.echo(json.dumps(result.record(), indent=2))
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def guarded(func: F) -> F:
    """Turn MeshError raised outside the event loop into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MeshError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def server_option(func: F) -> F:
    return click.option(
        "--server",
        envvar="MESHJOBS_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        help="NATS URL to connect to (env MESHJOBS_SERVER); comma-separate several.",
    )(func)


def identity_for_use() -> Identity:
    """Load the peer identity, creating one on first use (said on stderr)."""
    path = home() / IDENTITY_FILE
    identity, created = load_or_create(path)
    if created:
        click.echo(f"meshjobs: created identity {identity.public_key} at {path}", err=True)
    return identity


def servers(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshjobs")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Run commands on a federated NATS mesh of peers, signed end to end."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# -- identity ------------------------------------------------------------------


@main.command()
@click.option("--force", is_flag=True, help="Replace an existing identity (the old key is lost).")
@server_option
@guarded
def keygen(force: bool, server: str) -> None:
    """Create this peer's identity (an Ed25519 nkey) under MESHJOBS_HOME."""
    path = home() / IDENTITY_FILE
    identity = Identity.generate()
    save_identity(identity, path, overwrite=force)
    click.echo(identity.public_key)
    click.echo(f"meshjobs: identity written to {path} (mode 0600)", err=True)


@main.command("id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
@guarded
def show_id(as_json: bool, server: str) -> None:
    """Show this peer's public key (its identity)."""
    path = home() / IDENTITY_FILE
    identity = load_identity(path)
    if as_json:
        click.echo(json.dumps({"peer": identity.public_key, "path": str(path)}))
    else:
        click.echo(identity.public_key)


# -- broker ------------------------------------------------------------------


@main.command()
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
    from .broker import embedded

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


def load_app(spec: str) -> App:
    """Import ``module:attr`` (the current directory is importable, as with celery -A)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR (like workers.demo:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise UsageError(f"{spec} is not a meshjobs App (got {type(app).__name__})")
    return app


@main.command()
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
@click.option(
    "--drain-timeout", type=float, default=30.0, show_default=True, help="Seconds to finish in-flight jobs on SIGTERM."
)
@click.option("--max-attempts", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Runs of a failing durable job before it goes to the dead-letter queue.")  # fmt: skip
@click.option("--retry-delay", type=click.FloatRange(min=0), default=1.0, show_default=True,
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
    from .worker import Worker, WorkerConfig

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
        drain_timeout=drain_timeout,
        max_attempts=max_attempts,
        retry_delay=retry_delay,
    )
    run(Worker(app, identity, policy, config).serve(servers(server)))


@main.command()
@click.option("--keep-home", is_flag=True, help="Use MESHJOBS_HOME instead of a throwaway identity.")
@guarded
def demo(keep_home: bool) -> None:
    """From nothing: start a broker and the demo worker, submit signed commands, tear down."""
    from .quickstart import run_demo

    run(run_demo(home() if keep_home else None))


# Operator command groups live in their own module; registered here so that
# `meshjobs --help` lists them.
from .cli_durable import jobs  # noqa: E402
from .cli_jobs import peers, quarantine, release, reputation, submit  # noqa: E402
from .cli_mesh import broker, mesh  # noqa: E402

for command in (submit, jobs, peers, reputation, quarantine, release, broker, mesh):
    main.add_command(command)
