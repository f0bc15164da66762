"""Rendering nats-server configuration. Pure functions: data in, text out.

:func:`render` turns nested dicts, lists and scalars into nats-server's config
syntax; builders such as :func:`single_node` produce those dicts. Every
rendering is checked with ``nats-server -t`` in the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON string syntax is valid nats-server syntax and escapes safely.
        return json.dumps(str(value))
    raise TypeError(f"cannot render {type(value).__name__} in a nats-server config")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _render(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = [f"{pad}  {_key(k)}: {_render(v, indent + 1)}" for k, v in value.items() if v is not None]
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = [f"{pad}  {_render(v, indent + 1)}" for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    return _scalar(value)


def render(config: dict[str, Any], header: str = "") -> str:
    """Render a top-level config dict. Keys whose value is None are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{_key(k)}: {_render(v, 0)}" for k, v in config.items() if v is not None]
    return "\n".join(lines) + "\n"


def hostport(host: str, port: int | None) -> str:
    """``host:port`` for a listen setting; None asks for a random port; IPv6 in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{-1 if port is None else port}"


def single_node(
    *,
    store_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    monitor_port: int | None = None,
    server_name: str = "meshjobs",
    domain: str | None = None,
    log_file: Path | None = None,
    sync_interval: str | None = None,
) -> dict[str, Any]:
    """One nats-server with JetStream: the embedded default of ``meshjobs up``.

    A port of None asks the server for a random free one (reported in its log).
    """
    jetstream: dict[str, Any] = {"store_dir": store_dir}
    if domain:
        jetstream["domain"] = domain
    if sync_interval:
        jetstream["sync_interval"] = sync_interval
    return {
        "server_name": server_name,
        "listen": hostport(host, port),
        "http": hostport(host, monitor_port),
        "jetstream": jetstream,
        "log_file": log_file,
    }
