"""The terminal inbox: a thin textual view of an :class:`~meshjobs.peers.human.Inbox`.

Everything it does is a call on the inbox (claim, answer, decline, hand back);
it only lays out what the inbox holds. Keys:

====================  ===========================================================
``c`` / ``ctrl+n``    claim the next waiting job (of the highlighted row's
                      capability, or of any)
``enter``             work on the highlighted job (moves to the answer editor)
``ctrl+s``            send the editor's content as the answer (refused answers
                      say why and leave the job open)
``ctrl+d``            decline the job, with a reason (asked for below)
``ctrl+r``            hand the job back to the queue unanswered
``escape``            back to the job list
``ctrl+q``            quit: held jobs are handed back
====================  ===========================================================

Peer-supplied text (arguments, names, drafts) is shown as plain text with
control and bidi characters escaped: nothing a submitter sends can restyle the
screen or pass for the inbox's own lines.
"""

from __future__ import annotations

import json
import time
import unicodedata
from typing import ClassVar

import nats.errors
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Input, Static, TextArea

from meshjobs.errors import MeshError

from .human import Inbox, Job, Row


def plain(text: str) -> str:
    """*text* with control characters (but newlines) and format characters (bidi marks) escaped."""
    out = []
    for char in text:
        if char == "\n" or unicodedata.category(char) not in ("Cc", "Cf"):
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def until(deadline_ms: int | None) -> str:
    if deadline_ms is None:
        return "-"
    left = deadline_ms / 1000 - time.time()
    if left <= 0:
        return "expired"
    hours, rest = divmod(int(left), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"in {hours}h{minutes:02d}m" if hours else f"in {minutes}m{seconds:02d}s"


def score_text(score: float | None) -> str:
    return "?" if score is None else f"{score:.2f}"


class InboxView(App[None]):
    """The inbox on a terminal."""

    TITLE = "meshjobs inbox"
    CSS = """
    #jobs { height: 1fr; min-height: 6; }
    #detail-box { height: 1fr; border: round $primary; }
    #answer { height: 1fr; min-height: 5; }
    #reason { display: none; }
    #reason.asking { display: block; }
    #status { height: 2; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "claim", "claim next"),
        Binding("ctrl+n", "claim", "claim next", show=False, priority=True),
        Binding("ctrl+s", "send", "send answer", priority=True),
        Binding("ctrl+d", "decline", "decline", priority=True),
        Binding("ctrl+r", "release", "hand back", priority=True),
        Binding("escape", "to_list", "job list", show=False),
        Binding("ctrl+q", "quit", "quit (hands back held jobs)", priority=True),
    ]

    def __init__(self, inbox: Inbox, title: str = "") -> None:
        super().__init__()
        self.inbox = inbox
        self.sub_title = title
        self.current: str | None = None
        self._loaded: str | None = None
        self._rows: list[Row] = []
        self._cells: list[tuple[str, ...]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable[str] = DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield table
        with VerticalScroll(id="detail-box"):
            yield Static("", id="detail")
        yield TextArea("", id="answer")
        yield Input(placeholder="why you decline (the submitter reads it); enter sends, escape cancels", id="reason")
        yield Static("c: claim the next job  ·  ctrl+q: quit", id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#jobs", DataTable)
        for label in ("state", "capability", "submitter", "trust", "deadline", "job"):
            table.add_column(label, key=label)
        self.inbox.subscribe(self._changed)
        self.set_interval(1.0, self.refresh_jobs)
        self.refresh_jobs()
        self.query_one("#detail-box").border_title = "job"
        self.query_one("#answer", TextArea).border_title = "your answer: ctrl+s sends it"
        table.focus()

    def _changed(self) -> None:
        self.call_later(self.refresh_jobs)

    # -- showing -----------------------------------------------------------------------

    def refresh_jobs(self) -> None:
        table = self.query_one("#jobs", DataTable)
        keep = self._highlighted()
        rows = self.inbox.rows()
        cells = [self._cells_of(row) for row in rows]
        if cells != self._cells:  # rebuilt only when something shown changed
            self._rows, self._cells = rows, cells
            table.clear()
            for row, line in zip(rows, cells, strict=True):
                table.add_row(*line, key=row.key)
            index = next((i for i, row in enumerate(rows) if row.key == keep), None)
            if index is not None:
                table.move_cursor(row=index, animate=False)
        self._show(self._highlighted())

    def _cells_of(self, row: Row) -> tuple[str, ...]:
        if row.count:  # jobs waiting where job states are private: how many, not whose
            return (f"{row.count} waiting", row.capability, "-", "-", "-", "-")
        known = bool(row.submitter)  # a job taken by someone, from their announcement, has no submitter
        return (
            f"{row.state} by {plain(row.who)}" if row.who else row.state,
            row.capability,
            plain(self.inbox.display(row.submitter)) if known else "-",
            score_text(row.score) if known else "-",
            until(row.deadline_ms),
            row.job_id,
        )

    def _highlighted(self) -> str | None:
        table = self.query_one("#jobs", DataTable)
        if not self._rows or table.cursor_row < 0 or table.cursor_row >= len(self._rows):
            return self.current
        return self._rows[table.cursor_row].key

    def _show(self, key: str | None) -> None:
        """Show the row *key* names (a held job's id: its detail and its answer in the editor)."""
        job = self.inbox.mine.get(key) if key else None
        editor = self.query_one("#answer", TextArea)
        self.current = key
        loaded = job.job_id if job is not None else None
        if loaded != self._loaded:  # the editor holds a held job's text, and only that job's
            self._keep_text()
            self._loaded = loaded
            editor.load_text(job.text if job is not None else "")
        editor.disabled = job is None
        detail = self.query_one("#detail", Static)
        if job is not None:
            detail.update(self._describe(job))
            return
        row = next((r for r in self._rows if r.key == key), None)
        claim = "Press c to claim the next waiting job of this capability."
        if row is None:
            detail.update(Text("Nothing held. Press c to claim the next waiting job."))
        elif row.count:
            jobs = "1 job" if row.count == 1 else f"{row.count} jobs"
            private = "job states are private to their submitters on this mesh: you see a job once you claim it"
            detail.update(Text(f"{jobs} of {row.capability} waiting in the queue ({private}).\n{claim}"))
        else:
            state = "taken by " + plain(row.who) if row.state == "taken" else "waiting in the queue"
            source = f" from {plain(self.inbox.display(row.submitter))}" if row.submitter else ""
            detail.update(Text(f"{row.capability}{source}: {state}.\n{claim}"))

    def _describe(self, job: Job) -> Text:
        task = self.inbox.tasks[job.capability]
        text = Text()
        text.append(f"{job.capability}", style="bold")
        text.append(f"  job {job.job_id} ({job.source})\n")
        text.append(f"from {plain(self.inbox.display(job.submitter))}  trust {score_text(job.score)}")
        text.append(f"  deadline {until(job.deadline_ms)}\n")
        if job.note:
            text.append(plain(job.note) + "\n", style="italic")
        text.append("\n")
        text.append(plain(task.instructions(job.args)) + "\n\n")
        text.append("arguments:\n", style="bold")
        text.append(plain(json.dumps(job.args, indent=2, ensure_ascii=False)) + "\n\n")
        text.append("the answer must match: ", style="bold")
        text.append(plain(task.expects) + "\n")
        return text

    def _keep_text(self) -> None:
        job = self.inbox.mine.get(self._loaded) if self._loaded else None
        if job is not None:
            job.text = self.query_one("#answer", TextArea).text

    def say(self, message: str, *, error: bool = False) -> None:
        self.query_one("#status", Static).update(Text(plain(message), style="bold red" if error else ""))

    def _held(self) -> Job | None:
        job = self.inbox.mine.get(self.current) if self.current else None
        if job is None:
            self.say("no job of yours is selected: press c to claim one", error=True)
        return job

    # -- acting ---------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # The row highlighted now, not the event's: a rebuild or a claim may have moved the cursor
        # since it was posted, and showing a row that is no longer highlighted would take the
        # editor away from the job just claimed (keys typed into it would be lost).
        self._show(self._highlighted())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self._show(event.row_key.value)
        if self.current in self.inbox.mine:
            self.query_one("#answer", TextArea).focus()

    def action_claim(self) -> None:
        row = next((r for r in self._rows if r.key == self._highlighted()), None)
        capability = row.capability if row is not None and row.state != "yours" else None
        self.say(f"claiming the next {capability or 'waiting'} job…")
        self.run_worker(self._claim(capability), exclusive=True, group="claim")

    async def _claim(self, capability: str | None) -> None:
        try:
            job = await self.inbox.claim(capability)
        except (MeshError, nats.errors.Error) as exc:  # the broker or JetStream failed under the claim
            self.say(f"could not claim: {exc}", error=True)
            return
        if job is None:
            self.say(f"nothing waiting{' for ' + capability if capability else ''}")
            return
        self.refresh_jobs()
        index = next((i for i, row in enumerate(self._rows) if row.key == job.job_id), None)
        if index is not None:
            self.query_one("#jobs", DataTable).move_cursor(row=index, animate=False)
        self._show(job.job_id)
        self.query_one("#answer", TextArea).focus()
        self.say(f"claimed {job.job_id}: type the answer, ctrl+s sends it")

    def action_send(self) -> None:
        # A priority binding runs before the editor has handled the keys typed just
        # before it: send once the editor's queue (those keys) is processed.
        self.query_one("#answer", TextArea).call_later(self._send)

    def _send(self) -> None:
        job = self._held()
        if job is None:
            return
        problem = self.inbox.answer(job.job_id, self.query_one("#answer", TextArea).text)
        if problem is not None:
            self.say(f"answer refused: {problem} (the job stays open)", error=True)
            return
        self.say(f"answered {job.job_id}")
        self.query_one("#jobs", DataTable).focus()

    def action_decline(self) -> None:
        if self._held() is None:
            return
        reason = self.query_one("#reason", Input)
        reason.add_class("asking")
        reason.value = ""
        reason.focus()
        self.say("why do you decline? enter sends, escape cancels")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        job = self._held()
        if job is None:
            return
        problem = self.inbox.decline(job.job_id, event.value)
        if problem is not None:
            self.say(problem, error=True)
            return
        self._close_reason()
        self.say(f"declined {job.job_id}")

    def _close_reason(self) -> None:
        self.query_one("#reason", Input).remove_class("asking")
        self.query_one("#jobs", DataTable).focus()

    def action_release(self) -> None:
        job = self._held()
        if job is not None:
            self.inbox.release(job.job_id)
            self.say(f"handed {job.job_id} back to the queue")
            self.query_one("#jobs", DataTable).focus()

    def action_to_list(self) -> None:
        self._keep_text()
        self._close_reason()
