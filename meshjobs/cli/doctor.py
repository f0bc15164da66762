"""``meshjobs doctor``: one pass/fail line per check of the mesh as seen from here."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meshjobs.cli._common import DAY_S, Seconds, guarded, home, identity_for_use, run, server_option, servers


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: ok, and every check.")
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MESHJOBS_TOPOLOGY",
              help="Check replicas, placement and locality against this topology (env MESHJOBS_TOPOLOGY).")  # fmt: skip
@click.option("--capability", "capabilities", multiple=True, metavar="NAME",
              help="A capability that must be served, advertised or not (repeatable).")  # fmt: skip
@click.option("--trust", "trust_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Trust file to check [default: MESHJOBS_HOME/trust.toml].")  # fmt: skip
@click.option("--max-skew", type=Seconds(max=DAY_S, positive=True), default=60.0, show_default=True,
              help="Largest clock difference to a worker: the workers' replay window.")  # fmt: skip
@click.option("--timeout", type=Seconds(max=60.0, positive=True), default=2.0, show_default=True,
              help="Seconds each probe and request may take.")  # fmt: skip
@server_option
@guarded
def doctor(
    as_json: bool,
    topology_path: Path | None,
    capabilities: tuple[str, ...],
    trust_file: Path | None,
    max_skew: float,
    timeout: float,
    server: str,
) -> None:
    """Check the mesh from here; exit 1 if any check fails.

    \b
    broker       the server answers a round trip
    jetstream    JetStream answers through the hub domain
    state        every stream and bucket exists (with --topology: its
                 replicas, in its region, all current)
    capability   each advertised (or --capability) capability's queue group
                 consumes: the probe is a signed envelope that expired a day
                 ago, which a worker refuses ("expired") after checking its
                 signature, so it proves a live, verifying consumer and
                 runs nothing
    locality     with --topology: a capability offered in this community
                 (leaf) or region (hub) is answered there
    clocks       each answering worker's clock agrees with this machine's
                 within --max-skew (from its signed answer's time)
    trust        the trust file parses and lists an [[operator]]
    """
    from meshjobs.catalog import MESH_STATE
    from meshjobs.infra.topology import load_topology
    from meshjobs.observe.doctor import FAIL, Options, diagnose
    from meshjobs.subjects import check_capability
    from meshjobs.trust.policy import TRUST_FILE

    for name in capabilities:
        check_capability(name)
    urls = servers(server)
    options = Options(
        servers=urls,
        identity=identity_for_use(),
        trust_file=trust_file or home() / TRUST_FILE,
        topology=load_topology(topology_path) if topology_path else None,
        capabilities=capabilities,
        specs=MESH_STATE,
        max_skew_s=max_skew,
        timeout=timeout,
    )
    checks = run(diagnose(options))
    ok = not any(c.status == FAIL for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        _print(checks)
    if not ok:
        raise SystemExit(1)


def _print(checks: list[object]) -> None:
    from meshjobs.cli._render import safe_text
    from meshjobs.observe.doctor import FAIL, PASS, Check

    marks = {PASS: ("PASS", "green"), FAIL: ("FAIL", "red")}
    for check in checks:
        assert isinstance(check, Check)
        mark, colour = marks.get(check.status, ("SKIP", "yellow"))
        label = click.style(mark, fg=colour, bold=check.status == FAIL)
        click.echo(f"{label} {check.name}: {safe_text(check.detail, markup=False)}")
    failed = sum(c.status == FAIL for c in checks if isinstance(c, Check))
    click.echo(f"{failed} check(s) failed" if failed else "all checks passed")
