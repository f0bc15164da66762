"""``meshjobs persona FILE``: serve an AI persona (an OpenAI-compatible model) as a worker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshjobs import Identity, TrustPolicy, Worker, WorkerConfig
from meshjobs.cli._common import (
    guarded,
    run,
    worker_options,
    worker_setup,
)

if TYPE_CHECKING:  # the openai SDK is imported only when a persona is served
    from meshjobs.peers.ai import PersonaPeer


@click.command()
@click.argument("persona_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base-url", help="Override the persona's endpoint base_url (an OpenAI-compatible /v1 URL).")
@click.option("--model", help="Override the persona's endpoint model.")
@click.option("--api-key-env", help='Override the name of the variable holding the API key ("" for none).')
@click.option("--check", is_flag=True, help="Validate the file and the API key variable, print a summary, exit.")
@worker_options
@guarded
def persona(
    persona_file: Path,
    base_url: str | None,
    model: str | None,
    api_key_env: str | None,
    check: bool,
    **opts: Any,
) -> None:
    """Serve an AI persona file: meshjobs persona workers/personas/security-analysis.toml

    The persona names an OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp
    server, OpenAI), a system prompt and capabilities with JSON-schema
    arguments and results; its API key comes from the environment variable
    the file names, never from the file.
    """
    from meshjobs.peers.ai import PersonaPeer, load_persona, resolve_api_key, with_endpoint

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
    identity, policy, config, urls = worker_setup(opts)
    run(_serve(peer, identity, policy, config, urls))


async def _serve(
    peer: PersonaPeer, identity: Identity, policy: TrustPolicy, config: WorkerConfig, urls: list[str]
) -> None:
    try:
        await Worker(peer.app, identity, policy, config).serve(urls)
    finally:
        await peer.aclose()
