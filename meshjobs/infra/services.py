"""Mesh services as child processes (the trust service): start, wait until ready, stop by PID.

Infrastructure imports no job module: a service runs as ``python -m meshjobs
<args>`` and says when it is ready on its output, which goes to a log file.
With ``detach`` (``meshjobs mesh up``) it outlives the command that started it
and is found again through its pid file, checked against /proc before any
signal; otherwise it dies with its parent (``meshjobs up``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshjobs.errors import BrokerError
from meshjobs.infra.broker import await_log, launch, terminate

#: What ``meshjobs trust serve`` prints once it is reading evidence.
TRUST_READY = "meshjobs trust service ready"
TRUST_SERVICE = "trust-service"


@dataclass
class ServiceProcess:
    """One ``python -m meshjobs ...`` child, its log and (detached) its pid file under *workdir*."""

    name: str
    args: list[str]
    workdir: Path
    ready_text: str
    env: dict[str, str] | None = None
    detach: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "meshjobs", *self.args]

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        """Start it and block until its log says it is ready (or raise :class:`BrokerError`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ if self.env is None else self.env, PYTHONUNBUFFERED="1")
        self.process = launch(self.command, self.log_path, detach=self.detach, env=env)
        if self.detach:
            self.pid_path.write_text(f"{self.process.pid}\n")
        self._wait_ready(offset, timeout)
        return self

    def _wait_ready(self, offset: int, timeout: float) -> None:
        ready, text = await_log(self.log_path, offset, self.process, timeout, lambda text: self.ready_text in text)
        if ready:
            return
        self.stop()
        last = [line for line in text.splitlines() if line.strip()][-1:] or [f"not ready within {timeout:g} s"]
        raise BrokerError(f"{self.name} failed to start: {last[0]} (log: {self.log_path})")

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.running_pid() is not None

    def running_pid(self) -> int | None:
        """The pid in the pid file, if that process is still this service (checked in /proc)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_ours(pid, self.args) else None

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM by PID, then SIGKILL if it does not exit in time. True when something was running."""
        process, self.process = self.process, None
        if process is not None:
            self.pid_path.unlink(missing_ok=True)
            if process.poll() is not None:
                return False
            terminate(process, timeout)
            return True
        pid = self.running_pid()
        self.pid_path.unlink(missing_ok=True)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_ours(pid, self.args):
            time.sleep(0.05)
        if _is_ours(pid, self.args):
            os.kill(pid, signal.SIGKILL)
        return True


def _is_ours(pid: int, args: list[str]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    wanted = [b"meshjobs", *(a.encode() for a in args)]
    return state != "Z" and all(w in cmdline for w in wanted)


def trust_service(urls: list[str], workdir: Path, *, env: dict[str, str] | None = None, detach: bool = False,
                  trust_file: Path | None = None) -> ServiceProcess:  # fmt: skip
    """The trust service (``meshjobs trust serve``) for the servers at *urls*, as the identity of *env*'s home."""
    args = ["trust", "serve", "--server", ",".join(urls)]
    if trust_file is not None:
        args += ["--trust", str(trust_file)]
    return ServiceProcess(TRUST_SERVICE, args, workdir, TRUST_READY, env=env, detach=detach)
