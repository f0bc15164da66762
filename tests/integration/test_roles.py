"""Roles in a closed mesh: an ordinary admitted key attacks from the hub and from a leaf, and fails.

The session's closed topology (tests/closed_mesh.py: two one-node hub regions
with the "hub" JetStream domain, one community leaf), mesh state provisioned
by the operator, and a real worker process on the leaf for this module. The
attacker is admitted on both servers as an ordinary peer, trusted by no
worker and no operator. Every attack must fail with a permissions violation;
the same attack against an open broker must succeed (so each case can fail);
afterwards the mesh still serves signed work, live and durable.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy

from meshjobs import Client
from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.durable import Durable, consumer_name
from meshjobs.envelope import open_result, seal_result
from meshjobs.errors import ConnectError, JobTimeout, Reason, Rejected
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra import natsconf
from meshjobs.infra.broker import NatsServer, closed_roles, embedded, find_nats_server
from meshjobs.infra.credentials import ensure_credentials
from meshjobs.infra.topology import Topology
from meshjobs.jobrecords import JobKeys
from meshjobs.state import BucketSpec, StateSpec, StreamSpec, open_bucket, provision
from meshjobs.trust.quarantine import issue_order
from tests.closed_mesh import HUB, LEAF, POOL, ClosedMesh, closed_topology, raw_connect
from tests.conftest import REPO, WorkerProcess, cli_env, wait_for_instances

pytestmark = pytest.mark.integration

BUCKETS = ("reputation", "quarantine", "job_results", "jobs", "job_claims", "claims")
STREAMS = ["JOBS", "JOBS_DLQ", "EVIDENCE", *(f"KV_{b}" for b in BUCKETS)]
DURABLE = consumer_name("demo.add")  # the worker's durable consumer on JOBS


# -- the closed mesh ----------------------------------------------------------------


@dataclass
class Closed:
    topology: Topology
    ids: dict[str, Identity]
    worker: WorkerProcess

    def url(self, where: str) -> str:
        return self.topology.client_url(HUB if where == "hub" else LEAF)


@pytest.fixture(scope="module")
def closed(closed_mesh: ClosedMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Closed]:
    """The session's closed mesh (tests/closed_mesh.py), with a real worker process on its leaf for this module."""
    root = tmp_path_factory.mktemp("roles")
    topology, ids = closed_mesh.topology, closed_mesh.ids
    home = root / "worker"
    save_identity(ids["worker"], home / IDENTITY_FILE)
    (home / "trust.toml").write_text(
        f'[[peer]]\nkey = "{ids["user"].public_key}"\n[[operator]]\nkey = "{ids["op"].public_key}"\n'
    )
    worker = WorkerProcess.launch(
        "workers.demo:app", home, topology.client_url(LEAF), root / "worker.log", "--community", LEAF
    )
    try:
        asyncio.run(wait_for_instances(topology.client_url(HUB), ids["user"], 1, "demo.add"))
        asyncio.run(_wait_for_consumer(topology.client_url(HUB), ids["op"]))
        yield Closed(topology, ids, worker)
    finally:
        try:
            worker.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()


