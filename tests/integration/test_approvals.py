"""Approval gates on the embedded broker: live and durable jobs, a worker restart, the CLI, held results."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from meshjobs import App, Client, JobTimeout, Rejected, TrustPolicy, Worker, WorkerConfig
from meshjobs._nats import connect
from meshjobs.durable import Durable
from meshjobs.envelope import APPROVAL_MAGIC, now_ms, open_envelope, open_result, seal_statement
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer
from meshjobs.workflow.approval import (
    APPROVAL_TIMEOUT,
    NOT_APPROVED,
    Approval,
    Decision,
    Request,
    check_provenance,
    decision_key,
    open_decision,
)
from meshjobs.workflow.waiting import ApprovalStore, hold_outcome
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs

pytestmark = pytest.mark.integration


@dataclass
class Gated:
    url: str
    prefix: str
    worker: Worker
    submitter: Identity
    approver: Identity
    operator: Identity
    store: ApprovalStore
    runs: list[str] = field(default_factory=list)

    @property
    def cap(self) -> str:
        return f"{self.prefix}.pay"


@pytest.fixture
async def gated(broker: NatsServer) -> AsyncIterator[Gated]:
    """An in-process worker whose ``<prefix>.pay`` needs the approver's key or an operator's."""
    prefix = f"g{secrets.token_hex(4)}"
    submitter, approver, operator = Identity.generate(), Identity.generate(), Identity.generate()
    app = App("gated")
    runs: list[str] = []

    @app.capability(f"{prefix}.pay", approval=Approval(approvers=(approver.public_key,), operators=True))
    async def pay(to: str, cents: int) -> str:
        runs.append(to)
        return f"paid {cents} to {to}"

    policy = TrustPolicy(frozenset({submitter.public_key}), operators=frozenset({operator.public_key}))
    worker = Worker(app, Identity.generate(), policy, WorkerConfig(durable=False, drain_timeout_s=1.0))
    nc = await nats.connect(broker.url)
    await worker.start(nc)
    store = await ApprovalStore.open(nc)
    try:
        yield Gated(broker.url, prefix, worker, submitter, approver, operator, store, runs)
    finally:
        await worker.drain()
        await nc.close()


async def waiting(store: ApprovalStore, job_id: str, timeout: float = 10.0) -> Request:
    """The waiting request of *job_id*, once its worker posted it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in await store.requests() if r.job_id == job_id and r.state == "waiting"]
        if found:
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no approval request for {job_id} within {timeout} s")


def start(g: Gated, job_id: str, timeout: float = 20.0) -> asyncio.Task[Any]:
    async def go() -> Any:
        async with await Client.connect(g.url, g.submitter) as client:
            return await client.submit(g.cap, {"to": "bob", "cents": 5}, timeout=timeout, job_id=job_id)

    return asyncio.create_task(go())


async def test_a_gated_job_runs_only_once_approved_and_its_result_carries_the_approval(gated: Gated) -> None:
    job_id = f"job-{secrets.token_hex(6)}"
    task = start(gated, job_id)
    request = await waiting(gated.store, job_id)
    assert request.capability == gated.cap and request.args == {"to": "bob", "cents": 5}
    assert request.submitter == gated.submitter.public_key and request.waiting == gated.worker.peer
    assert set(request.approvers) == {gated.approver.public_key, gated.operator.public_key}
    await asyncio.sleep(1.5)  # the live client hears "running" heartbeats meanwhile: no retry, no run
    assert gated.runs == [] and not task.done()
    await gated.store.decide(gated.approver, request, "approve", "ok by me")
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.value == "paid 5 to bob" and gated.runs == ["bob"]
    # The provenance is signed by the worker, and the decision inside by the approver, bound to this request.
    result = open_result(outcome.frame)
    assert result.worker == gated.worker.peer and result.provenance is not None
    decision = check_provenance(outcome.frame, open_envelope(outcome.request))
    assert decision is not None
    assert (decision.approver, decision.decision, decision.reason) == (gated.approver.public_key, "approve", "ok by me")
    [done] = [r for r in await gated.store.requests() if r.job_id == job_id]
    assert (done.state, done.decided_by) == ("approved", gated.approver.public_key)


async def test_any_operator_may_approve_when_the_gate_says_so(gated: Gated) -> None:
    job_id = f"job-{secrets.token_hex(6)}"
    task = start(gated, job_id)
    request = await waiting(gated.store, job_id)
    await gated.store.decide(gated.operator, request, "approve")
    outcome = await asyncio.wait_for(task, 10)
    decision = check_provenance(outcome.frame, open_envelope(outcome.request))
    assert decision is not None and decision.approver == gated.operator.public_key


