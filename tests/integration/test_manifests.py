"""Signed discovery manifests and attested kinds and regions, on a real broker.

Discovery entries are manifests signed by the peer's key: a forged,
replayed or stale answer is not a peer (on the open broker, and on a closed
mesh from its hub and its leaf, where the forger is an admitted peer). Kind
and region count for routing only where an operator of the submitter's trust
policy attested them: ``region`` is a residency guarantee (fallbacks and
verification included; a forged attestation buys none), ``prefer_region``
keeps work local and falls back elsewhere, ``max_price`` filters on the
signed price, and escalation walks attested kinds only.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from meshjobs import (
    App,
    Client,
    Constraints,
    HandlerError,
    NoPeerError,
    SubmitOptions,
    Submitter,
    TrustPolicy,
    Worker,
    WorkerConfig,
)
from meshjobs.discovery import SERVICE_NAME
from meshjobs.envelope import MANIFEST_MAGIC, now_ms, seal_statement
from meshjobs.identity import IDENTITY_FILE, Identity, load_identity, save_identity
from meshjobs.infra.broker import NatsServer
from meshjobs.manifest import Manifest, attest, open_attestation, seal_manifest
from meshjobs.trust.policy import TRUST_FILE
from tests.closed_mesh import Site, refused
from tests.conftest import cli_env, meshjobs

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    url: str
    cap: str
    submitter: Identity
    operator: Identity
    workers: dict[str, Worker]
    runs: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)

    def policy(self) -> TrustPolicy:
        return TrustPolicy(operators=frozenset({self.operator.public_key}))

    def name_of(self, peer: str) -> str:
        return next(name for name, w in self.workers.items() if w.peer == peer)


#: name -> (kind, claimed region, what the operator attests, price)
PEERS = {
    "eu1": ("system", "eu", {"kind": "system", "region": "eu"}, 0.0),
    "eu2": ("system", "eu", {}, 0.0),  # claims eu; nobody vouches for it
    "us1": ("system", "us", {"kind": "system", "region": "us"}, 2.5),
    "ai": ("ai", "us", {"kind": "ai"}, 0.0),
    "human": ("human", "us", {"kind": "human"}, 0.0),
    "fakehuman": ("human", "us", {}, 0.0),  # says it is a person; no operator says so
}


@pytest.fixture
async def mesh(broker: NatsServer) -> AsyncIterator[Mesh]:
    cap = f"m{secrets.token_hex(4)}.double"
    submitter, operator = Identity.generate(), Identity.generate()
    m = Mesh(broker.url, cap, submitter, operator, {})
    conns = []
    for name, (kind, region, vouched, price) in PEERS.items():
        app = App(name, kind=kind)  # type: ignore[arg-type]

        @app.capability(cap, deterministic=True, idempotent=True)
        async def double(n: int, name: str = name) -> int:
            m.runs.append(name)
            if name in m.failing:
                raise RuntimeError(f"{name} is broken")
            return 2 * n

        identity = Identity.generate()
        attestations = (attest(operator, identity.public_key, **vouched),) if vouched else ()
        config = WorkerConfig(region=region, price=price, attestations=attestations, name=name)
        worker = Worker(app, identity, TrustPolicy(frozenset({submitter.public_key})), config)
        nc = await nats.connect(broker.url)
        await worker.start(nc)
        m.workers[name] = worker
        conns.append(nc)
    try:
        yield m
    finally:
        for worker, nc in zip(m.workers.values(), conns, strict=True):
            if not worker.draining:
                await worker.drain()
            await nc.close()


async def test_discovery_shows_attested_and_claimed_apart(mesh: Mesh) -> None:
    async with await Client.connect(mesh.url, mesh.submitter) as client:
        seen = {
            mesh.name_of(p.peer): p
            for p in await client.peers(timeout=0.5, capability=mesh.cap, operators=mesh.policy().operators)
        }
        assert set(seen) == set(PEERS)
        assert seen["eu1"].attested == ("kind", "region") and seen["eu1"].attesters == (mesh.operator.public_key,)
        assert seen["eu2"].attested == () and seen["eu2"].region == "eu"  # shown, as a claim
        assert seen["us1"].price == 2.5 and seen["us1"].slots == 16
        assert seen["fakehuman"].kind == "human" and not seen["fakehuman"].is_attested("kind")
        # To a reader whose policy does not list that operator, everything is a claim.
        assert all(not p.attested for p in await client.peers(timeout=0.5, capability=mesh.cap))


async def forged_answers_are_not_peers(
    nc: NATS,
    url: str,
    victim: Worker,
    rogue: Identity,
    submitter: Identity,
    policy: TrustPolicy,
    cap: str,
    extra: tuple[dict[str, Any], ...] = (),
) -> list[Msg]:
    """A rogue answers discovery as *victim*: without a manifest, with its replayed manifest, with its own.

    *extra* answers are added to the forgeries. Returns the requests the rogue answered.
    """
    real = json.loads((await nc.request(f"$SRV.INFO.{SERVICE_NAME}.{victim.instance_id}", b"", timeout=2)).data)
    # The rogue's own manifest claims the victim's capabilities; the answer names the victim as the peer.
    own = seal_manifest(rogue, {"instance": "fake-3", "kind": "system", "capabilities": [{"name": cap}]})
    forged_manifest = real["metadata"]["manifest"]
    answers = [
        {**real, "id": "fake-1", "metadata": {k: v for k, v in real["metadata"].items() if k != "manifest"}},
        {**real, "id": "fake-2"},  # the victim's own signed manifest, replayed by another instance
        {**real, "id": "fake-3", "metadata": {**real["metadata"], "manifest": own.decode()}},
        {**real, "id": "fake-4", "metadata": {**real["metadata"], "manifest": forged_manifest[:-3] + '"}}'}},
        *extra,
    ]
    answered: list[Msg] = []

    async def answer(msg: Msg) -> None:
        for reply in answers:
            await nc.publish(msg.reply, json.dumps(reply).encode())
        answered.append(msg)

    await nc.subscribe(f"$SRV.INFO.{SERVICE_NAME}", cb=answer)
    await nc.flush()
    async with await Client.connect(url, submitter) as client:
        found = [p for p in await client.peers(timeout=0.5) if p.peer in (victim.peer, rogue.public_key)]
        assert [(p.peer, p.instance) for p in found] == [(victim.peer, victim.instance_id)]
        async with await Submitter.open(client, policy) as routed:
            done = await routed.submit(cap, {"n": 2}, SubmitOptions(peer=victim.peer, timeout=10))
            assert done.outcome.value == 4 and done.outcome.worker == victim.peer
    return answered


async def test_forged_and_replayed_discovery_answers_are_not_peers(mesh: Mesh) -> None:
    """A rogue answers discovery as eu1: without a manifest, with eu1's replayed manifest, with its own."""
    nc = await nats.connect(mesh.url)
    try:
        victim = mesh.workers["eu1"]
        answered = await forged_answers_are_not_peers(
            nc, mesh.url, victim, Identity.generate(), mesh.submitter, mesh.policy(), mesh.cap
        )
        assert answered
    finally:
        await nc.close()


