"""``meshjobs human APP_OR_FILE`` and ``meshjobs hybrid PERSONA_FILE``: a person answers jobs in a terminal inbox."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshjobs.cli._common import guarded, home, load_app, run, worker_options, worker_setup
from meshjobs.errors import UsageError
from meshjobs.identity import Identity, load_or_create

if TYPE_CHECKING:
    from meshjobs.peers.human import HumanPeer, Inbox, Score, Task
    from meshjobs.runtime.config import WorkerConfig
    from meshjobs.trust.policy import TrustPolicy

    MakePeer = Callable[[Inbox, Score], HumanPeer]

LOG_FILE = "inbox.log"

_inbox_options = (
    click.option("--live", is_flag=True,
                 help="Also take live (non-durable) jobs; they reach the inbox at once and fail at the "
                      "submitter's timeout. Default: refused, with a hint to submit --durable."),
    click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path),
                 help=f"Log file (the terminal belongs to the inbox) [default: MESHJOBS_HOME/{LOG_FILE}]."),
)  # fmt: skip


def inbox_options(func: Any) -> Any:
    for option in reversed(_inbox_options):
        func = option(func)
    return func


@click.command()
@click.argument("source", metavar="APP_OR_FILE")
@inbox_options
@worker_options
@guarded
def human(source: str, live: bool, log_file: Path | None, **opts: Any) -> None:
    """Answer jobs yourself, in a terminal inbox: meshjobs human workers.people:app (or FILE.toml)

    The capabilities come from an App (MODULE:ATTR: arguments and result from
    its type hints; its handlers never run) or from a TOML file (JSON-schema
    arguments and results, the capability format of persona files). Jobs come
    from the durable queue, one per claim (key c), so several people can
    share a capability; answers are signed with this identity's key. Submit
    with: meshjobs submit --durable --wait SECONDS CAPABILITY ARGS
    """
    from meshjobs.peers.human import HumanPeer, load_human_file, task_from_spec, tasks_from_app

    path = Path(source)
    if source.endswith(".toml") or (":" not in source and path.is_file()):
        spec = load_human_file(path)
        tasks = {cap.name: task_from_spec(cap) for cap in spec.capabilities}
        name, description = spec.name, spec.description or spec.instructions
    else:
        app = load_app(source)
        tasks, name, description = tasks_from_app(app), app.name, app.description

    def make(inbox: Inbox, score: Score) -> HumanPeer:
        return HumanPeer(name, tasks, description=description, inbox=inbox, live=live, score=score)

    identity, policy, config, urls = worker_setup(opts)
    run(_serve(make, tasks, identity, policy, config, urls, log_file or home() / LOG_FILE))


@click.command()
@click.argument("persona_file", metavar="PERSONA_FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base-url", help="Override the persona's endpoint base_url (an OpenAI-compatible /v1 URL).")
@click.option("--model", help="Override the persona's endpoint model.")
@click.option("--api-key-env", help='Override the name of the variable holding the API key ("" for none).')
@click.option("--persona-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The persona's own key file, which signs its drafts "
                   "[default: MESHJOBS_HOME/personas/NAME.nk, created on first use].")  # fmt: skip
@inbox_options
@worker_options
@guarded
def hybrid(
    persona_file: Path,
    base_url: str | None,
    model: str | None,
    api_key_env: str | None,
    persona_key: Path | None,
    live: bool,
    log_file: Path | None,
    **opts: Any,
) -> None:
    """AI drafts, you decide: meshjobs hybrid workers/personas/security-analysis.toml

    Each job of the persona's capabilities is drafted by its model first
    (signed by the persona's own key) and shown in the inbox with the draft
    in the editor: send it as it is (approved), edit it (edited) or decline
    (rejected). The result, signed by your key, carries the final output, the
    signed draft, the decision and whether you changed the draft.
    """
    from meshjobs.peers.ai import load_persona, resolve_api_key, with_endpoint
    from meshjobs.peers.human import task_from_spec
    from meshjobs.peers.hybrid import hybrid_peer

    spec = with_endpoint(
        load_persona(persona_file), str(persona_file), base_url=base_url, model=model, api_key_env=api_key_env
    )
    api_key = resolve_api_key(spec, os.environ)
    key_path = persona_key or home() / "personas" / f"{spec.name}.nk"
    persona_identity, created = load_or_create(key_path)
    if created:
        click.echo(f"meshjobs: created the persona's key {persona_identity.public_key} at {key_path}", err=True)
    identity, policy, config, urls = worker_setup(opts)
    if persona_identity.public_key == identity.public_key:
        raise UsageError("the persona's key must not be your own: the result carries both signatures")
    tasks = {cap.name: task_from_spec(cap) for cap in spec.capabilities}
    models: list[Any] = []

    def make(inbox: Inbox, score: Score) -> HumanPeer:
        peer, persona_peer = hybrid_peer(spec, api_key, persona_identity, inbox=inbox, live=live, score=score)
        models.append(persona_peer)
        return peer

    async def close_models() -> None:
        for persona_peer in models:
            await persona_peer.aclose()

    run(_serve(make, tasks, identity, policy, config, urls, log_file or home() / LOG_FILE, close_models))


def _log_to(path: Path) -> None:
    """Send log lines to *path*: the terminal belongs to the inbox."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _person(config: WorkerConfig, identity: Identity) -> str:
    """How other inboxes name this person ("claimed by ..."): --name, else the login name. Display only."""
    if config.name:
        return config.name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return identity.public_key[:12]


async def _serve(
    make: MakePeer,
    tasks: dict[str, Task],
    identity: Identity,
    policy: TrustPolicy,
    config: WorkerConfig,
    urls: list[str],
    log_file: Path,
    cleanup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    from meshjobs._nats import close_quietly, connect
    from meshjobs.durable import Durable
    from meshjobs.peers.desk import Desk, Scores
    from meshjobs.peers.human import Inbox
    from meshjobs.peers.inbox_view import InboxView
    from meshjobs.runtime.worker import Worker

    person = _person(config, identity)
    where = ", ".join(urls)
    click.echo(f"meshjobs: connecting to {where} as {person} ({identity.public_key}); log {log_file}", err=True)
    _log_to(log_file)
    nc = await connect(urls, identity, name=f"meshjobs-human-{person}", forever=True)
    worker: Worker | None = None
    desk: Desk | None = None
    try:
        scores = await Scores.open(nc, identity, policy.trust_services)
        inbox = Inbox(tasks, me=identity.public_key, names=policy.names)
        peer = make(inbox, scores.score)
        # The worker answers discovery (kind human or hybrid) and live jobs; durable ones come from the desk.
        worker = Worker(peer.app, identity, policy, replace(config, durable=False))
        await worker.start(nc)
        desk = Desk(peer, await Durable.open(nc), identity, worker.verify, person)
        await desk.start()
        view = InboxView(inbox, f"{peer.app.kind} · {person} ({identity.public_key[:8]}…) · {', '.join(tasks)}")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, view.exit)
        try:
            await view.run_async()
        finally:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    finally:
        if desk is not None:
            await desk.close()
        if worker is not None:
            await worker.drain()
        if cleanup is not None:
            await cleanup()
        await close_quietly(nc)
    click.echo("meshjobs: inbox closed; held jobs were handed back", err=True)
