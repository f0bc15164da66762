"""The README's "Run it locally" walk-through, run as written on a copy of the example topology with free ports.

Then `meshjobs doctor --topology` from the lab leaf: every check passes, locality included (the lab worker
answers the lab leaf's probes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.mesh import LocalMesh
from meshjobs.infra.topology import load_topology
from tests.closed_mesh import free_ports
from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.integration


def walkthrough() -> list[str]:
    """The shell lines of the README's "Run it locally" section, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("**Run it locally.**") : text.index("**Run it with Docker Compose.**")]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines += [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def copy_topology(target: Path) -> dict[int, int]:
    """`cp config/topology.toml mymesh.toml`, with every port moved to a free one; returns old -> new."""
    text = (REPO / "config" / "topology.toml").read_text()
    old = sorted({int(p) for p in re.findall(r"_port = (\d+)", text)})
    moved = dict(zip(old, free_ports(len(old)), strict=True))
    target.write_text(re.sub(r"(_port = )(\d+)", lambda m: m.group(1) + str(moved[int(m.group(2))]), text))
    return moved


def test_readme_federation_walkthrough(tmp_path: Path) -> None:
    lines = walkthrough()
    assert lines[-1] == "meshjobs mesh down --topology mymesh.toml"
    assert any("--community garage" in line for line in lines)  # the key is admitted where `peers` runs
    home = tmp_path / "home"
    identity = Identity.generate()
    save_identity(identity, home / IDENTITY_FILE)
    moved = copy_topology(tmp_path / "mymesh.toml")
    env = cli_env(home, PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    if shutil.which("meshjobs", path=env["PATH"]) is None:
        pytest.fail("the meshjobs command is not installed in .venv")
    background: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, str] = {}
    try:
        for line in lines[:-1]:
            command = re.sub(
                r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{moved.get(int(m.group(1)), m.group(1))}", line
            )
            if command.endswith("&"):
                # `VAR=x exec meshjobs …`: the PID is the worker's own, to stop it by PID.
                command = re.sub(r"(^|\s)meshjobs ", r"\1exec meshjobs ", command.rstrip("& "), count=1)
                log = (tmp_path / f"bg-{len(background)}.log").open("wb")
                background.append(
                    subprocess.Popen(["bash", "-c", command], env=env, cwd=tmp_path, stdout=log, stderr=log)
                )
                continue
            outputs[line] = run_until_ok(command, env, tmp_path, retry="peers" in line)
        peers_line = next(line for line in lines if line.endswith("meshjobs peers"))
        assert "demo.add" in outputs[peers_line] and "eu/lab" in outputs[peers_line]
        trust = home / "trust.toml"
        trust.write_text(f'[[operator]]\nkey = "{identity.public_key}"\n')
        lab = f"nats://127.0.0.1:{moved[4321]}"
        doctor = subprocess.run(
            ["meshjobs", "doctor", "--json", "--topology", "mymesh.toml", "--server", lab],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        checks = {c["check"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert doctor.returncode == 0, doctor.stdout
        assert checks["locality"]["status"] == "pass" and checks["locality"]["where"] == "community lab"
        assert "3 replica(s) each in eu" in checks["state"]["detail"]
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        down = run_until_ok(lines[-1], env, tmp_path, retry=False)
        assert "stopped" in down
        assert not LocalMesh(load_topology(tmp_path / "mymesh.toml"), home / "mesh" / "example").down()
    assert all(proc.returncode == 0 for proc in background)


def run_until_ok(command: str, env: dict[str, str], cwd: Path, *, retry: bool, timeout: float = 30) -> str:
    """Run one README line in bash; lines that look at discovery get a few seconds for a worker to appear."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
        if out.returncode == 0 and (not retry or "demo.add" in out.stdout):
            return out.stdout
        if not retry or time.monotonic() > deadline:
            raise AssertionError(f"{command!r} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        time.sleep(0.5)
