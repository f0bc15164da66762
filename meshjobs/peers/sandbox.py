"""Sandboxed execution: run a command in a locked-down Docker container.

::

    spec = ContainerSpec(image="meshjobs/sandbox-busybox:1", timeout=10)
    result = await run_in_container(spec, ["sh", "-c", "wc -c < in.txt"], files={"in.txt": b"hello"})

A container gets no network, a read-only root, tmpfs at ``/tmp`` and ``/work``
(its working dir), memory capped with no swap, a CPU quota, a pids limit,
``no-new-privileges``, no capabilities, a non-root user, no IPC and no logging
driver (output is read from the attach stream, up to a cap). It is killed at the
wall-clock limit and always removed. Input files travel as a tar on stdin,
unpacked by the image's ``sh`` and ``tar``: ``docker cp`` refuses a read-only
root and cannot reach a tmpfs. The Docker SDK (``meshjobs[docker]``) is
imported on first use; the engine is ``engine`` if given, else ``DOCKER_HOST``
or the default socket. :func:`sandboxed_capability` serves this on the mesh.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, Literal, cast

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, RootModel, field_validator

from meshjobs import App, JobContext
from meshjobs.errors import MeshError, UsageError

DEFAULT_IMAGE = "meshjobs/sandbox-busybox:1"  # built offline by scripts/build-sandbox-image
LABEL = "meshjobs.sandbox"  # on every container made here: docker ps -a --filter label=meshjobs.sandbox
WORKDIR = "/work"
MAX_INPUT_BYTES = 4 * 1024 * 1024  # files plus stdin of one run
MAX_ARGV_BYTES = 128 * 1024
_STDIN_FILE = "/tmp/.meshjobs-stdin"
# Unpack the input tar (files under work/, stdin as tmp/.meshjobs-stdin), then
# run argv with that stdin. "$@" keeps argv exact: nothing is re-parsed by a shell.
_UNPACK = f'tar -x -o -f - -C / && exec "$@" <{_STDIN_FILE}'
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_IMAGE_RE = r"^[a-z0-9][a-z0-9._/:@-]{0,254}$"
_USER_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$"
_MIB = 1024 * 1024
_KILL_GRACE = 10.0


class SandboxError(MeshError):
    """A sandboxed run could not be carried out (the engine refused it, the image is missing, ...)."""

    exit_code = 1


class SandboxUnavailable(SandboxError):
    """The Docker engine or its SDK is not there: nothing was run."""

    exit_code = 3


class ImageNotAllowed(UsageError):
    """The image is not in the operator's allowlist: nothing was started."""


class SandboxInputError(UsageError, ValueError):
    """Bad argv, file names or input sizes. Also a ValueError, so pydantic validators report it as one."""


class ContainerSpec(BaseModel):
    """What a container may use. Frozen and validated; defaults are the strict ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(pattern=_IMAGE_RE)
    user: str = Field(default="65534:65534", pattern=_USER_RE)  # uid:gid or a name, never root
    memory_bytes: int = Field(default=256 * _MIB, ge=8 * _MIB)  # memory, and memory+swap: no swap
    cpus: float = Field(default=1.0, ge=0.01, le=1024)
    pids_limit: int = Field(default=64, ge=4, le=65536)
    tmpfs_bytes: int = Field(default=64 * _MIB, ge=_MIB)  # each of /tmp and /work
    network: Literal["none", "bridge"] = "none"  # never "host": the host's loopback has the broker
    timeout: float = Field(default=30.0, gt=0, le=86400)  # wall-clock seconds from start to kill
    output_bytes: int = Field(default=64 * 1024, ge=0, le=256 * _MIB)  # kept per stream; the rest is dropped
    read_only: bool = True

    @field_validator("user")
    @classmethod
    def _not_root(cls, user: str) -> str:
        if user.split(":")[0] in ("0", "root") or user.endswith(":0") or user.endswith(":root"):
            raise ValueError("containers never run as root (uid or gid 0)")
        return user


class SandboxResult(BaseModel):
    """What a run came to. ``stdout``/``stderr`` hold at most the spec's ``output_bytes`` each."""

    model_config = ConfigDict(frozen=True)

    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_seconds: float
    timed_out: bool
    oom_killed: bool

    def as_text(self) -> dict[str, Any]:
        """A JSON-ready dict with the output decoded as UTF-8 (invalid bytes replaced)."""
        text = {"stdout": self.stdout.decode("utf-8", "replace"), "stderr": self.stderr.decode("utf-8", "replace")}
        return {**self.model_dump(), **text}


