"""Watching mesh state on a real broker: a reader that says it has caught up holds the whole history.

nats-py's KV watch can say "caught up" before it hands over the history it
announced (in about 1 of 30 opens of a bucket of a few hundred revisions, in
our repro); :func:`meshjobs.state.replay` waits for the stream's last
revision. A quarantine board opened on a busy bucket is the user-visible case:
a peer quarantined long ago must be refused by a worker or router started now.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from meshjobs._nats import connect
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer
from meshjobs.state import DOMAIN, BucketSpec, Replay, open_bucket, replay
from meshjobs.trust.quarantine import QuarantineBoard, issue_order

pytestmark = pytest.mark.integration

OPENS = 40


async def entries_before_marker(watch: Replay) -> list[Any]:
    seen = []
    async for update in watch:
        if update is None:
            break
        seen.append(update)
    await watch.stop()
    return seen


async def test_every_replay_hands_over_the_whole_history_before_saying_it_caught_up(
    broker: NatsServer, identity: Identity
) -> None:
    nc = await connect(broker.url, identity, name="test-replay")
    bucket = f"replay{secrets.token_hex(4)}"
    try:
        kv = await open_bucket(nc, BucketSpec(bucket, history=8))
        for n in range(300):  # 60 keys, 5 revisions each: all kept
            await kv.put(f"k{n % 60}", b"x" * 100 + str(n).encode())
        js = nc.jetstream(domain=DOMAIN)
        counts = [len(await entries_before_marker(await replay(js, bucket))) for _ in range(OPENS)]
        assert counts == [300] * OPENS
        assert len(await entries_before_marker(await kv.watchall())) == 60  # the latest of each key
        one = await entries_before_marker(await replay(js, bucket, "k7"))
        assert [e.value for e in one] == [b"x" * 100 + str(n).encode() for n in range(7, 300, 60)]
        empty = f"empty{secrets.token_hex(4)}"
        await open_bucket(nc, BucketSpec(empty))
        assert await entries_before_marker(await replay(js, empty)) == []  # nothing to wait for
    finally:
        await nc.close()


async def test_a_board_opened_on_a_busy_bucket_knows_an_old_quarantine_at_once(
    broker: NatsServer, identity: Identity
) -> None:
    nc = await connect(broker.url, identity, name="test-board")
    try:
        target = Identity.generate().public_key
        await issue_order(nc, identity, target, "quarantine", "cheated long ago")
        for _ in range(150):  # later history about other peers buries it
            await issue_order(nc, identity, Identity.generate().public_key, "release", "noise")
        for _ in range(OPENS):
            board = await QuarantineBoard.open(nc, frozenset({identity.public_key}))
            try:
                assert board.is_quarantined(target)
            finally:
                await board.close()
    finally:
        await nc.close()
