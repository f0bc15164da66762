"""``meshjobs demo``: the whole path from nothing, in one command.

Starts the embedded broker on free loopback ports, the OpenAI-compatible
stand-in (in this process, 127.0.0.1, a free port) and three peers as separate
processes: the demo worker (kind system), an AI persona served against the
stand-in (kind ai) and a worker whose capability needs an operator's approval
(this identity is its operator). It waits for discovery, submits signed
commands (one from a stranger the workers do not trust), one job to the
persona (by capability name) and one gated job, which it approves with this
identity's key; prints what happened and tears everything down (children by
PID, the stand-in in-process), on errors and Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshjobs._nats import connect
from meshjobs.cli._common import guarded, home, run
from meshjobs.cli._render import peers_table, safe_text, short_key
from meshjobs.client import Client, Outcome
from meshjobs.discovery import PeerInfo
from meshjobs.envelope import new_job_id, open_envelope
from meshjobs.errors import ConnectError, MeshError
from meshjobs.identity import IDENTITY_FILE, Identity, load_or_create
from meshjobs.infra.broker import closed_roles, embedded, launch
from meshjobs.peers.openai_standin import OpenAIStandin
from meshjobs.peers.persona import prompt_digest
from meshjobs.workflow.approval import Request, check_provenance
from meshjobs.workflow.waiting import ApprovalStore

DEMO_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("demo.add", {"a": 2, "b": 3}),
    ("demo.echo", {"hello": "mesh", "n": [1, 2, 3]}),
    ("demo.sleep", {"seconds": 0.3}),
    ("demo.fail", {"message": "boom"}),
    ("demo.add", {"a": "two", "b": 3}),
]

#: The AI persona the demo serves (a file shipped in workers/personas/) and the job it asks of it.
PERSONA_FILE = "architecture-review.toml"
PERSONA_CAP = "review.architecture"
PERSONA_ARGS: dict[str, Any] = {
    "design": "One Postgres primary behind a queue of stateless workers; the queue is Redis without persistence.",
    "focus": ["reliability"],
}
#: The gated worker app and the job that waits for this identity's approval.
GATED_APP = "workers.payments:app"
GATED_CAP = "payments.send"
GATED_ARGS: dict[str, Any] = {"to": "bob", "cents": 500}
APPROVE_REASON = "demo: the operator approves"
#: Seconds a child peer gets to drain on SIGTERM (the demo waits this and a little more, then kills).
CHILD_DRAIN_S = 1.0


@dataclass
class Child:
    """A peer process the demo started, and where its output goes."""

    label: str
    process: subprocess.Popen[bytes]
    log: Path

    def failure(self) -> str:
        """Why the child is gone: its exit code and the last line it logged."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        last = f": {lines[-1].strip()}" if lines else ""
        return f"the {self.label} exited early (exit code {self.process.returncode}){last}"


def _start(label: str, args: Sequence[str], url: str, home: Path, log: Path) -> Child:
    """``python -m meshjobs ARGS`` as this identity, in its own session (the demo stops it by PID)."""
    env = {**os.environ, "MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": url}
    argv = [sys.executable, "-m", "meshjobs", *args, "--region", "local", "--drain-timeout", f"{CHILD_DRAIN_S:g}"]
    # In its own session: a Ctrl-C reaches the demo, which stops each child itself.
    return Child(label, launch(argv, log, detach=False, env=env), log)


