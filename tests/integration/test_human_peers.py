"""Human and hybrid peers for real: `python -m meshjobs human|hybrid` in pseudo-terminals, driven by keys.

Each person is a real inbox process (pexpect, a 140x40 pseudo-terminal) on the
session's embedded broker (and once on a closed one, where job states are
private); submitters queue durable jobs (in-process, and once
through `meshjobs submit --durable --wait`) and verify the signed results. The
persona of the hybrid test talks to the local OpenAI-compatible stand-in.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pexpect
import pytest

from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.client import Client
from meshjobs.durable import Durable
from meshjobs.identity import IDENTITY_FILE, Identity, load_identity, save_identity
from meshjobs.infra.broker import NatsServer, closed_roles, embedded
from meshjobs.peers.hybrid import check_hybrid
from meshjobs.peers.openai_standin import OpenAIStandin
from meshjobs.state import provision
from tests.conftest import REPO, cli_env
from tests.unit.test_human import FILE

pytestmark = pytest.mark.integration

CTRL_S, CTRL_D, CTRL_Q, F7 = "\x13", "\x04", "\x11", "\x1b[18~"


class Terminal:
    """One person's inbox: a real `meshjobs` process in a pseudo-terminal; its screen output goes to a file."""

    def __init__(self, args: list[str], home: Path, url: str, screen: Path) -> None:
        self.home = home
        self.key = load_identity(home / IDENTITY_FILE).public_key
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "meshjobs", *args],
            env=cli_env(home, url, TERM="xterm-256color"),
            cwd=str(REPO),
            dimensions=(40, 140),
            encoding="utf-8",
            timeout=30,
        )
        self.child.logfile_read = screen.open("w", encoding="utf-8")

    def expect(self, *texts: str, timeout: float = 30) -> int:
        """Wait until one of *texts* is drawn; its index."""
        return int(self.child.expect([re.escape(t) for t in texts], timeout=timeout))

    def keys(self, *groups: str) -> None:
        """Type each group of keys, with a pause between groups (as a person would: a binding such as F7
        runs after the editor has handled the keys sent with it, so typing right after it would race it)."""
        for group in groups:
            self.child.send(group)
            time.sleep(0.2)

    def claim(self, job_id: str, timeout: float = 30) -> None:
        """Press c until *job_id* is claimed (a job handed back by a killed inbox waits for its ack wait)."""
        deadline = time.monotonic() + timeout
        while True:
            self.keys("c")
            if self.expect(f"claimed {job_id}", "nothing waiting") == 0:
                return
            assert time.monotonic() < deadline, f"{job_id} never came back to the queue"
            time.sleep(0.5)

    def hang_up(self) -> None:
        """The terminal closes: the kernel's SIGHUP. The inbox hands back what it holds and exits."""
        self.child.kill(signal.SIGHUP)
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.wait()

    def kill(self) -> None:
        """The inbox dies outright (SIGKILL): nothing is handed back explicitly."""
        self.child.kill(signal.SIGKILL)
        self.child.expect(pexpect.EOF, timeout=10)
        self.child.wait()

    def stop(self) -> None:
        if self.child.isalive():
            self.keys(CTRL_Q)
            try:
                self.child.expect(pexpect.EOF, timeout=20)
            except pexpect.TIMEOUT:
                self.child.kill(signal.SIGKILL)
        self.child.close(force=True)
        if self.child.logfile_read is not None:
            self.child.logfile_read.close()


def person_home(path: Path, *trusted: str) -> Path:
    save_identity(Identity.generate(), path / IDENTITY_FILE)
    (path / "trust.toml").write_text("".join(f'[[peer]]\nkey = "{key}"\nname = "sam"\n' for key in trusted))
    return path


@contextmanager
def inboxes(url: str, tmp_path: Path, identity: Identity) -> Iterator[Callable[..., Terminal]]:
    """Start inbox processes on the broker at *url*; every one is stopped on the way out."""
    started: list[Terminal] = []

    def start(name: str, *args: str, home: Path | None = None) -> Terminal:
        home = home or person_home(tmp_path / name, identity.public_key)
        term = Terminal([*args, "--name", name], home, url, tmp_path / f"{name}-{len(started)}.screen")
        started.append(term)
        return term

    try:
        yield start
    finally:
        for term in started:
            term.stop()