async def _wait_for_consumer(url: str, op: Identity, timeout: float = 30) -> None:
    """The worker creates its durable consumer in the background once it is up."""
    nc = await connect(url, op)
    try:
        js = nc.jetstream(domain="hub", timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await js.consumer_info("JOBS", DURABLE)
                return
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


# -- attacks ------------------------------------------------------------------------


@dataclass
class Env:
    """Where one attack runs: the attacker's connection, a victim peer's, and what the attacker was told."""

    attacker: NATS
    victim: NATS
    victim_key: str
    worker_key: str
    errors: list[str] = field(default_factory=list)
    #: Makes traffic arrive in the victim's own inbox (``_INBOX.<victim>.probe``).
    to_victim_inbox: Callable[[], Awaitable[None]] | None = None

    async def close(self) -> None:
        for nc in (self.attacker, self.victim):
            await nc.close()


async def _request(env: Env, subject: str, body: bytes = b"") -> bool:
    """True when JetStream answered without an error (the attack worked)."""
    try:
        msg = await env.attacker.request(subject, body, timeout=1.0)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    return not json.loads(msg.data).get("error")


def delete_stream(name: str, api: str = "$JS.hub.API") -> Callable[[Env], Awaitable[bool]]:
    return lambda env: _request(env, f"{api}.STREAM.DELETE.{name}")


async def purge_jobs(env: Env) -> bool:
    return await _request(env, "$JS.hub.API.STREAM.PURGE.JOBS", b"{}")


async def delete_worker_consumer(env: Env) -> bool:
    return await _request(env, f"$JS.hub.API.CONSUMER.DELETE.JOBS.{DURABLE}")


async def update_jobs_stream(env: Env) -> bool:
    info = await env.attacker.request("$JS.hub.API.STREAM.INFO.JOBS", b"", timeout=2)  # reading is allowed
    config = json.loads(info.data)["config"]
    config["max_msgs"] = 3
    return await _request(env, "$JS.hub.API.STREAM.UPDATE.JOBS", json.dumps(config).encode())


def kv_write(bucket: str, prefix: str) -> Callable[[Env], Awaitable[bool]]:
    async def attack(env: Env) -> bool:
        return await _request(env, f"{prefix}$KV.{bucket}.{env.worker_key}", b"forged")

    return attack


async def _gather(nc: NATS, subject: str, queue: str = "") -> list[Msg]:
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, queue=queue, cb=keep)
    await nc.flush()
    return got


async def _repeat(action: Callable[[], Awaitable[None]], done: Callable[[], bool], seconds: float = 2.0) -> None:
    """Do *action* until *done* (interest may take a moment to cross a leaf link), at least three times."""
    deadline = time.monotonic() + seconds
    for round_ in range(1000):
        await action()
        await asyncio.sleep(0.1)
        if round_ >= 2 and (done() or time.monotonic() > deadline):
            return


def spy_on_commands(queue: str) -> Callable[[Env], Awaitable[bool]]:
    """Receive every capability's commands without joining the capability's queue group."""

    async def attack(env: Env) -> bool:
        spied = await _gather(env.attacker, "mesh.cmd.>", queue)
        # Positive control: the same connection may join the probe's own queue group.
        control = await _gather(env.attacker, "mesh.cmd.roles.probe", "mesh.cmd.roles.probe")

        async def send() -> None:
            await env.victim.publish("mesh.cmd.roles.probe", b"probe")

        await _repeat(send, lambda: bool(control))
        assert control, "the probe never reached its own queue group (the test proves nothing)"
        return bool(spied)

    return attack


async def read_victim_inbox(env: Env) -> bool:
    spied = await _gather(env.attacker, f"_INBOX.{env.victim_key}.>")
    control = await _gather(env.victim, f"_INBOX.{env.victim_key}.probe")
    assert env.to_victim_inbox is not None
    await _repeat(env.to_victim_inbox, lambda: bool(control))
    assert control, "nothing arrived in the victim's inbox (the test proves nothing)"
    return bool(spied)


async def read_worker_direct_subject(env: Env) -> bool:
    spied = await _gather(env.attacker, f"mesh.peer.{env.worker_key}.>")

    async def send() -> None:
        await env.victim.publish(f"mesh.peer.{env.worker_key}.cmd.roles.probe", b"probe")

    await _repeat(send, lambda: bool(spied))
    return bool(spied)


async def write_victim_inbox(env: Env) -> bool:
    got = await _gather(env.victim, f"_INBOX.{env.victim_key}.>")

    async def send() -> None:
        await env.attacker.publish(f"_INBOX.{env.victim_key}.forged", b"a forged reply")

    await _repeat(send, lambda: bool(got))
    return bool(got)


async def _victim_job_state(env: Env) -> str:
    """The victim writes a job state in its own namespace of the jobs bucket; returns the key."""
    key = f"{env.victim_key}.roles{secrets.token_hex(8)}"
    await env.victim.request(f"$JS.hub.API.$KV.jobs.{key}", b"a job state", timeout=2)
    return key


