"""The example mesh as containers, following the README's "Docker" section.

Images built offline (a debootstrapped Python base, ``meshjobs mesh images``),
secrets generated and the services admitted (``meshjobs mesh secrets``), the
compose directory rendered (``meshjobs mesh compose``), the mesh brought up with
Debian's docker-compose 1.29 (or ``MESHJOBS_COMPOSE="docker compose"`` for v2),
its health read (``meshjobs mesh status``), a signed job from this host run by
a containerised worker, and everything torn down (``down -v``), leaving no
container behind.

Every container uses host networking on loopback ports chosen free for the
run. Needs a Docker engine (scripts/ensure-docker) and Docker Compose
(scripts/ensure-compose): without them the test is skipped with the reason,
except under ``CI=true``, where that is a failure. The first run builds the
base image (about a minute and a half) and the worker image (about a minute);
Docker's cache keeps later runs short.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit

from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.compose import (
    COMPOSE_FILE,
    TRUST_SERVICE,
    compose_files,
    service_names,
    worker_service,
)
from meshjobs.infra.images import BROKER_DOCKERFILE, BROKER_IMAGE, WORKER_DOCKERFILE, WORKER_IMAGE, PythonTarget
from meshjobs.infra.topology import load_topology
from tests.closed_mesh import free_ports
from tests.conftest import REPO, cli_env, meshjobs

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "config" / "topology.toml"
PORT_FIELDS = ("client_port", "cluster_port", "gateway_port", "leaf_port", "monitor_port")


def _codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    found = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
    return found.group(1) if found else "bookworm"


#: The worker image's base: made offline by scripts/build-python-base unless given.
BASE = os.environ.get("MESHJOBS_TEST_BASE") or f"meshjobs/python-base:{_codename()}"


def _compose_command() -> list[str]:
    chosen = os.environ.get("MESHJOBS_COMPOSE")
    if chosen:
        return shlex.split(chosen)
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


COMPOSE = _compose_command()


def _answers(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _engine_problem() -> str | None:
    if not shutil.which("docker"):
        return "the docker command is missing; run scripts/ensure-docker"
    if not _answers(["docker", "info"]):
        return "no Docker engine answers; start one with scripts/ensure-docker"
    if not _answers([*COMPOSE, "version"]):
        return f"{' '.join(COMPOSE)} does not run; install it with scripts/ensure-compose"
    return None


def _need_engine() -> None:
    problem = _engine_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs Docker and Docker Compose: {problem}")
        pytest.skip(problem)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"{done.args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The broker and worker images, built offline as the README says (cached by Docker)."""
    _need_engine()
    started = time.monotonic()
    if BASE.startswith("meshjobs/python-base:") and not _answers(["docker", "image", "inspect", BASE]):
        subprocess.run([str(REPO / "scripts" / "build-python-base"), BASE], check=True, timeout=900)
    home = tmp_path_factory.mktemp("images-home")
    built = ok(meshjobs("mesh", "images", "--base", BASE, env=cli_env(home), timeout=1500))
    assert built.stdout.split() == [BROKER_IMAGE, WORKER_IMAGE]
    print(f"images ready in {time.monotonic() - started:.1f} s")
    yield [BROKER_IMAGE, WORKER_IMAGE]


def copy_topology(target: Path, name: str) -> dict[int, int]:
    """`cp config/topology.toml mymesh.toml`, with free ports and a mesh name of its own; returns old -> new port."""
    document = tomlkit.parse(EXAMPLE.read_text())
    nodes = [node for region in document["region"] for node in region["nodes"]]
    old = [int(node[f]) for node in nodes for f in PORT_FIELDS]
    old += [int(c[f]) for c in document["community"] for f in ("client_port", "monitor_port")]
    moved = dict(zip(old, free_ports(len(old)), strict=True))
    document["mesh"]["name"] = name  # its own compose project: never a user's "meshjobs-example"
    for table in [*nodes, *document["community"]]:
        for field in PORT_FIELDS:
            if field in table:
                table[field] = moved[int(table[field])]
    target.write_text(tomlkit.dumps(document))
    return moved


