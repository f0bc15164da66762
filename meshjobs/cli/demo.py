"""``meshjobs demo``: the whole path from nothing, in one command.

Starts the embedded broker on free loopback ports, starts the demo worker as a
separate process, waits for discovery, submits a few signed commands (one of
them from a stranger the worker does not trust), prints what happened and
tears everything down by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshjobs._nats import connect
from meshjobs.cli._common import guarded, home, run
from meshjobs.cli._render import peers_table
from meshjobs.client import Client
from meshjobs.errors import ConnectError, MeshError
from meshjobs.identity import IDENTITY_FILE, Identity, load_or_create
from meshjobs.infra.broker import closed_roles, embedded

DEMO_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("demo.add", {"a": 2, "b": 3}),
    ("demo.echo", {"hello": "mesh", "n": [1, 2, 3]}),
    ("demo.sleep", {"seconds": 0.3}),
    ("demo.fail", {"message": "boom"}),
    ("demo.add", {"a": "two", "b": 3}),
]


def _start_worker(url: str, home: Path, logs: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": url}
    with open(os.devnull, "rb") as devnull, logs.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "worker", "workers.demo:app", "--region", "local"],
            stdin=devnull,
            stdout=log,
            stderr=log,
            env=env,
        )


async def _wait_for_worker(client: Client, worker: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise MeshError(f"the demo worker exited early; see {log}")
        if await client.peers(timeout=0.3, capability="demo.add"):
            return
    raise MeshError(f"the demo worker did not appear in discovery within {timeout:g} s; see {log}")


async def _submissions(client: Client, stranger: Client, console: Console) -> None:
    table = Table(title="signed commands (exit codes as `meshjobs submit` would give)", title_justify="left")
    for column in ("capability", "arguments", "exit", "result or error", "ms"):
        table.add_column(column, overflow="fold")
    jobs = [(client, cap, args) for cap, args in DEMO_JOBS] + [(stranger, "demo.add", {"a": 1, "b": 1})]
    for submitter, capability, args in jobs:
        started = time.perf_counter()
        try:
            outcome = await submitter.submit(capability, args, timeout=10)
            code, text = "[green]0[/]", escape(json.dumps(outcome.value))
        except MeshError as exc:
            code, text = f"[yellow]{exc.exit_code}[/]", escape(str(exc))
        label = capability + (" [dim](untrusted key)[/]" if submitter is stranger else "")
        table.add_row(label, json.dumps(args), code, text, f"{(time.perf_counter() - started) * 1000:.1f}")
    console.print(table)


async def _unknown_key_refused(url: str) -> str:
    """What the closed broker does with a key nobody admitted."""
    try:
        nc = await connect(url, Identity.generate())
    except ConnectError:
        return "an unknown key is refused at login"
    await nc.close()
    return "[red]an unknown key got in[/]"


async def run_demo(home: Path | None = None) -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="meshjobs-demo-") as tmp:
        root = Path(tmp)
        home = home or root / "home"
        identity, _ = load_or_create(home / IDENTITY_FILE)
        console.print(f"identity  {identity.public_key}")
        stranger_id = Identity.generate()  # admitted to the broker, but not trusted by the worker
        admitted = closed_roles(identity.public_key, [stranger_id.public_key])
        broker = await asyncio.to_thread(embedded(root / "broker", admitted=admitted).start)
        worker: subprocess.Popen[bytes] | None = None
        try:
            console.print(
                f"broker    {broker.url} (nats-server pid {broker.pid}, JetStream on; closed: admits this identity "
                f"and one stranger key, {await _unknown_key_refused(broker.url)})"
            )
            worker_log = root / "worker.log"
            worker = _start_worker(broker.url, home, worker_log)
            console.print(f"worker    workers.demo:app (pid {worker.pid})")
            async with await Client.connect(broker.url, identity) as client:
                await _wait_for_worker(client, worker, worker_log)
                peers_table(await client.peers(timeout=0.5), console)
                async with await Client.connect(broker.url, stranger_id) as stranger:
                    await _submissions(client, stranger, console)
        finally:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(worker.wait, 15)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            broker.stop()
        console.print("worker drained and broker stopped; every result above was signed and verified.")


@click.command()
@click.option("--keep-home", is_flag=True, help="Use MESHJOBS_HOME instead of a throwaway identity.")
@guarded
def demo(keep_home: bool) -> None:
    """From nothing: start a broker and the demo worker, submit signed commands, tear down."""
    run(run_demo(home() if keep_home else None))
