"""A worker app for the observability tests (metrics, $SRV.STATS, doctor): names no other test uses.

Run with ``meshjobs worker tests.observe_apps:app``.
"""

from __future__ import annotations

import asyncio

from meshjobs import App

app = App("observed", description="observability test worker")


@app.capability("obs.ok")
async def ok(n: int) -> int:
    """Return n."""
    return n


@app.capability("obs.fail")
async def fail() -> None:
    """Always fail."""
    raise RuntimeError("obs.fail always fails")


@app.capability("obs.slow", timeout=60)
async def slow(seconds: float) -> float:
    """Sleep, then return the seconds."""
    await asyncio.sleep(seconds)
    return seconds
