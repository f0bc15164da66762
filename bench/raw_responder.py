"""The raw nats-py side of the benchmark: a queue-group responder that answers with no work."""

from __future__ import annotations

import asyncio
import signal
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)

    async def respond(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"")

    await nc.subscribe("bench.raw", queue="bench.raw", cb=respond)
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
