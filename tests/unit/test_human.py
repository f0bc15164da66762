"""Human and hybrid peers without a network or a terminal: tasks, the inbox, the handlers, hybrid results."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from meshjobs.durable import JobState
from meshjobs.envelope import open_envelope, open_result, seal_envelope
from meshjobs.errors import Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.peers.desk import Holding, open_holding, seal_holding
from meshjobs.peers.human import (
    HumanFileError,
    HumanPeer,
    Inbox,
    Job,
    load_human_file,
    parse_human_file,
    task_from_spec,
    tasks_from_app,
)
from meshjobs.peers.hybrid import Draft, HybridDrafter, args_digest, check_hybrid, open_draft, seal_draft
from meshjobs.peers.persona import parse_persona
from meshjobs.runtime.app import Capability, JobContext
from meshjobs.runtime.execute import Execution, execute, seal
from tests.human_app import app as people

FILE = """
version = 1
name = "reviewers"
instructions = "Be kind."

[[capability]]
name = "review.text"
description = "Proofread a paragraph"
prompt = "Proofread this: $text"

[capability.arguments]
type = "object"
required = ["text"]
additionalProperties = false
properties.text = { type = "string", minLength = 1 }

[capability.result]
type = "object"
required = ["ok", "fixed"]
additionalProperties = false
properties.ok = { type = "boolean" }
properties.fixed = { type = "string" }
"""


def envelope_for(capability: str, args: dict[str, Any], submitter: Identity | None = None) -> Any:
    identity = submitter or Identity.generate()
    _, frame = seal_envelope(
        identity, capability, args, audience=f"mesh.jobs.{capability}", job_id="job-0001-abc", ttl_ms=60_000
    )
    return open_envelope(frame), frame


# -- tasks --------------------------------------------------------------------------------


def test_app_tasks_take_their_shape_from_the_type_hints() -> None:
    tasks = tasks_from_app(people)
    assert set(tasks) == {"people.add", "people.title", "people.review"}
    assert tasks["people.add"].parse("5") == (5, None)
    assert tasks["people.add"].parse("five")[1] is not None
    assert tasks["people.add"].parse("") == (None, "the answer is empty")
    # A string result takes bare text, and JSON that is not a string as its text.
    assert tasks["people.title"].parse("A title") == ("A title", None)
    assert tasks["people.title"].parse("42") == ("42", None)
    assert tasks["people.title"].parse('"quoted"') == ("quoted", None)
    review = tasks["people.review"]
    assert review.parse('{"ok": true, "note": "fine"}') == ({"ok": True, "note": "fine"}, None)
    value, problem = review.parse('{"ok": "maybe"}')
    assert value is None and problem is not None and "ok" in problem
    assert '"ok"' in review.expects


def test_file_tasks_use_the_json_schema_subset() -> None:
    spec = parse_human_file(FILE)
    assert spec.instructions == "Be kind."
    task = task_from_spec(spec.capabilities[0])
    assert task.parse('{"ok": true, "fixed": "Hello."}') == ({"ok": True, "fixed": "Hello."}, None)
    assert task.parse('{"ok": 1, "fixed": "x"}') == (None, "$.ok: expected boolean, got integer")
    assert task.parse("{") [1].startswith("not JSON")  # fmt: skip
    assert task.instructions({"text": "teh cat"}) == "Proofread this: teh cat"


def test_bad_files_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(
        HumanFileError, match=r"capability\[0\]\.result: properties\.fixed: unsupported keyword 'format'"
    ):
        parse_human_file(FILE.replace('properties.fixed = { type = "string" }', 'properties.fixed = { format = "x" }'))
    with pytest.raises(HumanFileError, match="unknown field"):
        parse_human_file(FILE.replace("version = 1", "version = 1\nendpoint = 3"))
    with pytest.raises(HumanFileError, match="missing.toml does not exist"):
        load_human_file(tmp_path / "missing.toml")
    (tmp_path / "h.toml").write_text(FILE)
    assert load_human_file(tmp_path / "h.toml").name == "reviewers"


# -- the inbox ------------------------------------------------------------------------------


async def test_answer_is_validated_and_a_refused_answer_leaves_the_job_open() -> None:
    inbox = Inbox(tasks_from_app(people))
    job = Job("job-1", "people.add", {"a": 2, "b": 3}, "U" + "A" * 55, 0)
    waiting = asyncio.create_task(inbox.ask(job))
    await asyncio.sleep(0)
    assert [row.state for row in inbox.rows()] == ["yours"]
    assert inbox.answer("job-1", "five") is not None
    assert not waiting.done() and "job-1" in inbox.mine
    assert inbox.answer("job-1", "5") is None
    decision = await waiting
    assert (decision.kind, decision.value) == ("answer", 5)
    assert inbox.mine == {}
    assert inbox.answer("job-1", "5") is not None  # not yours any more


async def test_decline_needs_a_reason_and_release_hands_back() -> None:
    inbox = Inbox(tasks_from_app(people))
    first = asyncio.create_task(inbox.ask(Job("job-1", "people.add", {}, "U" + "A" * 55, 0)))
    second = asyncio.create_task(inbox.ask(Job("job-2", "people.add", {}, "U" + "A" * 55, 0)))
    await asyncio.sleep(0)
    assert inbox.decline("job-1", "   ") == "say why you decline (the submitter reads it)"
    assert inbox.decline("job-1", "not my\nfield") is None
    assert (await first).reason == "not my field"
    assert inbox.release_all() == 1
    assert (await second).kind == "release"


async def test_the_board_shows_waiting_and_taken_jobs_of_my_capabilities() -> None:
    me, other = "U" + "M" * 55, "U" + "O" * 55
    inbox = Inbox(tasks_from_app(people), me=me, names={"U" + "S" * 55: "sam"})
    submitter = "U" + "S" * 55
    inbox.see(JobState("j2", "running", "people.add", submitter, "d", worker=other, detail="claimed by bob"))
    inbox.see(JobState("j1", "queued", "people.add", submitter, "d"))
    inbox.see(JobState("j3", "queued", "other.cap", submitter, "d"))  # not mine to answer
    inbox.see(JobState("j4", "running", "people.add", submitter, "d", worker=me, detail="claimed by me"))
    rows = inbox.rows()
    assert [(r.job_id, r.state, r.who) for r in rows] == [("j1", "waiting", ""), ("j2", "taken", "bob")]
    assert inbox.display(submitter).startswith("sam (US")
    inbox.see(JobState("j2", "done", "people.add", submitter, "d", worker=other))
    assert [r.job_id for r in inbox.rows()] == ["j1"]


async def test_where_job_states_are_private_the_queue_is_counted_and_holders_are_announced() -> None:
    me, bob, carol = ("U" + c * 55 for c in "MBC")
    inbox = Inbox(tasks_from_app(people), me=me, names={carol: "carol"})
    inbox.count("people.add", 3)  # outstanding on the consumer: 3 (besides mine)
    assert [(r.state, r.capability, r.count, r.key) for r in inbox.rows()] == [
        ("waiting", "people.add", 3, "queue:people.add")
    ]
    assert inbox.hold(bob, "bob", "people.add", ("job-b-0001",), 100, at=10.0)
    assert not inbox.hold(bob, "bob", "people.add", ("job-b-0009",), 100, at=10.5)  # not newer: a replay
    assert not inbox.hold(me, "me", "people.add", ("job-m-0001",), 101, at=10.0)  # my own
    assert not inbox.hold(bob, "bob", "other.cap", ("job-o-0001",), 101, at=10.0)  # not mine to answer
    assert inbox.hold(carol, "mallory", "people.title", ("job-c-0001",), 5, at=11.0)  # the trust file names carol
    shown = [
        ("waiting", "people.add", 2, "", ""),  # bob holds one of the three
        ("taken", "people.add", 0, "job-b-0001", f"bob ({bob[:8]}…)"),
        ("taken", "people.title", 0, "job-c-0001", f"carol ({carol[:8]}…)"),
    ]
    assert [(r.state, r.capability, r.count, r.job_id, r.who) for r in inbox.rows()] == shown
    inbox.lapse(10.5)  # bob's inbox went quiet (a terminal killed outright): carol's still counts
    assert [(r.state, r.count, r.job_id) for r in inbox.rows()] == [("waiting", 3, ""), ("taken", 0, "job-c-0001")]
    assert not inbox.hold(bob, "bob", "people.add", ("job-b-0001",), 100, at=12.0)  # its replay stays refused
    assert inbox.hold(bob, "bob", "people.add", (), 102, at=12.0)  # answered: nothing held
    inbox.count("people.add", 0)
    assert [r.job_id for r in inbox.rows()] == ["job-c-0001"]

    # Where the bucket is listed (an open broker), an announcement shows a job queued there as taken.
    listed = Inbox(tasks_from_app(people), me=me)
    listed.see(JobState("job-b-0001", "queued", "people.add", carol, "d"))
    listed.see(JobState("job-q-0001", "queued", "people.add", carol, "d"))
    listed.hold(bob, "bob", "people.add", ("job-b-0001",), 1, at=1.0)
    assert [(r.job_id, r.state) for r in listed.rows()] == [("job-q-0001", "waiting"), ("job-b-0001", "taken")]


def test_holdings_are_signed_by_the_person_they_name() -> None:
    person = Identity.generate()
    holding = Holding(
        version=1, capability="people.add", person=person.public_key, name="alice", jobs=["job-0001-abc"], issued_at=1
    )
    frame = seal_holding(person, holding)
    assert open_holding(frame) == holding
    with pytest.raises(Rejected):
        open_holding(frame.replace(b'"alice"', b'"mall0"'))  # the name is signed too
    with pytest.raises(Rejected):
        open_holding(seal_holding(Identity.generate(), holding))  # signed by another key than the one it names
    with pytest.raises(Rejected):
        open_result(b"MJ1R" + frame[4:])  # a holding's signature never passes for a result's


async def test_claim_needs_a_queue_and_a_known_capability() -> None:
    inbox = Inbox(tasks_from_app(people))
    with pytest.raises(UsageError, match="not connected"):
        await inbox.claim()

    async def claimer(capability: str | None) -> Job | None:
        return None

    inbox.claimer = claimer
    assert await inbox.claim("people.add") is None
    with pytest.raises(UsageError, match="not one of"):
        await inbox.claim("nope.nope")


# -- the handlers, through the runtime's execute ---------------------------------------------------


async def run_job(cap: Capability, args: dict[str, Any], inbox: Inbox, act: Any) -> Execution:
    envelope, _ = envelope_for(cap.name, args)
    running = asyncio.create_task(execute(cap, envelope, "U" + "W" * 55))
    while not inbox.mine:
        if running.done():
            return running.result()  # finished without the person
        await asyncio.sleep(0.005)
    act(next(iter(inbox.mine)))
    return await running


async def test_handlers_return_the_answer_or_the_decline() -> None:
    peer = HumanPeer("people", tasks_from_app(people))
    cap = peer.durable_app.capabilities["people.title"]
    assert cap.timeout > 86400  # the job's deadline bounds a person, not a handler timeout
    done = await run_job(cap, {"text": "hi"}, peer.inbox, lambda j: peer.inbox.answer(j, "Greeting"))
    assert done == Execution("ok", "Greeting")
    declined = await run_job(cap, {"text": "hi"}, peer.inbox, lambda j: peer.inbox.decline(j, "too vague"))
    assert declined == Execution("error", None, ("Declined", "declined: too vague"))
    invalid = await run_job(cap, {"text": 3, "x": 1}, peer.inbox, lambda j: None)
    assert invalid.status == "invalid"


async def test_live_jobs_are_refused_unless_asked_for() -> None:
    peer = HumanPeer("people", tasks_from_app(people))
    refused = await run_job(peer.app.capabilities["people.add"], {"a": 1, "b": 2}, peer.inbox, lambda j: None)
    assert refused.status == "error" and refused.error is not None
    assert refused.error[0] == "NotLive" and "--durable" in refused.error[1]
    live = HumanPeer("people", tasks_from_app(people), live=True)
    done = await run_job(
        live.app.capabilities["people.add"], {"a": 1, "b": 2}, live.inbox, lambda j: live.inbox.answer(j, "3")
    )
    assert done == Execution("ok", 3)


async def test_file_handlers_check_arguments_before_the_person_sees_them() -> None:
    spec = parse_human_file(FILE)
    peer = HumanPeer(spec.name, {c.name: task_from_spec(c) for c in spec.capabilities})
    cap = peer.durable_app.capabilities["review.text"]
    invalid = await run_job(cap, {"text": ""}, peer.inbox, lambda j: None)
    assert invalid == Execution("invalid", None, ("invalid_args", "text: length 0 is less than minLength 1"))
    answer = '{"ok": false, "fixed": "the cat"}'
    done = await run_job(cap, {"text": "teh cat"}, peer.inbox, lambda j: peer.inbox.answer(j, answer))
    assert done == Execution("ok", {"ok": False, "fixed": "the cat"})


# -- hybrid ------------------------------------------------------------------------------------------

PERSONA = """
version = 1
name = "proofreader"
system_prompt = "You proofread."

