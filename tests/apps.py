"""Worker apps for the trust tests: an honest, a dishonest and a flaky peer of one capability.

Run with ``meshjobs worker tests.apps:honest`` (or ``dishonest``, ``flaky``).
"""

from __future__ import annotations

import asyncio
import itertools
import os

from meshjobs import App, JobContext

honest = App("honest")
dishonest = App("dishonest")
flaky = App("flaky")


@honest.capability("math.square", deterministic=True)
async def square(x: int) -> int:
    return x * x


@dishonest.capability("math.square", deterministic=True)
async def wrong_square(x: int) -> int:
    return x * x + 1  # a cheater: plausible, signed, wrong


_jobs = itertools.count()


@flaky.capability("math.square", deterministic=True, timeout=120)
async def flaky_square(x: int) -> int:
    """Job 0 succeeds, job 1 fails, job 2 hangs, and so on."""
    n = next(_jobs) % 3
    if n == 1:
        raise RuntimeError("flaky: this one fails")
    if n == 2:
        await asyncio.sleep(60)
    return x * x


chaos = App("chaos")


@chaos.capability("chaos.work", timeout=30)
async def work(n: int, ms: int = 20, job: JobContext | None = None) -> int:
    """Sleep a little, log the execution (one line per run), return n."""
    await asyncio.sleep(ms / 1000)
    path = os.environ.get("MESHJOBS_TEST_EXEC_LOG")
    if path and job is not None:
        with open(path, "a") as log:  # O_APPEND: lines from several processes never interleave
            log.write(job.job_id + "\n")
    return n


fixable = App("fixable")


@fixable.capability("fix.me")
async def fix_me(flag: str) -> str:
    """Fails until the file *flag* exists (a poison job whose cause gets fixed)."""
    if not os.path.exists(flag):
        raise RuntimeError("not fixed yet")
    return "fixed"


crasher = App("crasher")


@crasher.capability("crash.me")
async def crash_me() -> None:
    """Takes its worker process down, every time."""
    os._exit(70)
