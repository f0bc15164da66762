"""`meshjobs doctor` against a real broker and a real worker: all pass; each kind of breakage fails and says what."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from meshjobs._nats import connect
from meshjobs.catalog import MESH_STATE
from meshjobs.discovery import Endpoint, ServiceResponder
from meshjobs.identity import Identity
from meshjobs.infra.broker import NatsServer, embedded
from meshjobs.manifest import seal_manifest
from meshjobs.state import provision
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs, wait_for_instances

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A broker of its own: the checks see exactly the workers and state these tests make."""
    server = embedded(tmp_path_factory.mktemp("doctor-broker")).start()
    try:
        yield server
    finally:
        server.stop()


def operator_trust(home: Path, identity: Identity) -> None:
    path = home / "trust.toml"
    path.write_text(f'[[operator]]\nkey = "{identity.public_key}"\n')
    path.chmod(0o600)


def doctor(home: Path, url: str, *args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    out = meshjobs("doctor", "--json", *args, env=cli_env(home, url))
    report = json.loads(out.stdout)
    assert report["ok"] == (out.returncode == 0), out.stdout
    return out.returncode, {c["check"]: c for c in report["checks"]}, out.stderr


def test_fresh_broker_fails_on_missing_state_and_trust(own_broker: NatsServer, home: Path) -> None:
    code, checks, _ = doctor(home, own_broker.url)
    assert code == 1
    assert checks["broker"]["status"] == "pass" and checks["jetstream"]["status"] == "pass"
    assert checks["state"]["status"] == "fail" and "JOBS missing" in checks["state"]["problems"]
    assert "missing" in checks["state"]["detail"]
    assert checks["trust"]["status"] == "fail" and "no trust file" in checks["trust"]["detail"]


def test_all_pass_with_a_worker_then_a_stopped_capability_fails(
    own_broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    async def provision_state() -> None:
        nc = await connect(own_broker.url, identity)
        try:
            await provision(nc, MESH_STATE)
        finally:
            await nc.close()

    asyncio.run(provision_state())
    operator_trust(home, identity)
    worker = WorkerProcess.launch("workers.demo:app", home, own_broker.url, tmp_path / "worker.log")
    try:
        asyncio.run(wait_for_instances(own_broker.url, identity, 1, "demo.add"))
        code, checks, _ = doctor(home, own_broker.url, "--capability", "demo.add")
        assert code == 0, checks
        assert {c["status"] for c in checks.values()} <= {"pass", "skip"}
        for name in ("broker", "jetstream", "state", "capability demo.add", "capability demo.sleep", "clocks", "trust"):
            assert checks[name]["status"] == "pass", checks[name]
        assert checks["capability demo.add"]["worker"] == identity.public_key
        assert "'expired' refusal" in checks["capability demo.add"]["detail"]
        assert checks["locality"]["status"] == "skip"  # no topology: nothing to say where this server sits
        plain = meshjobs("doctor", env=cli_env(home, own_broker.url))
        assert plain.returncode == 0 and plain.stdout.splitlines()[-1] == "all checks passed"
        assert "PASS capability demo.add: consumed by" in plain.stdout
    finally:
        assert worker.terminate() == 0
    assert "Traceback" not in worker.output()
    code, checks, _ = doctor(home, own_broker.url, "--capability", "demo.add")
    assert code == 1
    assert checks["capability demo.add"]["status"] == "fail"
    assert "nothing consumes mesh.cmd.demo.add" in checks["capability demo.add"]["detail"]
    plain = meshjobs("doctor", "--capability", "demo.add", env=cli_env(home, own_broker.url))
    assert plain.returncode == 1 and "FAIL capability demo.add: not advertised; nothing consumes" in plain.stdout


def test_a_bad_trust_file_fails_and_is_named(own_broker: NatsServer, home: Path) -> None:
    path = home / "trust.toml"
    path.write_text('[[peer]]\nkey = "not a key"\n')
    path.chmod(0o600)
    code, checks, _ = doctor(home, own_broker.url)
    assert code == 1 and checks["trust"]["status"] == "fail"
    assert str(path) in checks["trust"]["detail"]
    path.write_text(f'[[peer]]\nkey = "{Identity.generate().public_key}"\n')
    code, checks, _ = doctor(home, own_broker.url)
    assert checks["trust"]["status"] == "fail" and "lists no [[operator]]" in checks["trust"]["detail"]


async def test_advertised_but_not_consuming_fails(own_broker: NatsServer, home: Path) -> None:
    """A process that answers discovery but left its queue group (hung, quarantined, half shut down)."""
    key = Identity.generate()  # a real peer's signed manifest: discovery takes nothing less
    ghost = ServiceResponder("ghost1", "0", "a worker that consumes nothing", {"peer": key.public_key, "name": "ghost"})
    offer = {"instance": "ghost1", "kind": "system", "capabilities": [{"name": "doctor.ghost"}]}
    ghost.manifest = lambda: seal_manifest(key, offer).decode()
    subject = "mesh.cmd.doctor.ghost"
    ghost.endpoints.append(Endpoint("doctor_ghost", subject, subject, {"capability": "doctor.ghost"}))
    nc = await nats.connect(own_broker.url)
    await ghost.start(nc)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshjobs", "doctor", "--json",
            env=cli_env(home, own_broker.url), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await ghost.stop()
        await nc.close()
    assert proc.returncode == 1
    checks = {c["check"]: c for c in json.loads(stdout)["checks"]}
    check = checks["capability doctor.ghost"]
    assert check["status"] == "fail" and check["advertised_by"] == 1
    assert "advertised by 1 worker process(es) but nothing consumes mesh.cmd.doctor.ghost" in check["detail"]


def test_no_broker_fails_in_one_line_per_check(home: Path) -> None:
    code, checks, stderr = doctor(home, "nats://127.0.0.1:1")
    assert code == 1 and "Traceback" not in stderr
    assert checks["broker"]["status"] == "fail" and "cannot connect" in checks["broker"]["detail"]
    assert checks["jetstream"]["status"] == "skip"