async def test_a_rejected_job_ends_clearly_and_never_runs(gated: Gated) -> None:
    job_id = f"job-{secrets.token_hex(6)}"
    task = start(gated, job_id)
    request = await waiting(gated.store, job_id)
    await gated.store.decide(gated.approver, request, "reject", "over budget")
    with pytest.raises(Rejected) as exc:
        await asyncio.wait_for(task, 10)
    assert exc.value.code == NOT_APPROVED
    assert f"rejected by approver {gated.approver.public_key}: over budget" in str(exc.value)
    assert gated.runs == []
    # The refusal keeps its provenance too: the signed rejection.
    outcome = exc.value.result
    result = open_result(outcome.frame)
    assert result.status == "rejected" and result.provenance is not None and result.provenance.approval
    assert open_decision(result.provenance.approval).decision == "reject"


async def test_a_decision_signed_by_a_non_approver_is_ignored(gated: Gated) -> None:
    job_id = f"job-{secrets.token_hex(6)}"
    task = start(gated, job_id)
    request = await waiting(gated.store, job_id)
    stranger = Identity.generate()
    with pytest.raises(Rejected, match="may not decide"):
        await gated.store.decide(stranger, request, "approve")  # the tool refuses it
    # Written to the bucket anyway (peers may write it): well formed, correctly bound, wrong signer.
    forged = Decision(
        version=1,
        stage="run",
        job_id=job_id,
        subject_sha256=request.subject_sha256,
        decision="approve",
        reason="trust me",
        approver=stranger.public_key,
        at_ms=now_ms(),
    )
    await gated.store.kv.put(decision_key(request.subject_sha256), seal_statement(APPROVAL_MAGIC, stranger, forged))
    await asyncio.sleep(1.5)
    assert gated.runs == [] and not task.done()
    # The real approver's decision replaces the junk, and counts.
    await gated.store.decide(gated.approver, request, "approve")
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.value == "paid 5 to bob" and gated.runs == ["bob"]


async def test_no_decision_before_the_deadline_ends_with_a_clear_status(gated: Gated) -> None:
    job_id = f"job-{secrets.token_hex(6)}"
    started = time.monotonic()
    with pytest.raises(Rejected) as exc:
        await start(gated, job_id, timeout=3.0)
    assert time.monotonic() - started < 3.0  # the worker's answer came before the submitter gave up
    assert exc.value.code == APPROVAL_TIMEOUT
    assert "approval did not come before the deadline" in str(exc.value)
    assert gated.runs == []
    [request] = [r for r in await gated.store.requests() if r.job_id == job_id]
    assert request.state == "expired"
    with pytest.raises(Exception, match="no job"):
        await gated.store.find(job_id)  # nothing left to decide


async def test_a_held_result_is_accepted_only_once_approved(gated: Gated) -> None:
    """The submitter's side: a verified result waits for a signed approval of the result itself."""
    app = App("plain")
    cap = f"{gated.prefix}.quote"

    @app.capability(cap)
    async def quote(item: str) -> int:
        return 42

    policy = TrustPolicy(frozenset({gated.submitter.public_key}))
    worker = Worker(app, Identity.generate(), policy, WorkerConfig(durable=False))
    nc = await nats.connect(gated.url)
    await worker.start(nc)
    try:
        async with await Client.connect(gated.url, gated.submitter) as client:
            outcome = await client.submit(cap, {"item": "x"}, timeout=10)
            for verb in ("approve", "reject"):
                held = asyncio.create_task(
                    hold_outcome(
                        client.nc,
                        outcome,
                        submitter=gated.submitter.public_key,
                        approvers=[gated.approver.public_key],
                        timeout=10,
                    )
                )
                request = await waiting(gated.store, outcome.job_id)
                assert (request.stage, request.value, request.args) == ("result", 42, {"item": "x"})
                await gated.store.decide(gated.approver, request, verb, "checked")
                if verb == "approve":
                    decided = await asyncio.wait_for(held, 10)
                    assert decided.decision.stage == "result" and decided.decision.approver == gated.approver.public_key
                    outcome = await client.submit(cap, {"item": "x"}, timeout=10)  # a new result to reject
                else:
                    with pytest.raises(Rejected) as exc:
                        await asyncio.wait_for(held, 10)
                    assert exc.value.code == NOT_APPROVED and "checked" in str(exc.value)
            outcome = await client.submit(cap, {"item": "x"}, timeout=10)  # nobody decides on this one
            with pytest.raises(JobTimeout, match="not approved within"):
                await hold_outcome(
                    client.nc, outcome, submitter=gated.submitter.public_key, approvers=[gated.approver.public_key],
                    timeout=0.5,
                )  # fmt: skip
    finally:
        await worker.drain()
        await nc.close()


# -- the CLI ---------------------------------------------------------------------------


def make_home(root: Path, name: str, identity: Identity) -> Path:
    home = root / name
    save_identity(identity, home / IDENTITY_FILE)
    return home


async def cli(home: Path, url: str, *args: str) -> Any:
    return await asyncio.to_thread(meshjobs, *args, env=cli_env(home, url), timeout=60)


