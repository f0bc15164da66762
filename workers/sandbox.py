"""The sandbox worker: ``sandbox.run`` runs a command in a locked-down container.

Run it with ``meshjobs worker workers.sandbox:app`` next to a Docker engine.
Arguments: ``argv`` (list of strings), optional ``stdin`` and ``files``
(name to UTF-8 text or ``{"base64": "..."}``), optional ``image``. The value
has ``exit_code``, ``stdout``, ``stderr``, ``stdout_truncated``,
``stderr_truncated``, ``wall_seconds``, ``timed_out`` and ``oom_killed``.

The operator's settings come from the TOML file named by the environment
variable ``MESHJOBS_SANDBOX_CONFIG`` (read when this module is imported);
without it, only ``meshjobs/sandbox-busybox:1`` is allowed, with the default
limits of :class:`~meshjobs.peers.sandbox.ContainerSpec`::

    images = ["meshjobs/sandbox-busybox:1"]   # the allowlist; the first is the default image
    engine = "unix:///var/run/docker.sock"    # optional; default: DOCKER_HOST or that socket

    [limits]                                  # any ContainerSpec field but image
    memory_bytes = 268435456
    cpus = 1.0
    pids_limit = 64
    tmpfs_bytes = 67108864
    timeout = 30
    output_bytes = 65536
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meshjobs import App
from meshjobs.errors import UsageError
from meshjobs.peers.sandbox import DEFAULT_IMAGE, ContainerSpec, sandboxed_capability

CONFIG_ENV = "MESHJOBS_SANDBOX_CONFIG"


class SandboxConfig(BaseModel):
    """The operator's allowlist, engine address and container limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: tuple[str, ...] = Field(default=(DEFAULT_IMAGE,), min_length=1)
    engine: str | None = None
    limits: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_limits(self) -> SandboxConfig:
        if "image" in self.limits:
            raise ValueError("set the images in 'images', not in [limits]")
        self.spec()
        return self

    def spec(self) -> ContainerSpec:
        """The container spec for the default (first) image."""
        return ContainerSpec(image=self.images[0], **self.limits)


def load_config(path: Path) -> SandboxConfig:
    """Read a sandbox TOML file; any problem is a one-line :class:`UsageError`."""
    try:
        return SandboxConfig.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"sandbox config {path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"sandbox config {path}: {problems}") from None


def build_app(config: SandboxConfig) -> App:
    """An app serving ``sandbox.run`` under *config*."""
    sandbox = App("sandbox", description="runs commands in locked-down containers")
    sandboxed_capability(sandbox, "sandbox.run", config.spec(), images=config.images, engine=config.engine)
    return sandbox


def _config_from_env() -> SandboxConfig:
    path = os.environ.get(CONFIG_ENV)
    return load_config(Path(path)) if path else SandboxConfig()


app = build_app(_config_from_env())
