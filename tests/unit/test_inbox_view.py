"""The terminal inbox driven by textual's pilot: claim, a refused answer, an answer, a decline, a hand-back.

The jobs come from a stand-in claimer that runs the peer's real handlers through
the runtime's ``execute`` (no network): what the view does reaches the signed
execution exactly as it would on the mesh.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from textual.widgets import DataTable, Static, TextArea

from meshjobs.envelope import open_envelope, seal_envelope
from meshjobs.identity import Identity
from meshjobs.peers.human import HumanPeer, Job, tasks_from_app
from meshjobs.peers.inbox_view import InboxView, plain
from meshjobs.runtime.execute import Execution, execute
from tests.human_app import app as people

SUBMITTER = Identity.generate()


class Queue:
    """Hands out jobs of ``people.add`` to the inbox; keeps what each came to."""

    def __init__(self, peer: HumanPeer, count: int) -> None:
        self.peer = peer
        self.left = count
        self.runs: dict[str, asyncio.Task[Execution]] = {}

    async def claim(self, capability: str | None) -> Job | None:
        if self.left == 0:
            return None
        self.left -= 1
        job_id = f"job-view-{len(self.runs):04d}"
        args = {"a": 2, "b": len(self.runs)}
        _, frame = seal_envelope(SUBMITTER, "people.add", args, audience="a", job_id=job_id, ttl_ms=60_000)
        shown = self.peer.inbox.expect(job_id)
        cap = self.peer.durable_app.capabilities["people.add"]
        self.runs[job_id] = asyncio.create_task(execute(cap, open_envelope(frame), "U" + "W" * 55))
        return await shown


def status(view: InboxView) -> str:
    return str(view.query_one("#status", Static).render())


async def test_the_view_claims_refuses_bad_input_answers_declines_and_hands_back() -> None:
    peer = HumanPeer("people", tasks_from_app(people), inbox=None)
    queue = Queue(peer, 3)
    peer.inbox.claimer = queue.claim
    view = InboxView(peer.inbox, "test")
    async with view.run_test(size=(120, 40)) as pilot:
        await pilot.press("c")
        await pilot.pause(0.2)
        assert "claimed job-view-0000" in status(view)
        assert view.query_one("#jobs", DataTable).row_count == 1
        assert view.focused is view.query_one("#answer", TextArea)
        await pilot.press("f", "i", "v", "e", "ctrl+s")
        await pilot.pause()
        assert "answer refused" in status(view) and "job-view-0000" in peer.inbox.mine
        await pilot.press("f7", "5", "ctrl+s")  # f7 selects everything in the editor
        assert await queue.runs["job-view-0000"] == Execution("ok", 5)
        await pilot.pause()
        assert "answered job-view-0000" in status(view)

        await pilot.press("c")
        await pilot.pause(0.2)
        await pilot.press("ctrl+d", *"too late", "enter")
        assert await queue.runs["job-view-0001"] == Execution("error", None, ("Declined", "declined: too late"))

        await pilot.press("c")
        await pilot.pause(0.2)
        await pilot.press("ctrl+r")
        handed: Any = await queue.runs["job-view-0002"]
        assert handed.error[0] == "HandedBack"
        await pilot.press("c")
        await pilot.pause(0.2)
        assert "nothing waiting" in status(view)
        assert peer.inbox.mine == {}


async def test_the_view_counts_private_jobs_and_names_who_took_one_escaped() -> None:
    peer = HumanPeer("people", tasks_from_app(people), inbox=None)
    bob = Identity.generate().public_key
    peer.inbox.count("people.add", 3)
    peer.inbox.hold(bob, "bob\x1b[2J", "people.add", ("job-taken-0001",), 1, at=time.monotonic())
    view = InboxView(peer.inbox, "test")
    async with view.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = view.query_one("#jobs", DataTable)
        assert [str(cell) for cell in table.get_row_at(0)] == ["2 waiting", "people.add", "-", "-", "-", "-"]
        taken = [f"taken by bob\\x1b[2J ({bob[:8]}…)", "people.add", "-", "-", "-", "job-taken-0001"]
        assert [str(cell) for cell in table.get_row_at(1)] == taken
        assert "2 jobs of people.add waiting in the queue" in str(view.query_one("#detail", Static).render())


def test_peer_text_cannot_restyle_the_screen() -> None:
    assert plain("a\x1b[2Jb\u202ec\nd") == "a\\x1b[2Jb\\u202ec\nd"