async def test_cli_lists_approves_and_rejects(gated: Gated, tmp_path: Path) -> None:
    approver_home = make_home(tmp_path, "approver", gated.approver)
    stranger_home = make_home(tmp_path, "stranger", Identity.generate())
    submitter_home = make_home(tmp_path, "submitter", gated.submitter)
    first, second = f"job-{secrets.token_hex(6)}", f"job-{secrets.token_hex(6)}"
    approved = start(gated, first)
    # The second job is submitted by the CLI: its exit code and message are what a user sees.
    submit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshjobs", "submit", gated.cap, '{"to": "eve", "cents": 9}', "--job-id", second,
        "--timeout", "30", env=cli_env(submitter_home, gated.url), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await waiting(gated.store, first)
        await waiting(gated.store, second)
        listed = await cli(approver_home, gated.url, "approvals", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["job_id"]: r for r in json.loads(listed.stdout)}
        row = rows[first]
        assert (row["capability"], row["args"], row["submitter"]) == (
            gated.cap,
            {"to": "bob", "cents": 5},
            gated.submitter.public_key,
        )
        assert row["may_decide"] is True and 0 < row["deadline_in_s"] <= 20 and row["state"] == "waiting"
        table = await cli(approver_home, gated.url, "approvals")
        assert first in table.stdout and gated.cap in table.stdout
        refused = await cli(stranger_home, gated.url, "approve", first)
        assert refused.returncode == 5 and "may not decide" in refused.stderr, refused.stderr
        missing = await cli(approver_home, gated.url, "reject", first)  # --reason is required
        assert missing.returncode == 2
        ok = await cli(approver_home, gated.url, "approve", first, "--reason", "fine")
        assert ok.returncode == 0, ok.stderr
        assert f"approved {gated.cap} job {first}" in ok.stdout
        again = await cli(approver_home, gated.url, "approve", first)
        assert again.returncode == 2 and "no job" in again.stderr
        no = await cli(approver_home, gated.url, "reject", second, "--reason", "not eve", "--json")
        assert no.returncode == 0, no.stderr
        assert json.loads(no.stdout)["decision"] == "reject"
        outcome = await asyncio.wait_for(approved, 10)
        assert outcome.value == "paid 5 to bob"
        out, err = await asyncio.wait_for(submit.communicate(), 30)
        assert submit.returncode == 5, err
        assert b"not approved" in err or b"rejected by approver" in err
        assert b"not eve" in err
        assert gated.runs == ["bob"]
        left = await cli(approver_home, gated.url, "approvals", "--json")
        assert not {first, second} & {r["job_id"] for r in json.loads(left.stdout)}
    finally:
        if submit.returncode is None:
            submit.kill()
            await submit.wait()


# -- durable jobs ------------------------------------------------------------------------


async def test_a_durable_gated_job_survives_a_worker_restart_while_waiting(broker: NatsServer, tmp_path: Path) -> None:
    submitter, operator, worker_key = Identity.generate(), Identity.generate(), Identity.generate()
    worker_home = make_home(tmp_path, "worker", worker_key)
    (worker_home / "trust.toml").write_text(
        f'[[peer]]\nkey = "{submitter.public_key}"\n\n[[operator]]\nkey = "{operator.public_key}"\n'
    )
    operator_home = make_home(tmp_path, "operator", operator)
    exec_log = tmp_path / "executions.log"

    def launch(n: int) -> WorkerProcess:
        return WorkerProcess.launch(
            "tests.approval_apps:app",
            worker_home,
            broker.url,
            tmp_path / f"worker-{n}.log",
            MESHJOBS_TEST_EXEC_LOG=str(exec_log),
        )

    first = launch(0)
    second: WorkerProcess | None = None
    nc = await connect(broker.url, submitter)
    try:
        durable = await Durable.open(nc)
        store = await ApprovalStore.open(nc)
        job_id = await durable.submit(submitter, "gated.pay", {"to": "carol", "cents": 7})
        request = await waiting(store, job_id, timeout=30)
        assert request.waiting == worker_key.public_key and request.approvers == (operator.public_key,)
        listed = await cli(operator_home, broker.url, "approvals", "--json")
        [row] = [r for r in json.loads(listed.stdout) if r["job_id"] == job_id]
        assert row["args"] == {"to": "carol", "cents": 7} and row["may_decide"] is True
        # A crash while the job waits: the job is redelivered to the next worker, which waits again.
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = launch(1)
        deadline = time.monotonic() + 30
        while (await waiting(store, job_id)).created_ms == request.created_ms:
            assert time.monotonic() < deadline, second.output()
            await asyncio.sleep(0.2)
        assert not exec_log.exists()
        ok = await cli(operator_home, broker.url, "approve", job_id)
        assert ok.returncode == 0, ok.stderr
        result, frame = await durable.wait(job_id, 30)
        assert result.status == "ok" and result.value == "paid 7 to carol"
        assert result.provenance is not None and result.provenance.approval is not None
        decision = open_decision(result.provenance.approval)
        assert (decision.approver, decision.job_id) == (operator.public_key, job_id)
        assert exec_log.read_text().split() == [job_id]  # ran once, after the approval
        state = await durable.state(job_id)
        assert state is not None and state.state == "done"
    finally:
        await nc.close()
        for proc in (first, second):
            if proc is not None:
                proc.kill()