async def _got_message(env: Env, subject: str, body: bytes = b"") -> bool:
    """True when a direct get answered with a stored message (the attack read something)."""
    try:
        msg = await env.attacker.request(subject, body, timeout=1.0)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    return bool(msg.headers and msg.headers.get("Nats-Sequence"))


def list_stream(stream: str, subject: str) -> Callable[[Env], Awaitable[bool]]:
    """List a stream with a consumer of one's own (every job's state; the dead letters, arguments and all)."""

    async def attack(env: Env) -> bool:
        await _victim_job_state(env)
        config = {"ack_policy": "none", "deliver_policy": "last_per_subject", "filter_subject": subject,
                  "inactive_threshold": 5_000_000_000}  # fmt: skip
        body = json.dumps({"stream_name": stream, "config": config}).encode()
        return await _request(env, f"$JS.hub.API.CONSUMER.CREATE.{stream}", body)

    return attack


async def get_victim_state(env: Env) -> bool:
    key = await _victim_job_state(env)
    return await _got_message(env, f"$JS.hub.API.DIRECT.GET.KV_jobs.$KV.jobs.{key}")


async def get_newest_state_by_wildcard(env: Env) -> bool:
    await _victim_job_state(env)
    return await _got_message(env, "$JS.hub.API.DIRECT.GET.KV_jobs.$KV.jobs.>")


async def get_states_by_sequence(env: Env) -> bool:
    await _victim_job_state(env)
    return await _got_message(env, "$JS.hub.API.DIRECT.GET.KV_jobs", b'{"next_by_subj": "$KV.jobs.>", "seq": 1}')


async def msg_get_victim_state(env: Env) -> bool:
    key = await _victim_job_state(env)
    body = json.dumps({"last_by_subj": f"$KV.jobs.{key}"}).encode()
    return await _request(env, "$JS.hub.API.STREAM.MSG.GET.KV_jobs", body)


async def list_state_keys_by_stream_info(env: Env) -> bool:
    await _victim_job_state(env)
    return await _request(env, "$JS.hub.API.STREAM.INFO.KV_jobs", b'{"subjects_filter": ">"}')


PUBLISH, SUBSCRIBE = "for publish to", "for subscription to"
ATTACKS: dict[str, tuple[Callable[[Env], Awaitable[bool]], str]] = {
    **{f"delete {name}": (delete_stream(name), PUBLISH) for name in STREAMS},
    "delete JOBS ($JS.API)": (delete_stream("JOBS", "$JS.API"), PUBLISH),
    "purge JOBS": (purge_jobs, PUBLISH),
    "delete the worker's durable consumer": (delete_worker_consumer, PUBLISH),
    "update the JOBS stream": (update_jobs_stream, PUBLISH),
    "write $KV.reputation": (kv_write("reputation", ""), PUBLISH),
    "write $JS.hub.API.$KV.reputation": (kv_write("reputation", "$JS.hub.API."), PUBLISH),
    "write $KV.quarantine": (kv_write("quarantine", ""), PUBLISH),
    "write $JS.hub.API.$KV.quarantine": (kv_write("quarantine", "$JS.hub.API."), PUBLISH),
    "subscribe mesh.cmd.> outside a queue group": (spy_on_commands(""), SUBSCRIBE),
    "subscribe mesh.cmd.> in a foreign queue group": (spy_on_commands("spies"), SUBSCRIBE),
    "subscribe to another peer's inbox": (read_victim_inbox, SUBSCRIBE),
    "subscribe to another peer's direct subject": (read_worker_direct_subject, SUBSCRIBE),
    "publish into another peer's inbox": (write_victim_inbox, PUBLISH),
    "list every job's state": (list_stream("KV_jobs", "$KV.jobs.>"), PUBLISH),
    "list the dead-letter queue": (list_stream("JOBS_DLQ", "mesh.dlq.>"), PUBLISH),
    "read another submitter's job state by its key": (get_victim_state, PUBLISH),
    "read the newest job state with a wildcard": (get_newest_state_by_wildcard, PUBLISH),
    "read job states by sequence": (get_states_by_sequence, PUBLISH),
    "read a job state with STREAM.MSG.GET": (msg_get_victim_state, PUBLISH),
    "list job state keys with stream info": (list_state_keys_by_stream_info, PUBLISH),
}


