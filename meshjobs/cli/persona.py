"""``meshjobs persona FILE``: serve an AI persona (an OpenAI-compatible model) as a worker."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meshjobs import Identity, TrustPolicy, Worker, WorkerConfig
from meshjobs.cli._common import DAY_S, Seconds, guarded, home, identity_for_use, run, server_option, servers
from meshjobs.trust.policy import TRUST_FILE, load_trust

if TYPE_CHECKING:  # the openai SDK is imported only when a persona is served
    from meshjobs.peers.ai import PersonaPeer


@click.command()
@click.argument("persona_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base-url", help="Override the persona's endpoint base_url (an OpenAI-compatible /v1 URL).")
@click.option("--model", help="Override the persona's endpoint model.")
@click.option("--api-key-env", help='Override the name of the variable holding the API key ("" for none).')
@click.option("--check", is_flag=True, help="Validate the file and the API key variable, print a summary, exit.")
@click.option(
    "--concurrency", "-c", type=click.IntRange(1, 10000), default=16, show_default=True, help="Jobs run at once."
)
@click.option("--name", help="Display name in discovery [default: the persona's name].")
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
@click.option("--max-attempts", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Runs of a failing durable job before it goes to the dead-letter queue.")  # fmt: skip
@click.option("--retry-delay", type=Seconds(max=DAY_S), default=1.0, show_default=True,
              help="Seconds before a failed durable job runs again; doubles each time.")  # fmt: skip
@server_option
@guarded
def persona(
    persona_file: Path,
    base_url: str | None,
    model: str | None,
    api_key_env: str | None,
    check: bool,
    concurrency: int,
    name: str | None,
    region: str,
    community: str,
    trust_file: Path | None,
    drain_timeout: float,
    max_attempts: int,
    retry_delay: float,
    server: str,
) -> None:
    """Serve an AI persona file: meshjobs persona workers/personas/security-analysis.toml

    The persona names an OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp
    server, OpenAI), a system prompt and capabilities with JSON-schema
    arguments and results; its API key comes from the environment variable
    the file names, never from the file.
    """
    from meshjobs.peers.ai import PersonaPeer, load_persona, resolve_api_key, with_endpoint

    logging.getLogger("meshjobs").setLevel(min(logging.getLogger().level, logging.INFO))
    spec = with_endpoint(
        load_persona(persona_file), str(persona_file), base_url=base_url, model=model, api_key_env=api_key_env
    )
    peer = PersonaPeer(spec, resolve_api_key(spec, os.environ))
    if check:
        endpoint = spec.endpoint
        click.echo(f"{spec.name}: {endpoint.model} at {endpoint.base_url} ({endpoint.structured})")
        for cap in spec.capabilities:
            tags = f" [{', '.join(cap.tags)}]" if cap.tags else ""
            click.echo(f"  {cap.name}{tags}: {cap.description} (timeout {peer.job_timeout(cap):g} s)")
        return
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
    run(_serve(peer, identity, policy, config, servers(server)))


async def _serve(
    peer: PersonaPeer, identity: Identity, policy: TrustPolicy, config: WorkerConfig, urls: list[str]
) -> None:
    try:
        await Worker(peer.app, identity, policy, config).serve(urls)
    finally:
        await peer.aclose()