# -- the same on a closed mesh, from its hub and its leaf ---------------------------------


@dataclass
class Closed:
    """Workers on the closed mesh (tests/closed_mesh.py) for one test; drained and closed at teardown."""

    site: Site
    cap: str = field(default_factory=lambda: f"m{secrets.token_hex(4)}.double")
    runs: dict[str, list[int]] = field(default_factory=dict)
    started: list[tuple[Worker, NATS]] = field(default_factory=list)

    def policy(self) -> TrustPolicy:
        return TrustPolicy(operators=frozenset({self.site.ids["op"].public_key}))

    async def worker(self, name: str, url: str, attested: dict[str, str] | None = None) -> Worker:
        """Pool identity *name* serving the capability, claiming region eu; attested by the operator if told."""
        app = App(name, kind="system")
        runs = self.runs.setdefault(name, [])

        @app.capability(self.cap, deterministic=True, idempotent=True)
        async def double(n: int) -> int:
            runs.append(n)
            return 2 * n

        identity, op = self.site.ids[name], self.site.ids["op"]
        attestations = (attest(op, identity.public_key, **attested),) if attested else ()
        config = WorkerConfig(region="eu", attestations=attestations, name=name, durable=False)
        worker = Worker(app, identity, TrustPolicy(frozenset({self.site.ids["sub"].public_key})), config)
        nc = await self.site.connect(name, url)
        await worker.start(nc)
        self.started.append((worker, nc))
        return worker

    async def seen(self, *workers: Worker, timeout: float = 10.0) -> None:
        """Until the submitter discovers *workers* (interest crosses the leaf link)."""
        async with await Client.connect(self.site.url, self.site.ids["sub"]) as client:
            deadline = time.monotonic() + timeout
            while {p.peer for p in await client.peers(timeout=0.3, capability=self.cap)} < {w.peer for w in workers}:
                assert time.monotonic() < deadline, "the workers never appeared"