async def closed_env(mesh: Closed, where: str) -> Env:
    errors: list[str] = []
    attacker = await raw_connect(mesh.url(where), mesh.ids["attacker"], errors)
    victim = await raw_connect(mesh.url("hub"), mesh.ids["user"])
    user = mesh.ids["user"].public_key

    async def ping() -> None:  # the worker answers discovery into the victim's inbox
        await victim.publish("$SRV.PING", b"", reply=f"_INBOX.{user}.probe")

    return Env(attacker, victim, user, mesh.ids["worker"].public_key, errors, ping)


@pytest.mark.parametrize("where", ["hub", "leaf"])
@pytest.mark.parametrize("name", list(ATTACKS))
async def test_an_ordinary_peer_cannot(closed: Closed, name: str, where: str) -> None:
    attack, violation = ATTACKS[name]
    env = await closed_env(closed, where)
    try:
        assert not await attack(env), f"{name} worked from the {where}"
        await asyncio.sleep(0.05)  # the server's -ERR is asynchronous
        assert any(f"permissions violation {violation}" in e for e in env.errors), env.errors
    finally:
        await env.close()


# -- the same attacks against an open broker (each case can fail) --------------------


@pytest.fixture(scope="module")
def open_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = embedded(tmp_path_factory.mktemp("open")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_the_same_attack_works_on_an_open_broker(open_broker: NatsServer, name: str) -> None:
    attack, _ = ATTACKS[name]
    victim_id, worker_key = Identity.generate(), Identity.generate().public_key
    setup = await raw_connect(open_broker.url, None)
    try:
        await provision(setup, MESH_STATE)  # again: an earlier case may have deleted some
        js = setup.jetstream(domain="hub")
        await js.add_consumer(
            "JOBS", durable_name=DURABLE, filter_subject="mesh.jobs.demo.add", ack_policy=AckPolicy.EXPLICIT
        )
    finally:
        await setup.close()
    attacker, victim = await raw_connect(open_broker.url, None), await raw_connect(open_broker.url, None)
    victim_key = victim_id.public_key

    async def to_inbox() -> None:
        await victim.publish(f"_INBOX.{victim_key}.probe", b"a reply")

    env = Env(attacker, victim, victim_key, worker_key, to_victim_inbox=to_inbox)
    try:
        assert await attack(env), f"{name} did not work even on an open broker"
    finally:
        await env.close()


# -- what each role may do, and the mesh still serving ----------------------------------


async def test_the_attacker_can_read_mesh_state_from_both_places(closed: Closed) -> None:
    """Positive control for the leaf: the attacker's refusals are permissions, not a broken link."""
    for where in ("hub", "leaf"):
        nc = await connect(closed.url(where), closed.ids["attacker"])
        try:
            js = nc.jetstream(domain="hub", timeout=2)
            assert (await js.stream_info("JOBS")).config.name == "JOBS"
            kv = await open_bucket(nc, "reputation", create=False)
            await kv.get(closed.ids["worker"].public_key)  # a KV read through the domain
        finally:
            await nc.close()


async def test_a_plain_peer_is_refused_at_once_where_it_may_not_write(closed: Closed) -> None:
    nc = await connect(closed.url("leaf"), closed.ids["attacker"])
    try:
        started = time.monotonic()
        with pytest.raises(Rejected) as refused:
            await provision(nc, [StreamSpec("ROGUE", ("rogue.>",))])
        assert refused.value.reason == Reason.DENIED and "operator" in str(refused.value)
        for bucket in ("reputation", "quarantine"):
            kv = await open_bucket(nc, bucket, create=False)
            with pytest.raises(Rejected) as refused:
                await kv.put(closed.ids["worker"].public_key, b"forged")
            assert refused.value.reason == Reason.DENIED
        assert time.monotonic() - started < 15  # not 30 s of retries per write
        await Durable.open(nc)  # opening what the operator provisioned needs no create right
    finally:
        await nc.close()


async def test_the_operator_provisions_and_issues_quarantine_orders(closed: Closed) -> None:
    op, attacker = closed.ids["op"], closed.ids["attacker"].public_key
    nc = await connect(closed.url("hub"), op)
    try:
        scratch: list[StateSpec] = [BucketSpec("roles_scratch"), StreamSpec("ROLES_SCRATCH", ("scratch.>",))]
        created = await provision(nc, scratch, replicas=1)
        assert created == ["roles_scratch", "ROLES_SCRATCH"]
        js = nc.jetstream(domain="hub", timeout=2)
        assert await js.delete_stream("ROLES_SCRATCH") and await js.delete_stream("KV_roles_scratch")
        order = await issue_order(nc, op, attacker, "quarantine", "attacked the mesh")
        assert order.action == "quarantine"
        await issue_order(nc, op, attacker, "release", "test over")
    finally:
        await nc.close()


async def test_only_the_trust_service_writes_reputation(closed: Closed) -> None:
    worker = closed.ids["worker"].public_key
    nc = await connect(closed.url("hub"), closed.ids["trust"])
    try:
        kv = await open_bucket(nc, "reputation", create=False)
        revision = await kv.put(f"{worker}-roles-test", b'{"version": 1}')
        assert revision > 0
        await kv.delete(f"{worker}-roles-test")
        quarantine = await open_bucket(nc, "quarantine", create=False)
        with pytest.raises(Rejected):
            await quarantine.put(worker, b"forged")
    finally:
        await nc.close()


async def test_the_mesh_still_serves_after_the_attacks(closed: Closed) -> None:
    """Runs after the attack cases (file order): state intact, a live and a durable job answered."""
    op = await connect(closed.url("hub"), closed.ids["op"])
    try:
        js = op.jetstream(domain="hub", timeout=2)
        for name in STREAMS:
            await js.stream_info(name)
        info = await js.consumer_info("JOBS", DURABLE)
        assert info.config.filter_subject == "mesh.jobs.demo.add"
        assert (await js.stream_info("JOBS")).config.max_msgs != 3
    finally:
        await op.close()
    # The user on the hub, the worker on the leaf: both paths cross the leaf link.
    async with await Client.connect(closed.url("hub"), closed.ids["user"]) as client:
        outcome = await client.submit("demo.add", {"a": 20, "b": 22}, timeout=20)
        assert outcome.value == 42 and outcome.worker == closed.ids["worker"].public_key
        durable = await Durable.open(client.nc)
        job_id = await durable.submit(closed.ids["user"], "demo.add", {"a": 1, "b": 2})
        result, _ = await durable.wait(job_id, 30)
        assert result.value == 3


# -- durable jobs: forged results, squatted keys and message ids --------------------------


@pytest.mark.parametrize("where", ["hub", "leaf"])
async def test_a_result_signed_by_another_key_is_never_accepted(closed: Closed, where: str) -> None:
    """Attack (a): a result for the victim's job id and request digest, signed by the attacker's key."""
    user, attacker = closed.ids["user"], closed.ids["attacker"]
    async with await Client.connect(closed.url("hub"), user) as client:
        durable = await Durable.open(client.nc)
        job = await durable.submit(user, "roles.idle", {"n": 1})  # nobody serves it: it stays queued
        entry = durable.journal.get(job)
        assert entry is not None
        keys = JobKeys(entry.frame)
        forged = seal_result(attacker, request_digest=keys.digest, job_id=job, status="ok", value=666)
        # The attack matters: the forgery verifies and names the job and its digest, all the old check compared.
        opened = open_result(forged)
        assert (opened.job_id, opened.request_digest, opened.value) == (job, keys.digest, 666)
        errors: list[str] = []
        spy = await raw_connect(closed.url(where), attacker, errors)
        nc = await connect(closed.url(where), attacker)
        try:
            # The digest was read from the world-readable state: now even its exact key is refused.
            with pytest.raises(nats.errors.TimeoutError):
                await spy.request(f"$JS.hub.API.DIRECT.GET.KV_jobs.$KV.jobs.{user.public_key}.{job}", b"", timeout=1)
            await asyncio.sleep(0.05)
            assert any("permissions violation for publish to" in e for e in errors), errors
            theirs = await Durable.open(nc)
            for key in (job, keys.digest, f"{job}.{keys.digest}"):  # every key it can name from job id and digest
                assert await theirs.results.create(key, forged)
            # Even handed the frame (so the real key and seal), a result from a key holding no claim is ignored.
            assert await theirs.results.create(keys.result_key, keys.seal(forged))
        finally:
            await nc.close()
            await spy.close()
        assert await durable.result(job, wait=1.0) is None  # ignored, not an outcome
        with pytest.raises(JobTimeout):
            await durable.wait(job, 0.5)


@pytest.mark.parametrize("where", ["hub", "leaf"])
async def test_junk_and_a_squatted_message_id_under_a_known_job_id_do_nothing(closed: Closed, where: str) -> None:
    """Attacks (b) and (c): the victim's job id is known in advance; junk results, claims and a message id await it."""
    user, attacker = closed.ids["user"], closed.ids["attacker"]
    job = f"order-{secrets.token_hex(6)}"  # chosen by the victim, learned (or guessed) by the attacker
    nc = await connect(closed.url(where), attacker)
    try:
        theirs = await Durable.open(nc)
        junk = seal_result(attacker, request_digest="0" * 64, job_id=job, status="ok", value="junk")
        assert await theirs.results.create(job, junk)
        assert await theirs.claims.create(f"{job}.1", b"junk")
        # (b) mattered: workers acknowledged unrun any job whose id had something stored under it.
        assert await theirs.results.get(job) == junk
        js = nc.jetstream(domain="hub", timeout=5)
        await js.publish("mesh.jobs.demo.add", b"squatting", headers={"Nats-Msg-Id": job})
        # (c) mattered: a message with that id is now dropped as a duplicate, as the victim's was.
        again = await js.publish("mesh.jobs.demo.add", b"squatting", headers={"Nats-Msg-Id": job})
        assert again.duplicate
    finally:
        await nc.close()
    async with await Client.connect(closed.url("hub"), user) as client:
        durable = await Durable.open(client.nc)
        assert await durable.submit(user, "demo.add", {"a": 40, "b": 2}, job_id=job) == job
        result, _ = await durable.wait(job, 30)
        assert result.value == 42 and result.worker == closed.ids["worker"].public_key
        state = await durable.state(job)
        assert state is not None and state.state == "done" and state.writer == closed.ids["worker"].public_key


async def test_the_submitter_lists_only_its_own_jobs_and_operators_all(closed: Closed) -> None:
    user, op = closed.ids["user"], closed.ids["op"]
    async with await Client.connect(closed.url("hub"), user) as client:
        durable = await Durable.open(client.nc)
        job = await durable.submit(user, "demo.add", {"a": 1, "b": 1})
        await durable.wait(job, 30)
        assert job in [s.job_id for s in await durable.list_states()]
        with pytest.raises(Rejected) as refused:
            await durable.list_states(everyone=True)
        assert refused.value.reason == Reason.DENIED
        with pytest.raises(Rejected):
            await durable.dead_letters()
    nc = await connect(closed.url("hub"), op)
    try:
        everyone = await (await Durable.open(nc)).list_states(limit=10_000, everyone=True)
        mine = [s for s in everyone if s.job_id == job]
        assert mine and mine[0].state == "done" and mine[0].submitter == user.public_key
    finally:
        await nc.close()


async def test_known_limit_a_queue_group_named_under_mesh_cmd_still_gets_copies(closed: Closed) -> None:
    """NATS cannot require the queue group to equal the subject (README, Roles): pinned so the docs stay true."""
    env = await closed_env(closed, "hub")
    try:
        copies = await _gather(env.attacker, "mesh.cmd.>", "mesh.cmd.copies")

        async def send() -> None:
            await env.victim.publish("mesh.cmd.roles.probe", b"probe")

        await _repeat(send, lambda: bool(copies))
        assert copies and not env.errors
    finally:
        await env.close()


def test_meshjobs_up_closed_admits_only_its_keys(tmp_path: Path) -> None:
    """`meshjobs up --closed --admit KEY`: the local identity is operator, KEY a peer, nobody else gets in."""
    home, peer = tmp_path / "home", Identity.generate()
    local = Identity.generate()
    save_identity(local, home / IDENTITY_FILE)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "up", "--closed", "--admit", peer.public_key,
             "--port", "0", "--monitor-port", "0", "--store", str(tmp_path / "store")],
            env=cli_env(home), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "ready at" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        line = log.read_text()
        assert "closed: admits" in line and "mesh state ready" in line, line
        url = line.split("ready at ", 1)[1].split()[0]

        async def check() -> None:
            with pytest.raises(ConnectError, match="refused"):
                await connect(url, Identity.generate())
            nc = await connect(url, peer)
            try:
                js = nc.jetstream(domain="hub", timeout=1)
                for spec in MESH_STATE:  # provisioned by `up` with the local identity
                    name = spec.name if isinstance(spec, StreamSpec) else f"KV_{spec.name}"
                    if name == "KV_jobs":  # its stream info would list every job: operators only
                        with pytest.raises(nats.errors.TimeoutError):
                            await js.stream_info(name)
                        continue
                    await js.stream_info(name)
                with pytest.raises(nats.errors.TimeoutError):
                    await js.delete_stream("JOBS")
            finally:
                await nc.close()

        asyncio.run(check())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "meshjobs broker stopped" in log.read_text()


