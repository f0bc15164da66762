"""The demo worker: small capabilities used by the README, the tests and the benchmarks.

Run it with ``meshjobs worker workers.demo:app``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshjobs import App

app = App("demo", description="meshjobs demo worker: echo, add, sleep, fail")


@app.capability("demo.echo", deterministic=True)
async def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return kwargs


@app.capability("demo.add", deterministic=True)
async def add(a: int | float, b: int | float) -> int | float:
    """Add two numbers."""
    return a + b


@app.capability("demo.sleep", timeout=300)
async def sleep(seconds: float = 1.0) -> float:
    """Sleep for the given seconds, then return them."""
    if seconds < 0:
        raise ValueError("seconds cannot be negative")
    await asyncio.sleep(seconds)
    return seconds


@app.capability("demo.fail")
async def fail(message: str = "this capability always fails") -> None:
    """Raise an error with the given message."""
    raise RuntimeError(message)


@app.capability("demo.noop", deterministic=True)
async def noop() -> None:
    """Do nothing (for benchmarks)."""
    return None
