"""Human peers: a person answers jobs from an inbox, and the answer is signed with the person's key.

What a person answers is a :class:`Task` per capability, from an
:class:`~meshjobs.App` (``MODULE:ATTR``: the type hints define the arguments
and the expected result; the handler bodies never run) or from a TOML file in
the capability format of persona files (JSON-schema ``arguments`` and
``result``, an optional ``prompt`` shown to the person; see
``workers/humans/proofreading.toml``).

The :class:`Inbox` is the whole logic a terminal shows, and nothing else: jobs
this person holds (claimed), the shared queue as others see it (``board``: job
states, where this key may list them; else ``queue``: how many jobs wait per
capability), the jobs other people's inboxes announce they hold (``holders``),
and the three things a person can do with a held job — :meth:`Inbox.answer`
(validated: a refused answer leaves the job open), :meth:`Inbox.decline` (the
submitter gets a :class:`Declined` failure) and :meth:`Inbox.release` (the job
goes back to the queue for someone else). :class:`HumanPeer` builds the
:class:`~meshjobs.App` whose handlers put jobs in the inbox and wait for the
person; :mod:`meshjobs.peers.desk` feeds it from the durable queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import to_jsonable_python

from meshjobs._files import parse_toml, read_local_text
from meshjobs.durable import JobState
from meshjobs.envelope import loads_strict, now_ms
from meshjobs.errors import HandlerError, InvalidArguments, UsageError
from meshjobs.runtime.app import App, Capability, JobContext, PeerKind

from .persona import CapabilitySpec, render_prompt
from .schema import first_problem

HUMAN_FILE_VERSION = 1
MAX_HUMAN_FILE_BYTES = 256 * 1024
#: A person's capability is bounded by the job's own deadline, not by a handler timeout.
HUMAN_TIMEOUT_S = 7 * 86400.0
MAX_REASON_CHARS = 1000
#: How many (person, capability) announcements an inbox keeps track of at most.
MAX_HOLDERS = 4096
Source = Literal["durable", "live"]


class Declined(HandlerError):
    """The person declined the job (or rejected the AI draft); the message says why."""


class HandedBack(HandlerError):
    """The person handed the job back unanswered (or closed the inbox): it goes back to the queue."""


class NotLive(HandlerError):
    """A live (non-durable) job reached a person who takes durable jobs only."""


class HumanFileError(UsageError):
    """A human capability file cannot be read or does not follow the format."""


Check = Callable[[Any], tuple[Any, str | None]]
"""Validates a candidate answer: ``(the value to send, None)`` or ``(None, the problem)``."""


@dataclass(frozen=True)
class Task:
    """One capability as a person sees it: what it asks, and what an answer must look like."""

    name: str
    description: str
    expects: str  # the result's shape, shown to the person (a JSON schema)
    check: Check
    spec: CapabilitySpec | None = None  # the file's capability (JSON-schema arguments); None: an App's
    template: Capability | None = None
    tags: tuple[str, ...] = ()

    def instructions(self, args: dict[str, Any]) -> str:
        """What the person reads about one job: the description, or the file's prompt filled in."""
        if self.spec is not None and self.spec.prompt is not None:
            return render_prompt(self.spec, args)
        return self.description

    def parse(self, text: str) -> tuple[Any, str | None]:
        """The answer typed as *text*, validated: JSON, or bare text where the result is a string."""
        stripped = text.strip()
        if not stripped:
            return None, "the answer is empty"
        parsed: Any = None
        try:
            parsed = loads_strict(stripped)
        except ValueError as exc:
            problem: str | None = f"not JSON: {exc}"
        else:
            checked, problem = self.check(parsed)
            if problem is None:
                return checked, None
        if not isinstance(parsed, str):  # a bare word or sentence, where the result is a string
            checked, bare_problem = self.check(stripped)
            if bare_problem is None:
                return checked, None
        return None, problem


def _schema_check(schema: dict[str, Any]) -> Check:
    def check(value: Any) -> tuple[Any, str | None]:
        problem = first_problem(value, schema)
        return (value, None) if problem is None else (None, f"{problem[0]}: {problem[1]}")

    return check