@pytest.fixture
async def closed(site: Site) -> AsyncIterator[Closed]:
    mesh = Closed(site)
    try:
        yield mesh
    finally:
        for worker, nc in mesh.started:
            if not worker.draining:
                await worker.drain()
            await nc.close()


@pytest.mark.parametrize("where", ["hub", "leaf"])
async def test_forged_replayed_and_stale_discovery_answers_are_not_peers_on_a_closed_mesh(closed: Closed) -> None:
    """The admitted attacker forges discovery answers for a worker across the leaf link, and replays a stale one."""
    site = closed.site
    victim = await closed.worker("w1", site.other, {"kind": "system", "region": "eu"})
    await closed.seen(victim)
    # A manifest the victim signed eleven minutes ago, for an instance that has gone since.
    old = Manifest(
        peer=victim.peer, instance="old-1", kind="system", capabilities=[{"name": closed.cap}],
        issued_at=now_ms() - 11 * 60_000,
    )  # fmt: skip
    stale = seal_statement(MANIFEST_MAGIC, site.ids["w1"], old).decode()
    errors: list[str] = []
    nc = await site.raw("attacker", errors)
    try:
        real = json.loads((await nc.request(f"$SRV.INFO.{SERVICE_NAME}.{victim.instance_id}", b"", timeout=2)).data)
        replayed = {**real, "id": "old-1", "metadata": {**real["metadata"], "manifest": stale}}
        answered = await forged_answers_are_not_peers(
            nc, site.url, victim, site.ids["attacker"], site.ids["sub"], closed.policy(), closed.cap, (replayed,)
        )
        # The broker let the rogue answer (so the forgeries reached the submitter): they failed on their own.
        assert answered and not refused(errors), errors
    finally:
        await nc.close()
    assert closed.runs["w1"] == [2]


#: How the attacker's worker backs its claim to region eu.
FORGED_ATTESTATIONS = {
    "an operator's attestation of another peer, copied": lambda site: attest(
        site.ids["op"], site.ids["w1"].public_key, kind="system", region="eu"
    ),
    "an attestation the attacker signed itself": lambda site: attest(
        site.ids["attacker"], site.ids["attacker"].public_key, kind="system", region="eu"
    ),
}