def readme_docker_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Docker\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def walkthrough() -> list[str]:
    """The shell lines of the README's Docker section, comments dropped."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", readme_docker_section(), re.S):
        lines += [re.sub(r"(^|\s+)#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line]


#: README lines about images: the `images` fixture runs them (the one without --base needs a registry).
IMAGE_LINES = ("scripts/build-python-base", "meshjobs mesh images --base meshjobs/python-base:bookworm")


def test_readme_walkthrough_is_what_the_test_expects() -> None:
    lines = walkthrough()
    assert [line for line in lines if "images" in line or "python-base" in line] == [
        "meshjobs mesh images",
        *IMAGE_LINES,
    ]
    assert lines[-1] == "cd meshjobs-compose && docker-compose down -v"
    assert "meshjobs mesh secrets --topology mymesh.toml --out meshjobs-compose" in lines
    assert any(line.startswith("meshjobs submit demo.add") for line in lines)


def test_compose_writes_a_new_directory_and_never_overwrites(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    first = ok(meshjobs("mesh", "compose", "--topology", "config/topology.toml", "--out", str(tmp_path / "c"), env=env))
    assert "next: meshjobs mesh secrets" in first.stdout
    again = meshjobs("mesh", "compose", "--topology", "config/topology.toml", "--out", str(tmp_path / "c"), env=env)
    assert again.returncode == 2 and "pass --force" in again.stderr
    forced = meshjobs("mesh", "compose", "--topology", "config/topology.toml", "--out", str(tmp_path / "c"),
                      "--force", env=env)  # fmt: skip
    ok(forced)
    # The default is a directory of its own, never the committed files.
    help_text = ok(meshjobs("mesh", "compose", "--help", env=env)).stdout
    assert "./meshjobs-compose" in help_text


def test_rendering_and_recipes_are_committed() -> None:
    """The repository's docker-compose.yml and brokers/ are the rendering of config/topology.toml."""
    for rel, text in compose_files(load_topology(EXAMPLE), "config/topology.toml").items():
        assert (REPO / rel).read_text() == text, f"{rel} is stale: run meshjobs mesh compose --out . --force"
    assert (REPO / "brokers" / "Dockerfile").read_text() == BROKER_DOCKERFILE
    assert (REPO / "brokers" / "worker.Dockerfile").read_text() == WORKER_DOCKERFILE
    rendered = (REPO / COMPOSE_FILE).read_text()
    assert not re.search(r"^name:", rendered, re.M), "docker-compose 1.29 refuses a top-level name"
    assert "build:" not in rendered and "privileged" not in rendered
    topology = load_topology(EXAMPLE)
    assert service_names(topology)[-3:] == [worker_service("lab"), worker_service("garage"), TRUST_SERVICE]


def test_platform_tags_go_down_to_old_glibc() -> None:
    tags = PythonTarget((3, 11), (2, 36), "x86_64").platforms()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)


def test_every_available_compose_accepts_the_file(tmp_path: Path) -> None:
    """`config -q` by docker-compose 1.29 and by `docker compose` v2, whichever are installed (one at least)."""
    _need_engine()
    ok(meshjobs("mesh", "compose", "--topology", "config/topology.toml", "--out", str(tmp_path),
                env=cli_env(tmp_path / "home")))  # fmt: skip
    tried = []
    for command in (["docker-compose"], ["docker", "compose"]):
        if _answers([*command, "version"]):
            done = subprocess.run([*command, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
            tried.append(" ".join(command))
    print("accepted by: " + ", ".join(tried))
    assert tried


@pytest.mark.timeout(2400)
def test_readme_docker_walkthrough(tmp_path: Path, images: list[str]) -> None:
    """The README's Docker section, line by line (images from the fixture), on free ports; then nothing is left."""
    started = time.monotonic()
    home = tmp_path / "home"
    me = Identity.generate()
    save_identity(me, home / IDENTITY_FILE)
    env = cli_env(home, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    name = f"compose-{secrets.token_hex(3)}"
    project = f"meshjobs-{name}"
    lines = [line for line in walkthrough() if "images" not in line and "python-base" not in line]
    moved: dict[int, int] = {}
    outputs: dict[str, str] = {}

    def run(line: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{moved.get(int(m.group(1)), m.group(1))}", line)
        command = command.replace("docker-compose ", " ".join(COMPOSE) + " ")
        return subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    try:
        for line in lines[:-1]:
            if line == "cp config/topology.toml mymesh.toml":
                moved = copy_topology(tmp_path / "mymesh.toml", name)
                continue
            done = run(line)
            if done.returncode != 0:
                logs = run("cd meshjobs-compose && docker-compose logs --tail 30").stdout
                raise AssertionError(f"{line!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{logs}")
            outputs[line] = done.stdout
        submitted = next(out for line, out in outputs.items() if line.startswith("meshjobs submit demo.add"))
        assert submitted.strip() == "5"
        made = next(out for line, out in outputs.items() if line.startswith("meshjobs mesh secrets"))
        keys = dict(re.findall(r"^([a-z-]+): (U[A-Z2-7]{55}) admitted", made, re.M))
        topology = load_topology(tmp_path / "mymesh.toml")
        assert sorted(keys) == sorted(service_names(topology)[len(topology.server_names()) :])
        assert keys[worker_service("lab")] in topology.community_named("lab").workers
        assert keys[TRUST_SERVICE] in topology.mesh.trust_services
        out = tmp_path / "meshjobs-compose"
        assert oct((out / "secrets").stat().st_mode & 0o777) == "0o700"
        assert oct((out / "secrets" / "worker-lab" / IDENTITY_FILE).stat().st_mode & 0o777) == "0o600"
        # Nobody but the containerised workers offers demo.add on this mesh: they ran the job.
        status = run("meshjobs mesh status --topology mymesh.toml --json")
        health = json.loads(status.stdout)
        assert status.returncode == 0 and health["healthy"] and len(health["servers"]) == 8
        running = run("cd meshjobs-compose && docker-compose ps -q").stdout.split()
        assert len(running) == len(service_names(topology)), running
        print(f"README walkthrough: mesh up and a job done in containers in {time.monotonic() - started:.1f} s")
    finally:
        down = run(lines[-1])
        label = f"label=com.docker.compose.project={project}"
        left = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True,
                              timeout=60).stdout.split()  # fmt: skip
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", label], capture_output=True, text=True,
                                 timeout=60).stdout.split()  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert left == [], f"containers left behind: {left}"
    assert volumes == [], f"volumes left behind: {volumes}"
    print(f"compose walkthrough done in {time.monotonic() - started:.1f} s")