def _type_check(annotation: Any) -> tuple[Check, str]:
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def check(value: Any) -> tuple[Any, str | None]:
        try:
            validated = adapter.validate_json(json.dumps(value))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            return None, f"{where}: {first['msg']}"
        return to_jsonable_python(validated), None

    try:
        shape = json.dumps(adapter.json_schema(), sort_keys=True)
    except Exception:  # noqa: BLE001 - a type pydantic cannot describe is still checkable
        shape = repr(annotation)
    return check, shape


def task_from_spec(spec: CapabilitySpec) -> Task:
    """A file's (or a persona's) capability as a :class:`Task`."""
    expects = json.dumps(spec.result, sort_keys=True)
    return Task(spec.name, spec.description, expects, _schema_check(spec.result), spec=spec, tags=spec.tags)


def tasks_from_app(app: App) -> dict[str, Task]:
    """Each capability of *app* as a :class:`Task`: arguments from its type hints, result from its return hint."""
    tasks = {}
    for cap in app.capabilities.values():
        try:
            annotation = get_type_hints(cap.func).get("return", Any)
        except Exception as exc:  # noqa: BLE001 - the app registered, so only the return hint can fail
            raise UsageError(f"capability {cap.name!r}: cannot resolve its return type: {exc}") from None
        if annotation is None or annotation is type(None):
            annotation = Any  # "returns nothing" cannot be a person's answer: take any JSON
        try:
            check, expects = _type_check(annotation)
        except Exception as exc:  # noqa: BLE001 - pydantic refuses some types only when asked to build a schema
            raise UsageError(f"capability {cap.name!r}: its return type cannot check answers: {exc}") from None
        tags = tuple(getattr(cap, "tags", ()))
        tasks[cap.name] = Task(cap.name, cap.description, expects, check, template=cap, tags=tags)
    if not tasks:
        raise UsageError(f"app {app.name!r} registers no capabilities")
    return tasks


class HumanFile(BaseModel):
    """A human capability file, validated. Unknown fields anywhere are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    name: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Annotated[str, Field(strict=True, max_length=500)] = ""
    instructions: Annotated[str, Field(strict=True, max_length=4000)] = ""
    capabilities: Annotated[tuple[CapabilitySpec, ...], Field(alias="capability", min_length=1, max_length=64)]

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, value: tuple[CapabilitySpec, ...]) -> tuple[CapabilitySpec, ...]:
        names = [cap.name for cap in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"capability {name!r} is defined twice")
        return value


def load_human_file(path: str | Path) -> HumanFile:
    """Read and validate a human capability file; :class:`HumanFileError` names the file and the field."""
    path = Path(path)
    text = read_local_text(path, what="human capability file", max_bytes=MAX_HUMAN_FILE_BYTES, error=HumanFileError)
    return parse_human_file(text, str(path))


def parse_human_file(text: str, source: str = "<human file>") -> HumanFile:
    return parse_toml(text, HumanFile, source, HumanFileError)


# -- the inbox ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the person did with a held job."""

    kind: Literal["answer", "decline", "release"]
    value: Any = None
    reason: str = ""


@dataclass(eq=False)
class Job:
    """A job this person holds, waiting for their decision."""

    job_id: str
    capability: str
    args: dict[str, Any]
    submitter: str
    deadline_ms: int
    source: Source = "durable"
    score: float | None = None
    text: str = ""  # what the answer editor starts with (an AI draft) and keeps between visits
    note: str = ""  # a line shown with the job (who drafted it, or why there is no draft)
    claimed_ms: int = field(default_factory=now_ms)
    decision: Decision | None = None
    failure_value: Any = None  # sent along with a decline (a hybrid's signed draft and decision)
    future: asyncio.Future[Decision] | None = None


@dataclass(frozen=True)
class Row:
    """One line of the inbox: a job of mine, one waiting in (or taken from) the shared queue, or a count.

    A count row (``count`` > 0, no job id, no submitter) stands for jobs of one
    capability that wait where job states are private: the queue says how
    many, not which. A job taken from a peer's announcement has no submitter.
    """

    job_id: str
    state: Literal["yours", "waiting", "taken"]
    capability: str
    submitter: str
    score: float | None
    deadline_ms: int | None
    who: str = ""
    count: int = 0

    @property
    def key(self) -> str:
        """What identifies the line: the job id, or (a count) the capability's queue."""
        return self.job_id or f"queue:{self.capability}"


