"""The worker of the claim comparison: one echo handler registered twice, idempotent and not.

``bench.echo.claimed`` is an ordinary capability: before it runs, the worker
claims the envelope's (submitter, nonce) pair mesh-wide, a create in the
JetStream ``claims`` bucket. ``bench.echo.idempotent`` is the same handler
declared ``idempotent=True``, which skips that claim (replays are refused per
worker only). Everything else is the worker runtime as ``meshjobs worker``
runs it, except the per-submitter token bucket (``sender_rate``), raised by
default so that one bench key at 256 in flight measures the claim, not the
flood control in front of it.

    MESHJOBS_HOME=DIR python bench/claim_worker.py URL [--sender-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshjobs import App  # noqa: E402

IDEMPOTENT = "bench.echo.idempotent"
CLAIMED = "bench.echo.claimed"
UNCAPPED_SENDER_RATE = 1_000_000.0

app = App("bench-claim", description="meshjobs bench: echo, idempotent and claimed")


async def echo(**kwargs: Any) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return kwargs


app.capability(IDEMPOTENT, deterministic=True, idempotent=True)(echo)
app.capability(CLAIMED, deterministic=True)(echo)


def main() -> None:
    from meshjobs.identity import IDENTITY_FILE, load_identity
    from meshjobs.runtime.config import WorkerConfig
    from meshjobs.runtime.worker import Worker
    from meshjobs.trust.policy import TRUST_FILE, load_trust

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--sender-rate", type=float, default=UNCAPPED_SENDER_RATE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    home = Path(os.environ["MESHJOBS_HOME"])
    identity = load_identity(home / IDENTITY_FILE)
    policy = load_trust(home / TRUST_FILE, required=False)
    config = WorkerConfig(sender_rate=args.sender_rate)
    asyncio.run(Worker(app, identity, policy, config).serve(args.url))


if __name__ == "__main__":
    main()
