"""The flood of bench_flood.py: a paced publisher of junk to one subject, in its own process.

The junk cycles through up to three kinds (``--mix``):

- ``garbage``: random bytes, no frame at all;
- ``untrusted``: envelopes validly framed and signed by this process's own key,
  which the broker admits but the worker does not trust;
- ``stranger``: envelopes signed by keys nobody admitted or trusted (sent over
  this connection: a stranger cannot log in to a closed broker itself).

Each message carries a reply subject in this key's own inbox, so the worker
could answer every one. The replies that come back are counted; those that
verify as signed ``rejected`` results are the signed rejections the worker
paid for. The pace is held against the clock (``--rate`` messages per second,
published in small batches every few milliseconds), so a slow moment is
caught up rather than lost.

It prints ``flooding`` when the first message goes out and stops at
``--seconds`` or ``--max-messages`` or on SIGTERM, whichever comes first; then
it waits ``--linger`` seconds for late replies and prints one line,
``summary {json}``.

    MESHJOBS_HOME=DIR python bench/flooder.py URL SUBJECT CAPABILITY [--rate 4000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshjobs._nats import connect  # noqa: E402
from meshjobs.envelope import new_job_id, open_result, seal_envelope  # noqa: E402
from meshjobs.errors import MeshError  # noqa: E402
from meshjobs.identity import IDENTITY_FILE, Identity, load_identity  # noqa: E402

KINDS = ("garbage", "untrusted", "stranger")
TICK_S = 0.005
STRANGERS = 64


def junk_pool(
    identity: Identity, subject: str, capability: str, kinds: list[str], size: int, ttl_ms: int
) -> list[tuple[str, bytes]]:
    """*size* junk messages, built before the flood so that it costs no signing while it runs."""
    rng = random.Random(1)
    strangers = [Identity.generate() for _ in range(STRANGERS)] if "stranger" in kinds else []
    pool = []
    for n in range(size):
        kind = kinds[n % len(kinds)]
        if kind == "garbage":
            data = os.urandom(rng.randint(32, 600))
        else:
            signer = identity if kind == "untrusted" else strangers[n % len(strangers)]
            _, data = seal_envelope(
                signer, capability, {"junk": n}, audience=subject, job_id=new_job_id(), ttl_ms=ttl_ms
            )
        pool.append((kind, data))
    return pool


async def flood(args: argparse.Namespace) -> dict[str, object]:
    identity = load_identity(Path(os.environ["MESHJOBS_HOME"]) / IDENTITY_FILE)
    kinds = args.mix.split(",")
    if not kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--mix takes a comma-separated subset of {', '.join(KINDS)}")
    ttl_ms = int((args.seconds + 600) * 1000)
    pool = junk_pool(identity, args.subject, args.capability, kinds, args.pool, ttl_ms)
    nc = await connect(args.url, identity, name="meshjobs-bench-flooder")
    prefix = f"_INBOX.{identity.public_key}.flood"
    replies: Counter[str] = Counter()
    reasons: Counter[str] = Counter()

    async def on_reply(msg: Msg) -> None:
        try:
            result = open_result(msg.data)
        except MeshError:
            replies["unverifiable"] += 1
            return
        if result.status == "rejected":
            replies["signed_rejections"] += 1
            reasons[result.error.code if result.error else "?"] += 1
        else:
            replies["other"] += 1

    await nc.subscribe(f"{prefix}.>", cb=on_reply, pending_msgs_limit=1_000_000)
    await nc.flush()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    limit = min(args.max_messages, int(args.rate * args.seconds))
    sent: Counter[str] = Counter()
    count = 0
    print("flooding", flush=True)
    started = time.monotonic()
    while not stop.is_set() and count < limit:
        elapsed = time.monotonic() - started
        if elapsed >= args.seconds:
            break
        due = min(limit, int(elapsed * args.rate) + 1)
        while count < due:
            kind, data = pool[count % len(pool)]
            await nc.publish(args.subject, data, reply=f"{prefix}.{count}")
            sent[kind] += 1
            count += 1
        try:
            await asyncio.wait_for(stop.wait(), TICK_S)
        except TimeoutError:
            pass
    seconds = time.monotonic() - started
    await nc.flush()
    await asyncio.sleep(args.linger)  # rejections still on their way
    await nc.close()
    return {
        "sent": count,
        "seconds": round(seconds, 3),
        "rate_asked_per_s": args.rate,
        "rate_held_per_s": round(count / seconds, 1) if seconds else 0.0,
        "sent_by_kind": dict(sent),
        "signed_rejections": replies["signed_rejections"],
        "rejection_reasons": dict(reasons),
        "other_replies": replies["other"],
        "unverifiable_replies": replies["unverifiable"],
        "flooder_key": identity.public_key,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("subject", help="where the junk goes (the worker's capability subject)")
    parser.add_argument("capability", help="the capability the signed junk names")
    parser.add_argument("--rate", type=float, default=4000.0, help="messages per second (default 4000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="flood for at most this long (default 20)")
    parser.add_argument("--max-messages", type=int, default=100_000, help="and at most this many (default 100000)")
    parser.add_argument("--mix", default=",".join(KINDS), help=f"kinds of junk, comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--pool", type=int, default=3000, help="distinct junk messages, cycled (default 3000)")
    parser.add_argument("--linger", type=float, default=1.0, help="wait for late replies after the flood (s)")
    summary = asyncio.run(flood(parser.parse_args()))
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