async def _stop(children: list[Child]) -> None:
    """SIGTERM every child still running, wait for them together, SIGKILL what outlives its drain."""
    running = [c.process for c in children if c.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + CHILD_DRAIN_S + 5
    for process in running:
        try:
            await asyncio.to_thread(process.wait, max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_for_peers(
    client: Client, children: list[Child], capabilities: set[str], timeout: float = 30.0
) -> list[PeerInfo]:
    """Discovery's answer once every capability in *capabilities* is offered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.process.poll() is not None:
                raise MeshError(child.failure())
        peers = await client.peers(timeout=0.3)
        if capabilities <= {c for p in peers for c in p.capabilities}:
            return peers
    missing = capabilities - {c for p in await client.peers(timeout=0.3) for c in p.capabilities}
    raise MeshError(f"{', '.join(sorted(missing))} did not appear in discovery within {timeout:g} s")


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


def _facts(title: str) -> Table:
    """A two-column table of what one step showed, in the demo's table style."""
    table = Table(title=title, title_justify="left", show_header=False, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def _kind_of(peers: list[PeerInfo], capability: str, worker: str) -> str:
    kinds = {p.kind for p in peers if capability in p.capabilities and p.peer == worker}
    return ", ".join(sorted(kinds)) or "?"


async def _persona_job(client: Client, standin: OpenAIStandin, peers: list[PeerInfo], console: Console) -> None:
    """One job to the persona, routed by capability name; its signed result and what it rests on."""
    started = time.perf_counter()
    outcome = await client.submit(PERSONA_CAP, PERSONA_ARGS, timeout=20)
    elapsed = (time.perf_counter() - started) * 1000
    value = outcome.value
    with standin.lock:
        received = [b["messages"] for b in standin.stats.bodies]
    # The digest the persona signed covers exactly the messages the model server received.
    matches = any(prompt_digest(messages) == value["prompt_sha256"] for messages in received)
    usage = value["usage"]
    table = _facts(f"AI persona: {PERSONA_CAP} (routed by capability name), a signed result")
    table.add_row("job", f"{PERSONA_CAP} {escape(json.dumps(PERSONA_ARGS))}  [dim]exit 0, {elapsed:.1f} ms[/]")
    table.add_row("worker", f"{outcome.worker} (kind {safe_text(_kind_of(peers, PERSONA_CAP, outcome.worker))})")
    table.add_row("model", safe_text(value["model"]))
    check = "[green]matches[/] the messages the model server received" if matches else "[red]matches no request[/]"
    table.add_row("prompt sha256", f"{safe_text(value['prompt_sha256'])} ({check})")
    prompt, completion, total = (safe_text(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    table.add_row("usage", f"{prompt} prompt + {completion} completion = {total} tokens")
    table.add_row("output", safe_text(json.dumps(value["output"], ensure_ascii=False)))
    table.add_row("signed", f"{safe_text(outcome.frame.decode()[:24])}… (verified: worker key, job, request digest)")
    console.print(table)


async def _waiting_request(store: ApprovalStore, job_id: str, task: asyncio.Task[Outcome]) -> Request:
    """The waiting record the gated worker posts for *job_id* (what ``meshjobs approvals`` lists)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [r for r in await store.requests() if r.job_id == job_id and r.stage == "run"]
        if found and found[-1].state == "waiting":
            return found[-1]
        if task.done():
            await task  # raises what went wrong
            raise MeshError(f"{GATED_CAP} ran without waiting for approval")
        await asyncio.sleep(0.05)
    raise MeshError(f"{GATED_CAP} job {job_id} was not listed as waiting approval within 15 s")


async def _approval_gate(client: Client, identity: Identity, console: Console) -> None:
    """A gated job: it waits, this identity (the worker's operator) approves it, and the result carries that."""
    me = identity.public_key
    store = await ApprovalStore.open(client.nc)
    job_id = new_job_id()
    line = f"approval  {GATED_CAP} {escape(json.dumps(GATED_ARGS))}, job {job_id}"
    console.print(f"{line}: submitted; the worker needs an operator's signed approval first")
    started = time.perf_counter()
    task = asyncio.create_task(client.submit(GATED_CAP, GATED_ARGS, timeout=30, job_id=job_id))
    try:
        request = await _waiting_request(store, job_id, task)
        await asyncio.sleep(0.2)  # a moment in which nothing may run
        if task.done():
            await task  # raises what went wrong
            raise MeshError(f"{GATED_CAP} finished before it was approved")
        who = ", ".join("this identity" if k == me else short_key(k) for k in request.approvers)
        console.print(
            f"approval  [yellow]waiting approval[/]: `meshjobs approvals` lists job {request.job_id} "
            f"(state {request.state}, submitter {short_key(request.submitter)}, may decide: {who}); "
            "the handler has not run"
        )
        await store.decide(identity, request, "approve", APPROVE_REASON)
        console.print(
            f"approval  [green]approved[/] by {me} (this identity, an operator in the worker's trust file), "
            f'as `meshjobs approve {job_id} --reason "{APPROVE_REASON}"` signs it'
        )
        outcome = await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
    elapsed = (time.perf_counter() - started) * 1000
    decision = check_provenance(outcome.frame, open_envelope(outcome.request))
    if decision is None:
        raise MeshError(f"the result of {GATED_CAP} carries no approval")
    records = [r for r in await store.requests() if r.job_id == job_id and r.stage == "run"]
    listed = f"state {records[-1].state}, decided by {records[-1].decided_by}" if records else "[red]not listed[/]"
    table = _facts(f"approval gate: {GATED_CAP} ran once approved; the approval is in its signed provenance")
    table.add_row("result", f"{escape(json.dumps(outcome.value))}  [dim]exit 0, {elapsed:.1f} ms with the wait[/]")
    table.add_row("worker", outcome.worker)
    table.add_row(
        "approval",
        f"{decision.decision} by {decision.approver}{' (this identity)' if decision.approver == me else ''}, "
        f'reason "{safe_text(decision.reason)}"',
    )
    table.add_row("checked", "decision signature, job id, and the digest of what was approved (job, args, expiry)")
    table.add_row("listed", f"`meshjobs approvals --all`: {listed}")
    console.print(table)


async def _unknown_key_refused(url: str) -> str:
    """What the closed broker does with a key nobody admitted."""
    try:
        nc = await connect(url, Identity.generate())
    except ConnectError:
        return "an unknown key is refused at login"
    await nc.close()
    return "[red]an unknown key got in[/]"


def _persona_path() -> Path:
    spec = importlib.util.find_spec("workers")
    if spec is None or not spec.submodule_search_locations:
        raise MeshError("the workers package (workers/personas/) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "personas" / PERSONA_FILE


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


async def run_demo(home: Path | None = None) -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="meshjobs-demo-") as tmp:
        root = Path(tmp)
        home = home or root / "home"
        identity, _ = load_or_create(home / IDENTITY_FILE)
        console.print(f"identity  {identity.public_key}")
        stranger_id = Identity.generate()  # admitted to the broker, but not trusted by the workers
        admitted = closed_roles(identity.public_key, [stranger_id.public_key])
        broker = await asyncio.to_thread(embedded(root / "broker", admitted=admitted).start)
        children: list[Child] = []
        standin: OpenAIStandin | None = None
        try:
            console.print(
                f"broker    {broker.url} (nats-server pid {broker.pid}, JetStream on; closed: admits this identity "
                f"and one stranger key, {await _unknown_key_refused(broker.url)})"
            )
            wanted = {"demo.add", GATED_CAP}
            lines: list[str] = []
            if importlib.util.find_spec("openai") is None:
                lines.append(
                    "persona   [yellow]skipped[/]: AI persona peers need the ai extra (pip install -e '.\\[ai]')"
                )
            else:  # the slowest child to start (it loads the openai SDK): first
                standin = OpenAIStandin("127.0.0.1", 0).start()
                persona = _persona_path()
                served = ["persona", str(persona), "--base-url", standin.url, "--model", "standin"]
                children.append(_start("AI persona", served, broker.url, home, root / "persona.log"))
                lines.append(f"stand-in  {standin.url} (OpenAI-compatible chat completions, in this process)")
                lines.append(
                    f"persona   meshjobs persona {_shown(persona)} --base-url {standin.url} --model standin "
                    f"(pid {children[-1].process.pid}, kind ai)"
                )
                wanted.add(PERSONA_CAP)
            children.append(
                _start("demo worker", ["worker", "workers.demo:app"], broker.url, home, root / "worker.log")
            )
            lines.insert(0, f"worker    workers.demo:app (pid {children[-1].process.pid}, kind system)")
            trust = root / "trust.toml"
            trust.write_text(f'[[operator]]\nkey = "{identity.public_key}"\nname = "demo operator"\n')
            gated = ["worker", GATED_APP, "--trust", str(trust)]
            children.append(_start("gated worker", gated, broker.url, home, root / "gated.log"))
            lines.insert(
                1,
                f"worker    {GATED_APP} --trust {trust.name} (pid {children[-1].process.pid}, kind system; "
                f"{GATED_CAP} needs an operator's approval, and this identity is its operator)",
            )
            for line in lines:
                console.print(line)
            async with await Client.connect(broker.url, identity) as client:
                peers = await _wait_for_peers(client, children, wanted)
                peers_table(peers, console)
                async with await Client.connect(broker.url, stranger_id) as stranger:
                    await _submissions(client, stranger, console)
                if standin is not None:
                    await _persona_job(client, standin, peers, console)
                await _approval_gate(client, identity, console)
        finally:
            try:
                # The stand-in's shutdown takes up to half a second (its serve loop's poll): alongside the children's.
                closing = [_stop(children)] + ([asyncio.to_thread(standin.stop)] if standin is not None else [])
                await asyncio.gather(*closing)
            finally:
                broker.stop()
        stopped = "workers drained, stand-in and broker stopped" if standin else "workers drained and broker stopped"
        console.print(f"{stopped}; every result above was signed and verified.")


@click.command()
@click.option("--keep-home", is_flag=True, help="Use MESHJOBS_HOME instead of a throwaway identity.")
@guarded
def demo(keep_home: bool) -> None:
    """From nothing: a broker, system, AI and gated peers, signed commands, an approval; then tear down."""
    run(run_demo(home() if keep_home else None))