@dataclass
class Holder:
    """What one other person's inbox last announced it holds of one capability (signature checked)."""

    name: str
    jobs: tuple[str, ...]
    issued_ms: int
    seen: float  # when it arrived (a monotonic clock): it lapses when the announcements stop


Claimer = Callable[[str | None], Awaitable[Job | None]]


class Inbox:
    """Jobs a person holds and the shared queue as they see it; answer, decline, hand back. No I/O here."""

    def __init__(self, tasks: dict[str, Task], *, me: str = "", names: dict[str, str] | None = None) -> None:
        self.tasks = tasks
        self.me = me
        self.names = dict(names or {})
        self.mine: dict[str, Job] = {}
        self.board: dict[str, JobState] = {}
        #: Jobs outstanding per capability, besides mine (queued or held by others), where this key
        #: may not list job states; None where it may (then ``board`` lists the waiting jobs).
        self.queue: dict[str, int] | None = None
        #: (person key, capability) -> what that person's inbox announced it holds.
        self.holders: dict[tuple[str, str], Holder] = {}
        self.scores: dict[str, float | None] = {}
        self.claimer: Claimer | None = None
        self.closed = False
        self._listeners: list[Callable[[], None]] = []
        self._expected: dict[str, asyncio.Future[Job]] = {}

    # -- for the view -------------------------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call *listener* (no arguments) whenever what the inbox shows changes."""
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def display(self, key: str) -> str:
        """A submitter as shown: the trust file's name for it (display only) and the key's start."""
        name = self.names.get(key)
        return f"{name} ({key[:8]}…)" if name else f"{key[:12]}…"

    def rows(self) -> list[Row]:
        """Jobs I hold (oldest claim first), then the shared queue: waiting, then taken by others."""
        rows = [
            Row(j.job_id, "yours", j.capability, j.submitter, j.score, j.deadline_ms)
            for j in sorted(self.mine.values(), key=lambda j: j.claimed_ms)
        ]
        announced = self._announced()
        taken: list[Row] = []
        others = [s for s in self.board.values() if s.job_id not in self.mine and s.capability in self.tasks]
        others.sort(key=lambda s: (s.state != "queued", s.job_id))
        for s in others:
            score = self.scores.get(s.submitter)
            if s.job_id in announced:  # its holder says so, whatever the state says yet
                who = announced[s.job_id][1]
                taken.append(Row(s.job_id, "taken", s.capability, s.submitter, score, None, who))
            elif s.state == "queued":
                rows.append(Row(s.job_id, "waiting", s.capability, s.submitter, score, None))
            elif s.worker != self.me:
                who = s.detail.removeprefix("claimed by ") or f"{s.worker[:12]}…"
                taken.append(Row(s.job_id, "taken", s.capability, s.submitter, score, None, who))
        shown = {row.job_id for row in taken}
        for job_id, (capability, who) in sorted(announced.items()):
            if job_id not in shown:
                taken.append(Row(job_id, "taken", capability, "", None, None, who))
        if self.queue is not None:
            for capability in self.tasks:
                held = sum(1 for cap, _ in announced.values() if cap == capability)
                waiting = self.queue.get(capability, 0) - held
                if waiting > 0:
                    rows.append(Row("", "waiting", capability, "", None, None, count=waiting))
        return rows + sorted(taken, key=lambda row: row.job_id)

    def _announced(self) -> dict[str, tuple[str, str]]:
        """Jobs other people's inboxes say they hold: job id -> (capability, who)."""
        out: dict[str, tuple[str, str]] = {}
        for (key, capability), holder in sorted(self.holders.items()):
            who = f"{self.names.get(key) or holder.name} ({key[:8]}…)"
            for job_id in holder.jobs:
                if job_id not in self.mine:
                    out.setdefault(job_id, (capability, who))
        return out

    def count(self, capability: str, outstanding: int) -> None:
        """How many jobs of *capability* are outstanding besides mine (where job states are private)."""
        if self.queue is None:
            self.queue = {}
        outstanding = max(outstanding, 0)
        if self.queue.get(capability) != outstanding:
            self.queue[capability] = outstanding
            self.notify()

    def hold(self, person: str, name: str, capability: str, jobs: tuple[str, ...], issued_ms: int, at: float) -> bool:
        """Another person's inbox announces the jobs of *capability* it holds; False if ignored.

        Mine, or of a capability I do not answer: ignored. So is an announcement
        no newer than the last one of that person and capability (replayed or
        out of order). It replaces the last one, and lapses (:meth:`lapse`)
        when no newer one arrives.
        """
        if person == self.me or capability not in self.tasks:
            return False
        last = self.holders.get((person, capability))
        if last is not None and issued_ms <= last.issued_ms:
            return False
        if last is None and len(self.holders) >= MAX_HOLDERS:
            for where in [w for w, h in self.holders.items() if not h.jobs]:
                del self.holders[where]  # memory stays bounded: the silent ones go first
            if len(self.holders) >= MAX_HOLDERS:
                return False
        self.holders[(person, capability)] = Holder(name, jobs, issued_ms, at)
        before = last or Holder("", (), 0, 0.0)
        if before.jobs != jobs or (jobs and before.name != name):
            self.notify()
        return True

    def lapse(self, before: float) -> None:
        """Announcements that arrived before *before* (monotonic) no longer count: their inbox went quiet.

        Their time stays known, so a replay of one is still refused.
        """
        changed = False
        for holder in self.holders.values():
            if holder.seen < before and holder.jobs:
                holder.jobs, changed = (), True
        if changed:
            self.notify()

    def see(self, state: JobState) -> None:
        """A job state from the shared ``jobs`` bucket: waiting and taken jobs of my capabilities are shown."""
        if state.capability not in self.tasks:
            return
        if state.state in ("queued", "running"):
            self.board[state.job_id] = state
        else:
            self.board.pop(state.job_id, None)
        self.notify()

    def forget(self, job_id: str) -> None:
        if self.board.pop(job_id, None) is not None:
            self.notify()

    # -- the person's actions ------------------------------------------------------

    async def claim(self, capability: str | None = None) -> Job | None:
        """Take the next waiting job (of *capability*, or of any); None when nothing waits."""
        if self.claimer is None:
            raise UsageError("this inbox is not connected to a job queue")
        if capability is not None and capability not in self.tasks:
            raise UsageError(f"{capability!r} is not one of this inbox's capabilities")
        return await self.claimer(capability)

    def answer(self, job_id: str, text: str) -> str | None:
        """Answer a held job with *text*; the problem if the answer is refused (the job stays open)."""
        job = self.mine.get(job_id)
        if job is None:
            return "that job is no longer yours (answered, handed back or expired)"
        job.text = text
        value, problem = self.tasks[job.capability].parse(text)
        if problem is not None:
            return problem
        self._decide(job, Decision("answer", value))
        return None

    def decline(self, job_id: str, reason: str) -> str | None:
        """Decline a held job; the submitter gets ``declined: <reason>``. The problem, if refused."""
        job = self.mine.get(job_id)
        if job is None:
            return "that job is no longer yours (answered, handed back or expired)"
        reason = " ".join(reason.split())
        if not reason:
            return "say why you decline (the submitter reads it)"
        self._decide(job, Decision("decline", reason=reason[:MAX_REASON_CHARS]))
        return None

    def release(self, job_id: str) -> str | None:
        """Hand a held job back to the queue unanswered, for someone else (or later)."""
        job = self.mine.get(job_id)
        if job is None:
            return "that job is no longer yours"
        self._decide(job, Decision("release"))
        return None

    def release_all(self) -> int:
        """Hand back every held job, and every job shown from now on (the inbox is closing); how many."""
        self.closed = True
        held = list(self.mine.values())
        for job in held:
            self._decide(job, Decision("release"))
        return len(held)

    def _decide(self, job: Job, decision: Decision) -> None:
        job.decision = decision
        if job.future is not None and not job.future.done():
            job.future.set_result(decision)

    # -- for handlers ------------------------------------------------------------------

    def expect(self, job_id: str) -> asyncio.Future[Job]:
        """A future that gets the job once a handler has put it in the inbox."""
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._expected[job_id] = future
        return future

    async def ask(self, job: Job) -> Decision:
        """Show *job* to the person and wait for their decision (cancelled: it leaves the inbox)."""
        job.future = asyncio.get_running_loop().create_future()
        if self.closed:  # nobody is looking any more
            job.decision = Decision("release")
            return job.decision
        self.mine[job.job_id] = job
        expected = self._expected.pop(job.job_id, None)
        if expected is not None and not expected.done():
            expected.set_result(job)
        self.notify()
        try:
            return await job.future
        finally:
            self.mine.pop(job.job_id, None)
            self.notify()


