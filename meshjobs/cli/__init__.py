"""The ``meshjobs`` command line. Thin: parse, call the library, print one clear line.

This module only builds the group and registers the commands; each command
family lives in its own module and shares helpers through ``_common``.
Nothing in the library imports from here.
"""

from __future__ import annotations

import logging
import sys

import click

from meshjobs._version import __version__
from meshjobs.cli.approvals import approvals, approve, reject
from meshjobs.cli.celery_bridge import celery_bridge
from meshjobs.cli.dashboard import dashboard
from meshjobs.cli.demo import demo
from meshjobs.cli.doctor import doctor
from meshjobs.cli.human import human, hybrid
from meshjobs.cli.identity import keygen, show_id
from meshjobs.cli.jobs import jobs
from meshjobs.cli.mesh import broker, mesh
from meshjobs.cli.persona import persona
from meshjobs.cli.serve import up, worker
from meshjobs.cli.sim import sim
from meshjobs.cli.submit import peers, submit
from meshjobs.cli.trust import attest, quarantine, release, reputation
from meshjobs.cli.trust_serve import trust


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshjobs")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Run commands on a federated NATS mesh of peers, signed end to end."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


COMMANDS: tuple[click.Command, ...] = (keygen, show_id, up, worker, persona, celery_bridge, submit, jobs, peers)
COMMANDS += (reputation, quarantine, release, broker, mesh, demo, sim)
COMMANDS += (dashboard,)
COMMANDS += (doctor,)
COMMANDS += (human, hybrid)
COMMANDS += (trust,)
COMMANDS += (approvals, approve, reject)
COMMANDS += (attest,)
for command in COMMANDS:
    main.add_command(command)