@pytest.mark.parametrize("where", ["hub", "leaf"])
@pytest.mark.parametrize("how", list(FORGED_ATTESTATIONS))
async def test_a_forged_attestation_buys_no_residency_on_a_closed_mesh(closed: Closed, how: str) -> None:
    """The attacker runs a real worker claiming eu, its manifest carrying a forged attestation.

    It trusts the submitter and would run the job: only the attestation check
    keeps a ``region="eu"`` job (a residency guarantee) away from it.
    """
    site = closed.site
    victim = await closed.worker("w1", site.other, {"kind": "system", "region": "eu"})
    rogue = await closed.worker("attacker", site.url)
    rogue._attestations = (FORGED_ATTESTATIONS[how](site).decode(),)  # as a modified worker would carry it
    await closed.seen(victim, rogue)
    eu = SubmitOptions(constraints=Constraints(region="eu"), verify="off", timeout=10)
    async with await Client.connect(site.url, site.ids["sub"]) as client:
        seen = {
            p.peer: p
            for p in await client.peers(timeout=0.5, capability=closed.cap, operators=closed.policy().operators)
        }
        assert seen[rogue.peer].region == "eu" and not seen[rogue.peer].is_attested("region")  # a claim only
        assert seen[victim.peer].is_attested("region")
        async with await Submitter.open(client, closed.policy()) as submitter:
            for n in range(8):
                done = await submitter.submit(closed.cap, {"n": n}, eu)
                assert done.outcome.worker == victim.peer and done.outcome.value == 2 * n
            # Without the constraint the attacker's worker is an ordinary candidate: it could have been chosen.
            anywhere = SubmitOptions(peer=rogue.peer, verify="off", timeout=10)
            assert (await submitter.submit(closed.cap, {"n": 50}, anywhere)).outcome.worker == rogue.peer
    assert closed.runs["attacker"] == [50] and len(closed.runs["w1"]) == 8


async def test_region_is_a_residency_guarantee(mesh: Mesh) -> None:
    eu = Constraints(region="eu")
    async with await Client.connect(mesh.url, mesh.submitter) as client:
        async with await Submitter.open(client, mesh.policy()) as submitter:
            for n in range(6):  # verified (deterministic): checks, too, stay in eu
                done = await submitter.submit(mesh.cap, {"n": n}, SubmitOptions(constraints=eu, timeout=10))
                assert done.outcome.value == 2 * n
            assert set(mesh.runs) == {"eu1"}  # eu2 only claims eu; us1 is attested elsewhere
            mesh.failing.add("eu1")
            mesh.runs.clear()
            with pytest.raises(HandlerError):  # no fallback out of the region
                await submitter.submit(mesh.cap, {"n": 1}, SubmitOptions(constraints=eu, timeout=5))
            assert set(mesh.runs) == {"eu1"}
            with pytest.raises(NoPeerError):
                await submitter.submit(mesh.cap, {"n": 1}, SubmitOptions(constraints=Constraints(region="ap")))


async def test_prefer_region_keeps_work_local_and_falls_back(mesh: Mesh) -> None:
    prefer = SubmitOptions(constraints=Constraints(prefer_region="eu"), verify="off", timeout=10)
    async with await Client.connect(mesh.url, mesh.submitter) as client:
        async with await Submitter.open(client, mesh.policy()) as submitter:
            for n in range(4):
                assert (await submitter.submit(mesh.cap, {"n": n}, prefer)).outcome.value == 2 * n
            assert set(mesh.runs) == {"eu1"}
            await mesh.workers["eu1"].drain()  # the region goes dark: emergency fallback elsewhere
            mesh.runs.clear()
            assert (await submitter.submit(mesh.cap, {"n": 5}, prefer)).outcome.value == 10
            assert mesh.runs and "eu1" not in mesh.runs


async def test_max_price_filters_on_the_signed_price(mesh: Mesh) -> None:
    cheap = SubmitOptions(constraints=Constraints(kind="system", max_price=1.0), verify="off", timeout=10)
    async with await Client.connect(mesh.url, mesh.submitter) as client:
        async with await Submitter.open(client, mesh.policy()) as submitter:
            for n in range(8):
                await submitter.submit(mesh.cap, {"n": n}, cheap)
    assert set(mesh.runs) == {"eu1"}  # us1 asks 2.5; eu2 is not attested as a system


