"""``meshjobs keygen`` and ``meshjobs id``: this peer's identity."""

from __future__ import annotations

import json

import click

from meshjobs.cli._common import guarded, home
from meshjobs.identity import IDENTITY_FILE, Identity, load_identity, save_identity

# -- identity ------------------------------------------------------------------


@click.command()
@click.option("--force", is_flag=True, help="Replace an existing identity (the old key is lost).")
@guarded
def keygen(force: bool) -> None:
    """Create this peer's identity (an Ed25519 nkey) under MESHJOBS_HOME."""
    path = home() / IDENTITY_FILE
    identity = Identity.generate()
    save_identity(identity, path, overwrite=force)
    click.echo(identity.public_key)
    click.echo(f"meshjobs: identity written to {path} (mode 0600)", err=True)


@click.command("id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@guarded
def show_id(as_json: bool) -> None:
    """Show this peer's public key (its identity)."""
    path = home() / IDENTITY_FILE
    identity = load_identity(path)
    if as_json:
        click.echo(json.dumps({"peer": identity.public_key, "path": str(path)}))
    else:
        click.echo(identity.public_key)