@pytest.fixture
def people(broker: NatsServer, tmp_path: Path, identity: Identity) -> Iterator[Callable[..., Terminal]]:
    """Start inbox processes on the session's (open) broker; every one is stopped at teardown."""
    with inboxes(broker.url, tmp_path, identity) as start:
        yield start


@pytest.fixture
async def durable(client: Client) -> AsyncIterator[Durable]:
    yield await Durable.open(client.nc)


async def test_a_person_answers_refuses_bad_input_and_declines(
    people: Callable[..., Terminal], durable: Durable, identity: Identity, home: Path, broker: NatsServer
) -> None:
    job = await durable.submit(identity, "people.add", {"a": 2, "b": 3})
    alice = people("alice", "human", "tests.human_app:app")
    alice.expect(job)  # waiting in the shared queue
    alice.keys("c")
    alice.expect(f"claimed {job}")
    alice.expect("from sam")  # the submitter, named by alice's trust file, with its score
    alice.keys("five" + CTRL_S)
    alice.expect("answer refused")
    state = await durable.state(job)
    assert state is not None and (state.state, state.detail) == ("running", "claimed by alice")
    assert await durable.result(job) is None  # the job stays open
    alice.keys(F7, "5" + CTRL_S)
    alice.expect(f"answered {job}")
    result, _ = await durable.wait(job, 10)  # verified: signed by the key it names
    assert (result.status, result.value, result.worker) == ("ok", 5, alice.key)

    # Declining, for a submitter waiting with the CLI: a clear failure, exit code 1.
    declined = "human-decline-0001"
    submit = subprocess.Popen(
        [sys.executable, "-m", "meshjobs", "submit", "--durable", "--wait", "60", "--job-id", declined]
        + ["people.title", '{"text": "quarterly report"}'],
        env=cli_env(home, broker.url),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        alice.expect(declined)
        alice.keys("c")
        alice.expect(f"claimed {declined}")
        alice.keys(CTRL_D)
        alice.expect("why do you decline")
        alice.keys("not my field\r")
        alice.expect(f"declined {declined}")
        out, err = submit.communicate(timeout=30)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
    assert submit.returncode == 1, (out, err)
    assert "Declined: declined: not my field" in err


async def test_closing_an_inbox_mid_job_loses_nothing(
    people: Callable[..., Terminal], durable: Durable, identity: Identity
) -> None:
    job = await durable.submit(identity, "people.add", {"a": 40, "b": 2})
    alice = people("alice", "human", "tests.human_app:app")
    bob = people("bob", "human", "tests.human_app:app")
    alice.expect(job)
    bob.expect(job)
    alice.keys("c")
    alice.expect(f"claimed {job}")
    bob.expect("taken by alice")  # one claims, the others see it taken

    alice.hang_up()  # the terminal closes: the job goes back at once
    state = await durable.state(job)
    assert state is not None and (state.state, state.detail) == ("queued", "handed back by alice")
    bob.claim(job)
    bob.kill()  # bob's inbox dies outright while he works on it

    again = people("alice", "human", "tests.human_app:app", home=alice.home)  # alice restarts
    again.expect(job)
    again.claim(job)  # back once the ack wait of bob's delivery has passed
    again.keys("42" + CTRL_S)
    again.expect(f"answered {job}")
    result, _ = await durable.wait(job, 10)
    assert (result.status, result.value, result.worker) == ("ok", 42, alice.key)


@pytest.fixture
async def closed(tmp_path: Path, identity: Identity) -> AsyncIterator[tuple[NatsServer, dict[str, Path]]]:
    """A closed broker, as `meshjobs up --closed --admit KEY` runs it: an operator provisions mesh state;
    the submitter (*identity*), alice and bob are admitted as ordinary peers (worker and submitter)."""
    homes = {name: person_home(tmp_path / name, identity.public_key) for name in ("alice", "bob")}
    peers = [identity.public_key, *(load_identity(home / IDENTITY_FILE).public_key for home in homes.values())]
    operator = Identity.generate()
    server = embedded(tmp_path / "closed", admitted=closed_roles(operator.public_key, peers)).start()
    try:
        nc = await connect(server.url, operator)
        try:
            await provision(nc, MESH_STATE)
        finally:
            await nc.close()
        yield server, homes
    finally:
        server.stop()


async def test_on_a_closed_mesh_inboxes_count_waiting_jobs_and_see_who_took_one(
    closed: tuple[NatsServer, dict[str, Path]], tmp_path: Path, identity: Identity
) -> None:
    """Job states are private there (no peer may list the jobs bucket): each inbox counts what waits on the
    capability's consumer, and learns who took a job from the other inboxes' signed announcements."""
    server, homes = closed
    async with await Client.connect(server.url, identity) as client:
        durable = await Durable.open(client.nc)
        with inboxes(server.url, tmp_path, identity) as start:
            alice = start("alice", "human", "tests.human_app:app", home=homes["alice"])
            bob = start("bob", "human", "tests.human_app:app", home=homes["bob"])
            job = await durable.submit(identity, "people.add", {"a": 40, "b": 2})
            alice.expect("1 waiting")
            bob.expect("1 waiting")
            alice.keys("c")
            alice.expect(f"claimed {job}")
            bob.expect("taken by alice", timeout=10)  # one claims, the others see it taken
            alice.keys("42" + CTRL_S)
            alice.expect(f"answered {job}")
            result, _ = await durable.wait(job, 10)  # signed by alice, who holds the claim
            assert (result.status, result.value, result.worker) == ("ok", 42, alice.key)
            bob.keys("c")
            bob.expect("nothing waiting")
    for home in homes.values():  # the refused watch failed at once, and is no warning
        log = home / "inbox.log"
        assert "did not answer" not in (log.read_text() if log.exists() else "")


PERSONA = """
version = 1
name = "proofreader"
system_prompt = "You proofread."

[endpoint]
base_url = "{url}"
model = "standin"
api_key_env = ""
"""


async def test_hybrid_drafts_are_approved_or_edited_and_both_signatures_verify(
    people: Callable[..., Terminal], durable: Durable, identity: Identity, tmp_path: Path
) -> None:
    with OpenAIStandin() as standin:
        persona = tmp_path / "proofreader.toml"
        persona.write_text(PERSONA.format(url=standin.url) + FILE.split("\n", 4)[4])
        approve_args: dict[str, Any] = {"text": "teh cat"}
        edit_args: dict[str, Any] = {"text": "a dgo"}
        approved = await durable.submit(identity, "review.text", approve_args)
        edited = await durable.submit(identity, "review.text", edit_args)
        carol = people("carol", "hybrid", str(persona))
        carol.expect(edited)
        carol.keys("c")
        carol.expect(f"claimed {approved}")
        carol.expect("AI draft by proofreader")
        carol.keys(CTRL_S)  # the draft as it is
        carol.expect(f"answered {approved}")
        carol.keys("c")
        carol.expect(f"claimed {edited}")
        carol.keys(F7, '{"ok": false, "fixed": "a dog"}' + CTRL_S)
        carol.expect(f"answered {edited}")

        persona_key = load_identity(carol.home / "personas" / "proofreader.nk").public_key
        for job, args, decision, changed in (
            (approved, approve_args, "approved", False),
            (edited, edit_args, "edited", True),
        ):
            result, _ = await durable.wait(job, 10)  # the person's signature, checked
            assert result.status == "ok" and result.worker == carol.key
            draft = check_hybrid(result, args)  # the persona's signature and the draft's binding, checked
            assert draft is not None and draft.persona == persona_key != carol.key
            assert (result.value["decision"], result.value["changed"]) == (decision, changed)
            assert draft.model == "standin" and draft.usage["total_tokens"]
        result, _ = await durable.wait(edited, 1)
        assert result.value["output"] == {"ok": False, "fixed": "a dog"}