def check_argv(argv: list[str]) -> list[str]:
    """Refuse an empty argv, NUL bytes and oversized command lines (SandboxInputError)."""
    if not argv or not argv[0]:
        raise SandboxInputError("argv must name a program")
    if len(argv) > 1024 or sum(len(a.encode()) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise SandboxInputError(f"argv is longer than {MAX_ARGV_BYTES} bytes or 1024 items")
    if any("\0" in a for a in argv):
        raise SandboxInputError("argv must not contain NUL characters")
    return argv


def check_files(files: Mapping[str, bytes], stdin: bytes = b"") -> None:
    """Refuse unsafe names (absolute, '..', dot files) and inputs above MAX_INPUT_BYTES."""
    if len(files) > 256:
        raise SandboxInputError("at most 256 input files")
    for name in files:
        parts = name.split("/")
        if len(name) > 512 or len(parts) > 8 or not all(_NAME_PART.fullmatch(p) for p in parts):
            raise SandboxInputError(f"file name {name[:80]!r}: use relative paths of letters, digits, '.', '_', '-'")
    total = sum(len(data) for data in files.values()) + len(stdin)
    if total > MAX_INPUT_BYTES:
        raise SandboxInputError(f"input of {total} bytes exceeds the {MAX_INPUT_BYTES}-byte limit")


def check_image(image: str, allowed: Iterable[str]) -> None:
    """Raise :class:`ImageNotAllowed` unless *image* is exactly one of *allowed*."""
    if image not in set(allowed):
        raise ImageNotAllowed(f"image {image!r} is not in this worker's allowlist")


def _input_tar(files: Mapping[str, bytes], stdin: bytes) -> bytes:
    buffer = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
        members = [(f"work/{d}", None) for d in dirs] + [(f"work/{n}", d) for n, d in sorted(files.items())]
        for path, data in [*members, (_STDIN_FILE.lstrip("/"), stdin)]:
            info = tarfile.TarInfo(path)
            info.mtime = now
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _docker() -> Any:
    try:
        import docker
    except ImportError:
        raise SandboxUnavailable("the Docker SDK is not installed: install meshjobs[docker]") from None
    return docker


@contextmanager
def _engine_errors(engine: str | None) -> Iterator[None]:
    """Translate the SDK's and requests' exceptions into ours, in one place."""
    docker = _docker()
    import requests

    where = engine or "DOCKER_HOST or the default socket"
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxError(f"image not on the engine: {exc.explanation} (see scripts/build-sandbox-image)") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"the Docker engine refused: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        root: BaseException = exc
        for _ in range(16):  # the OS error at the bottom of the chain says it best ("Connection refused")
            root = root.__cause__ or root.__context__ or root
        why = " ".join(str(getattr(root, "strerror", None) or root or type(root).__name__).split())
        raise SandboxUnavailable(f"Docker engine unreachable at {where}: {why[:200]}") from exc


def _connect(engine: str | None) -> Any:
    docker = _docker()
    with _engine_errors(engine):
        kwargs = {"base_url": engine} if engine else docker.utils.kwargs_from_env()
        # version="auto" asks the engine for its API version: the reachability check.
        return docker.APIClient(version="auto", timeout=30, **kwargs)


def _create(api: Any, spec: ContainerSpec, argv: list[str], piped: bool, labels: Mapping[str, str]) -> str:
    docker = _docker()
    tmpfs_opts = f"rw,nosuid,nodev,size={spec.tmpfs_bytes},mode=1777"
    host_config = api.create_host_config(
        network_mode=spec.network,
        read_only=spec.read_only,
        tmpfs={"/tmp": tmpfs_opts + ",noexec", WORKDIR: tmpfs_opts + ",exec"},
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,
        nano_cpus=round(spec.cpus * 1e9),
        pids_limit=spec.pids_limit,
        security_opt=["no-new-privileges"],
        cap_drop=["ALL"],
        ipc_mode="none",
        ulimits=[docker.types.Ulimit(name="core", soft=0, hard=0)],
        log_config=docker.types.LogConfig(type="none"),
    )
    entrypoint = ["/bin/sh", "-c", _UNPACK, "sandbox"] if piped else argv[:1]
    created = api.create_container(
        spec.image,
        command=argv if piped else argv[1:],
        entrypoint=entrypoint,
        user=spec.user,
        working_dir=WORKDIR,
        environment={"HOME": "/tmp"},
        hostname="sandbox",
        stdin_open=True,  # with detach=False the SDK also sets StdinOnce: EOF on attach closes stdin
        labels={**labels, LABEL: "1"},
        host_config=host_config,
    )
    return str(created["Id"])


def _raw(sock: Any) -> socket.socket:
    # docker-py's attach_socket returns a read-only socket.SocketIO over the
    # hijacked connection and offers no way to write stdin (docker/docker-py#983):
    # its ._sock is the socket itself.
    return cast(socket.socket, getattr(sock, "_sock", sock))


def _close(sock: Any) -> None:
    with suppress(OSError):
        _raw(sock).shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in poll(), unlike close()
    _raw(sock).close()


def _write_stdin(sock: Any, data: bytes) -> None:
    with suppress(OSError):  # the program may exit without reading all of its input
        _raw(sock).sendall(data)
        _raw(sock).shutdown(socket.SHUT_WR)  # EOF: the engine closes the container's stdin


def _read_output(sock: Any, cap: int) -> tuple[bytes, bytes, bool, bool]:
    from docker.utils.socket import frames_iter

    kept = {1: bytearray(), 2: bytearray()}
    dropped = {1: False, 2: False}
    try:
        # Read on past the cap, so that a chatty program never blocks on a full pipe.
        for stream, chunk in frames_iter(sock, tty=False):
            if stream in kept:
                room = max(cap - len(kept[stream]), 0)
                dropped[stream] |= len(chunk) > room
                kept[stream] += chunk[:room]
    except OSError:
        pass  # the connection was shut down after the container ended
    return bytes(kept[1]), bytes(kept[2]), dropped[1], dropped[2]


def _kill(api: Any, cid: str) -> None:
    with suppress(_docker().errors.APIError):  # it may have exited on its own meanwhile
        api.kill(cid)


async def _drive(api: Any, cid: str, spec: ContainerSpec, payload: bytes) -> SandboxResult:
    sock = await asyncio.to_thread(api.attach_socket, cid, {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    _raw(sock).settimeout(None)  # silence is not an error; the wall clock below bounds the run
    # Writing stdin, reading output and waiting last as long as the container: on
    # threads of their own, not on the small shared to_thread pool, where they
    # could starve each other and every other blocking call of the worker.
    pool = ThreadPoolExecutor(3, thread_name_prefix="meshjobs-sandbox")
    loop = asyncio.get_running_loop()
    try:
        started = time.monotonic()
        await asyncio.to_thread(api.start, cid)
        loop.run_in_executor(pool, _write_stdin, sock, payload)
        reader = loop.run_in_executor(pool, _read_output, sock, spec.output_bytes)
        waiter = loop.run_in_executor(pool, api.wait, cid)
        timed_out = False
        try:
            status = await asyncio.wait_for(asyncio.shield(waiter), spec.timeout)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(_kill, api, cid)
            try:
                status = await asyncio.wait_for(waiter, _KILL_GRACE)
            except TimeoutError:
                raise SandboxError(f"the container did not stop within {_KILL_GRACE:g} s of being killed") from None
        wall = time.monotonic() - started
        try:
            stdout, stderr, out_cut, err_cut = await asyncio.wait_for(asyncio.shield(reader), _KILL_GRACE)
        except TimeoutError:
            _close(sock)  # something outlived the container and kept the stream open
            stdout, stderr, out_cut, err_cut = await reader
        state = (await asyncio.to_thread(api.inspect_container, cid))["State"]
    finally:
        _close(sock)
        pool.shutdown(wait=False)
    return SandboxResult(
        exit_code=int(status.get("StatusCode", state.get("ExitCode", -1))),
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=out_cut,
        stderr_truncated=err_cut,
        wall_seconds=round(wall, 3),
        timed_out=timed_out,
        oom_killed=bool(state.get("OOMKilled")),
    )


async def _remove(api: Any, creating: asyncio.Future[str]) -> None:
    await asyncio.wait([creating])  # done either way; raises nothing
    if not creating.cancelled() and creating.exception() is None:
        await asyncio.to_thread(api.remove_container, creating.result(), force=True)


async def run_in_container(
    spec: ContainerSpec,
    argv: list[str],
    *,
    stdin: bytes = b"",
    files: Mapping[str, bytes] | None = None,
    engine: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> SandboxResult:
    """Run *argv* in a fresh container made from *spec*, and remove it whatever happens.

    *files* (relative names, at most MAX_INPUT_BYTES with *stdin*) appear
    under ``/work``, the working directory. A non-zero exit, a timeout or an
    out-of-memory kill is a result, not an error. Raises
    :class:`SandboxInputError` for bad input before contacting the engine,
    :class:`SandboxUnavailable` when the SDK or engine is missing, and
    :class:`SandboxError` when the engine refuses (unknown image, bad limits).
    """
    argv = check_argv(list(argv))
    files = dict(files or {})
    check_files(files, stdin)
    piped = bool(files)
    payload = _input_tar(files, stdin) if piped else stdin
    api = await asyncio.to_thread(_connect, engine)
    try:
        with _engine_errors(engine):
            creating = asyncio.ensure_future(asyncio.to_thread(_create, api, spec, argv, piped, labels or {}))
            try:
                return await _drive(api, await asyncio.shield(creating), spec, payload)
            finally:
                # Shielded: a cancelled job (a worker's timeout) still waits for
                # the creation it started to finish, and removes what it made.
                await asyncio.shield(_remove(api, creating))
    finally:
        api.close()


class Base64Data(BaseModel):
    """Binary content on the wire: ``{"base64": "..."}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base64: Base64Bytes


def _as_bytes(data: str | Base64Data) -> bytes:
    return data.encode() if isinstance(data, str) else data.base64


class Argv(RootModel[list[str]]):
    """A command line, checked by :func:`check_argv`."""

    @field_validator("root")
    @classmethod
    def _check(cls, argv: list[str]) -> list[str]:
        return check_argv(argv)


class Files(RootModel[dict[str, str | Base64Data]]):
    """Input files: name to UTF-8 text or ``{"base64": ...}``, checked by :func:`check_files`."""

    @field_validator("root")
    @classmethod
    def _check(cls, files: dict[str, str | Base64Data]) -> dict[str, str | Base64Data]:
        check_files({name: _as_bytes(data) for name, data in files.items()})
        return files

    def decoded(self) -> dict[str, bytes]:
        """The files as bytes."""
        return {name: _as_bytes(data) for name, data in self.root.items()}


def sandboxed_capability(
    app: App,
    name: str,
    spec: ContainerSpec,
    *,
    images: Iterable[str] = (),
    engine: str | None = None,
    timeout: float | None = None,
    description: str | None = None,
) -> None:
    """Register on *app* a capability *name* that runs each job's command in a container.

    Arguments on the wire: ``argv`` (list of strings), ``stdin`` and ``files``
    values as UTF-8 text or ``{"base64": ...}``, and ``image``, one of
    *images* (the operator's allowlist, default just ``spec.image``; another
    image is refused as bad arguments, exit code 2, before anything starts).
    The value is :meth:`SandboxResult.as_text`. The capability's *timeout*
    defaults to the container's plus a margin for start and removal, so a
    timed-out command comes back as a result with ``timed_out`` set.
    """
    allowed = tuple(dict.fromkeys(images or (spec.image,)))
    if bad := [image for image in allowed if not re.fullmatch(_IMAGE_RE, image)]:
        raise UsageError(f"not an image name: {bad[0]!r}")
    check_image(spec.image, allowed)

    async def run(
        argv: Argv,
        stdin: str | Base64Data = "",
        files: Files | None = None,
        image: str = spec.image,
        job: JobContext | None = None,
    ) -> dict[str, Any]:
        check_image(image, allowed)
        labels = {"meshjobs.job": job.job_id, "meshjobs.capability": job.capability} if job else {}
        result = await run_in_container(
            spec.model_copy(update={"image": image}),
            argv.root,
            stdin=_as_bytes(stdin),
            files=files.decoded() if files else None,
            engine=engine,
            labels=labels,
        )
        return result.as_text()

    # App validates arguments from the hints; the allowlist becomes a Literal
    # there, so a refused image is reported as invalid arguments (exit 2).
    run.__annotations__ = {
        "argv": Argv,
        "stdin": str | Base64Data,
        "files": Files | None,
        "image": cast(Any, Literal)[allowed],
        "job": JobContext,
        "return": dict[str, Any],
    }
    doc = description or f"Run a command in a sandboxed container ({', '.join(allowed)})."
    app.capability(name, timeout=timeout or spec.timeout + 30, description=doc)(run)