async def test_kind_and_escalation_take_attested_peers_only(mesh: Mesh) -> None:
    async with await Client.connect(mesh.url, mesh.submitter) as client:
        async with await Submitter.open(client, mesh.policy()) as submitter:
            human = SubmitOptions(constraints=Constraints(kind="human"), verify="off", timeout=10)
            for n in range(5):
                assert (await submitter.submit(mesh.cap, {"n": n}, human)).outcome.worker == mesh.workers["human"].peer
            mesh.failing.add("ai")
            mesh.runs.clear()
            escalate = SubmitOptions(escalate=("ai", "hybrid", "human"), verify="off", timeout=10, trace=True)
            done = await submitter.submit(mesh.cap, {"n": 3}, escalate)
            assert done.outcome.value == 6 and done.outcome.worker == mesh.workers["human"].peer
            assert mesh.runs == ["ai", "human"]  # the fake human never gets it
            steps = [(a.peer, a.outcome) for a in done.trace]
            assert steps[:2] == [(mesh.workers["ai"].peer, "failure"), ("kind:ai", "escalated")]
            assert ("kind:hybrid", "escalated") in steps  # nobody attested as hybrid: on to the next kind
        # Without the operator in the submitter's policy, nobody is attested: no human to ask.
        async with await Submitter.open(client, TrustPolicy()) as plain:
            with pytest.raises(NoPeerError):
                await plain.submit(mesh.cap, {"n": 1}, SubmitOptions(constraints=Constraints(kind="human")))


def test_readme_attestation_walkthrough(broker: NatsServer, home: Path, tmp_path: Path, start_worker: Any) -> None:
    """The README's commands: an operator attests a worker; a submitter listing the operator routes by region."""
    operator = load_identity(home / IDENTITY_FILE)
    (home / TRUST_FILE).write_text(f'[[operator]]\nkey = "{operator.public_key}"\n')
    worker_home = tmp_path / "worker-home"
    worker_key = Identity.generate()
    save_identity(worker_key, worker_home / IDENTITY_FILE)
    (worker_home / TRUST_FILE).write_text(f'[[peer]]\nkey = "{operator.public_key}"\n')
    env = cli_env(home, broker.url)
    out = tmp_path / "eu-worker.attestation"
    done = meshjobs("attest", worker_key.public_key, "--kind", "system", "--region", "eu", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert open_attestation(out.read_bytes().strip()).vouches() == {"kind": "system", "region": "eu"}
    again = meshjobs("attest", worker_key.public_key, "--region", "us", "--out", str(out), env=env)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten by mistake
    bad = meshjobs("attest", "UNOTAKEY", "--kind", "human", env=env)
    assert bad.returncode == 2 and "not a peer public key" in bad.stderr and "Traceback" not in bad.stderr

    # An attestation for another key is refused before the worker starts.
    wrong = meshjobs("worker", "workers.demo:app", "--attestation", str(out), env=cli_env(home, broker.url))
    assert wrong.returncode == 2 and "the attestation is for peer" in wrong.stderr

    start_worker("--region", "eu", "--attestation", str(out), worker_home=worker_home)
    start_worker("--region", "eu", worker_home=tmp_path / "claims-only")  # claims eu, unattested
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = meshjobs("peers", "--json", "--capability", "demo.add", env=env)
        rows = {r["peer"]: r for r in json.loads(listed.stdout or "[]")}
        if worker_key.public_key in rows and len(rows) >= 2:
            break
    assert rows[worker_key.public_key]["attested"] == ["kind", "region"]
    assert [r["attested"] for k, r in rows.items() if k != worker_key.public_key] == [[]]
    table = meshjobs("peers", "--capability", "demo.add", env=env).stdout
    assert "eu✓" in table and "attested by an operator" in table
    for _ in range(4):
        ran = meshjobs(
            "submit", "demo.add", '{"a": 2, "b": 3}', "--region", "eu", "--kind", "system", "--json", env=env
        )
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["result"]["worker"] == worker_key.public_key
    # A submitter that lists no operator has no attested peer: nobody qualifies (exit 3).
    stranger = tmp_path / "stranger"
    save_identity(Identity.generate(), stranger / IDENTITY_FILE)
    refused = meshjobs("submit", "demo.add", '{"a": 2, "b": 3}', "--region", "eu", env=cli_env(stranger, broker.url))
    assert refused.returncode == 3, refused.stderr
