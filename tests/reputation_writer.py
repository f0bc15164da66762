"""One of several processes updating the same peer's reputation at once (see test_trust)."""

from __future__ import annotations

import asyncio
import sys

from meshjobs._nats import connect
from meshjobs.identity import Identity
from meshjobs.trust.reputation import ReputationBook


async def main(url: str, seed: str, peer: str, count: int, tag: str) -> None:
    identity = Identity.from_seed_text(seed)
    nc = await connect(url, identity)
    try:
        book = await ReputationBook.open(nc, identity)
        for i in range(count):
            await book.report("success", peer, job_id=f"{tag}-{i:04d}-job", capability="math.square", latency_ms=1.0)
    finally:
        await nc.close()


if __name__ == "__main__":
    url, seed, peer, count, tag = sys.argv[1:6]
    asyncio.run(main(url, sys.stdin.readline().strip() if seed == "-" else seed, peer, int(count), tag))