# -- rendering ------------------------------------------------------------------------


def test_role_lists_name_every_stream_and_bucket_of_mesh_state() -> None:
    """natsconf repeats the names catalog declares (infra imports no job module): they must agree."""
    declared = {s.name for s in MESH_STATE}
    assert declared == set(natsconf.BUCKETS) | set(natsconf.STREAMS)


def test_every_rendered_config_of_a_populated_topology_is_valid(tmp_path: Path) -> None:
    ids = {name: Identity.generate() for name in POOL}
    data = closed_topology(ids).model_dump()
    data["mesh"]["workers"] = [Identity.generate().public_key]
    data["community"][0]["submitters"] = [Identity.generate().public_key]
    topology = Topology.model_validate(data)
    ensure_credentials(topology, tmp_path)
    for name in topology.server_names():
        path = tmp_path / f"{name}.conf"
        path.write_text(natsconf.node_config(topology, name, tmp_path / "data"))
        check = subprocess.run([find_nats_server(), "-t", "-c", path], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    closed_broker = embedded(
        tmp_path / "embedded", admitted=closed_roles(ids["op"].public_key, [ids["user"].public_key])
    )
    closed_broker.workdir.mkdir(parents=True, exist_ok=True)
    closed_broker.config_path.write_text(closed_broker.config_text)
    check = subprocess.run([find_nats_server(), "-t", "-c", closed_broker.config_path], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_peer_grants_never_include_jetstream_administration() -> None:
    key = Identity.generate().public_key
    for roles in ({"worker"}, {"submitter"}, {"worker", "submitter"}, {"trust_service"}):
        perms = natsconf.role_permissions(roles, key, "hub")
        allowed = perms["publish"]["allow"]
        for wide in ("$JS.API.>", "$JS.hub.API.>", "$KV.>", "_INBOX.>", ">"):
            assert wide not in allowed, (roles, wide)
        for verb in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "CONSUMER.DELETE"):
            assert not any(verb in s for s in allowed), (roles, verb)
        assert "$KV.quarantine.>" in perms["publish"]["deny"]
        assert "mesh.cmd.>" not in perms["subscribe"]["allow"]  # only ever in a queue group
    worker = natsconf.role_permissions({"worker"}, key, "hub")
    assert "mesh.cmd.> mesh.cmd.>" in worker["subscribe"]["allow"]
    assert worker["allow_responses"] == {"max": 610, "expires": "10m"}
