"""One of several processes publishing evidence about the same peer at once (see test_trust).

Reads the submitter's seed, then the peer's, from stdin (one per line): each
piece of evidence embeds a real request signed by the submitter and a real
result signed by the peer, as a router's would.
"""

from __future__ import annotations

import asyncio
import sys

from meshjobs._nats import connect
from meshjobs.envelope import digest, seal_envelope, seal_result
from meshjobs.identity import Identity
from meshjobs.trust.reputation import ReputationBook


async def main(url: str, submitter: Identity, peer: Identity, count: int, tag: str) -> None:
    nc = await connect(url, submitter)
    try:
        book = await ReputationBook.open(nc, submitter)
        batch = []
        for i in range(count):
            job = f"{tag}-{i:04d}-job"
            _, request = seal_envelope(submitter, "math.square", {"x": i}, audience="mesh.cmd.math.square",
                                       job_id=job, ttl_ms=60_000)  # fmt: skip
            result = seal_result(peer, request_digest=digest(request), job_id=job, status="ok", value=i * i)
            batch.append(book.evidence_for("success", peer.public_key, job_id=job, capability="math.square",
                                           request=request, result=result, latency_ms=1.0))  # fmt: skip
        await book.publish(batch)
    finally:
        await nc.close()


if __name__ == "__main__":
    url, count, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    submitter = Identity.from_seed_text(sys.stdin.readline().strip())
    peer = Identity.from_seed_text(sys.stdin.readline().strip())
    asyncio.run(main(url, submitter, peer, count, tag))