# -- the peer -------------------------------------------------------------------------------------


class Drafter(Protocol):
    """Prepares a job before the person sees it, and turns their decision into the result (hybrids)."""

    async def prepare(self, job: Job, task: Task, context: JobContext) -> None: ...

    def finish(self, job: Job, decision: Decision) -> Any: ...


Score = Callable[[str], Awaitable[float | None]]


async def no_score(_key: str) -> float | None:
    return None


class HumanPeer:
    """A person's capabilities as worker apps: ``app`` (live jobs) and ``durable_app`` (the desk's).

    Their handlers never compute anything: they put the job in :attr:`inbox`
    and return what the person answers. Live jobs are refused with
    :class:`NotLive` unless *live* is set (a person is rarely quicker than a
    submitter's timeout; durable jobs wait for them).
    """

    def __init__(
        self,
        name: str,
        tasks: dict[str, Task],
        *,
        kind: PeerKind = "human",
        description: str = "",
        inbox: Inbox | None = None,
        live: bool = False,
        drafter: Drafter | None = None,
        score: Score = no_score,
    ) -> None:
        self.name = name
        self.tasks = tasks
        self.inbox = inbox or Inbox(tasks)
        self.live = live
        self.drafter = drafter
        self.score = score
        describe = description or f"{kind} peer {name}"
        self.app = App(name, kind=kind, description=describe)
        self.durable_app = App(name, kind=kind, description=describe)
        for task in tasks.values():
            self._register(self.app, task, "live")
            self._register(self.durable_app, task, "durable")

    def _register(self, app: App, task: Task, source: Source) -> None:
        if task.template is not None:
            template = task.template
            param = template.context_param or "_job"

            async def typed(**kwargs: Any) -> Any:
                context = kwargs.pop(param)
                return await self.handle(task, context, kwargs, source)

            app.capabilities[task.name] = replace(
                template, func=typed, is_async=True, context_param=param, timeout=HUMAN_TIMEOUT_S
            )
            return

        async def schema(_job: JobContext, **arguments: Any) -> Any:
            return await self.handle(task, _job, arguments, source)

        schema.__name__ = schema.__qualname__ = task.name.replace(".", "_").replace("-", "_")
        app.capability(task.name, timeout=HUMAN_TIMEOUT_S, description=task.description, tags=task.tags)(schema)

    async def handle(self, task: Task, context: JobContext, args: dict[str, Any], source: Source) -> Any:
        """One job: check it, show it to the person, wait, return their answer (or raise their refusal)."""
        if task.spec is not None:
            problem = first_problem(args, task.spec.arguments, "")
            if problem:
                where, message = problem[0].lstrip("."), problem[1]
                raise InvalidArguments(f"{where}: {message}" if where else message)
        if source == "live" and not self.live:
            raise NotLive(
                f"{self.name} takes durable jobs only: meshjobs submit --durable --wait SECONDS {task.name} ..."
            )
        job = Job(context.job_id, task.name, dict(args), context.submitter, context.expires_at_ms, source)
        job.score = await self.score(context.submitter)
        self.inbox.scores[context.submitter] = job.score
        if self.drafter is not None:
            await self.drafter.prepare(job, task, context)
        decision = await self.inbox.ask(job)
        if self.drafter is not None:
            return self.drafter.finish(job, decision)
        return settle_decision(decision)


def settle_decision(decision: Decision) -> Any:
    """The value of an answer, or the failure a decline or a hand-back is for the submitter."""
    if decision.kind == "decline":
        raise Declined(f"declined: {decision.reason}")
    if decision.kind == "release":
        raise HandedBack("handed back unanswered")
    return decision.value