[endpoint]
base_url = "http://127.0.0.1:9/v1"
model = "standin"
api_key_env = ""
""" + FILE.split("\n", 4)[4]


class FakeModel:
    """Stands in for PersonaPeer: drafts a fixed answer."""

    def __init__(self, output: Any) -> None:
        self.persona = parse_persona(PERSONA)
        self.output = output

    async def run(self, cap: Any, args: dict[str, Any], job: JobContext | None = None) -> dict[str, Any]:
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return {"output": self.output, "model": "standin", "prompt_sha256": "0" * 64, "usage": usage}


async def hybrid_run(args: dict[str, Any], act: Any) -> tuple[Execution, Identity, Identity, Job]:
    persona_key, person = Identity.generate(), Identity.generate()
    persona = parse_persona(PERSONA)
    drafter = HybridDrafter(FakeModel({"ok": True, "fixed": "the cat"}), persona_key)  # type: ignore[arg-type]
    peer = HumanPeer(
        "proofreader", {c.name: task_from_spec(c) for c in persona.capabilities}, kind="hybrid", drafter=drafter
    )
    seen: list[Job] = []

    def decide(job_id: str) -> None:
        seen.append(peer.inbox.mine[job_id])
        act(peer.inbox, job_id)

    execution = await run_job(peer.durable_app.capabilities["review.text"], args, peer.inbox, decide)
    return execution, persona_key, person, seen[0]


@pytest.mark.parametrize(
    ("text", "decision", "changed"),
    [(None, "approved", False), ('{"ok": true, "fixed": "The cat."}', "edited", True)],
)
async def test_hybrid_results_say_what_the_person_did(text: str | None, decision: str, changed: bool) -> None:
    args = {"text": "teh cat"}

    def act(inbox: Inbox, job_id: str) -> None:
        job = inbox.mine[job_id]
        assert json.loads(job.text) == {"ok": True, "fixed": "the cat"}  # the editor starts with the draft
        assert "AI draft by proofreader" in job.note
        assert inbox.answer(job_id, text if text is not None else job.text) is None

    execution, persona_key, person, _ = await hybrid_run(args, act)
    assert execution.status == "ok"
    assert execution.value["decision"] == decision and execution.value["changed"] is changed
    result = open_result(seal(person, "job-0001-abc", "0" * 64, execution))
    draft = check_hybrid(result, args)
    assert draft is not None and draft.persona == persona_key.public_key and result.worker == person.public_key
    with pytest.raises(Rejected, match="belongs to another job"):
        check_hybrid(result, {"text": "other"})
    lie = execution._replace(value={**execution.value, "changed": not changed})
    with pytest.raises(Rejected, match="do not match"):
        check_hybrid(open_result(seal(person, "job-0001-abc", "0" * 64, lie)), args)


async def test_a_rejected_draft_is_a_decline_that_keeps_the_signed_draft() -> None:
    execution, persona_key, _, job = await hybrid_run({"text": "teh cat"}, lambda inbox, j: inbox.decline(j, "wrong"))
    assert execution.status == "error" and execution.error == ("Declined", "declined: rejected the AI draft: wrong")
    value = job.failure_value
    assert value["decision"] == "rejected" and value["changed"] is False and value["output"] is None
    assert open_draft(value["draft"]).persona == persona_key.public_key


def test_draft_signatures_are_their_own_kind() -> None:
    key = Identity.generate()
    draft = Draft(
        version=1, job_id="job-0001-abc", capability="review.text", submitter=key.public_key,
        args_sha256=args_digest({}), persona=key.public_key, persona_name="p", output=1, model="m",
        prompt_sha256="0" * 64, usage={}, issued_at=0,
    )  # fmt: skip
    frame = seal_draft(key, draft)
    assert open_draft(frame) == draft
    with pytest.raises(Rejected):
        open_result(b"MJ1R" + frame[4:])  # a draft's signature never passes for a result's
    with pytest.raises(Rejected):
        open_draft(frame.replace(b'"output":1', b'"output":2'))


# -- the commands' expected failures: one line, exit code 2, no terminal taken over -------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("human", "nope"), "expected MODULE:ATTR"),
        (("human", "missing.toml"), "human capability file missing.toml does not exist"),
        (("human", "tests.human_app:nothing"), "has no attribute"),
        (("hybrid", "missing.toml"), "persona file missing.toml does not exist"),
    ],
)
def test_inbox_commands_fail_in_one_line(home: Path, args: tuple[str, ...], text: str) -> None:
    from tests.unit.test_cli_runner import invoke, one_line_failure

    one_line_failure(invoke(home, *args), 2, text)


def test_the_shipped_human_file_loads() -> None:
    spec = load_human_file(Path(__file__).resolve().parents[2] / "workers" / "humans" / "proofreading.toml")
    task = task_from_spec(spec.capabilities[0])
    assert task.parse('{"corrected": "The cat.", "changes": 1}') == ({"corrected": "The cat.", "changes": 1}, None)
