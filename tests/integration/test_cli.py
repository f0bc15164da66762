"""The CLI as users run it: real processes, real nats-server, documented exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshjobs.identity import IDENTITY_FILE, Identity, load_identity
from meshjobs.infra.broker import NatsServer
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs, wait_for_instances

pytestmark = pytest.mark.integration


@pytest.fixture
def demo_worker(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, identity: Identity
) -> Iterator[WorkerProcess]:
    worker = start_worker()
    import asyncio

    asyncio.run(wait_for_instances(broker.url, identity, 1, "demo.add"))
    yield worker


def test_readme_walkthrough(tmp_path: Path) -> None:
    """Terminal 1: meshjobs up; terminal 2: meshjobs worker; terminal 3: meshjobs submit → 5."""
    home = tmp_path / "home"
    env = cli_env(home)
    with open(os.devnull, "rb") as devnull:
        up = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "up", "--port", "0", "--monitor-port", "0",
             "--store", str(tmp_path / "store")],
            env=env, cwd=REPO, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    worker = None
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        match = re.search(r"ready at (nats://\S+)", line)
        assert match, line
        url = match.group(1)
        env["MESHJOBS_SERVER"] = url
        with open(os.devnull, "rb") as devnull:
            worker = subprocess.Popen(
                [sys.executable, "-m", "meshjobs", "worker", "workers.demo:app"],
                env=env, cwd=REPO, stdin=devnull, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            out = meshjobs("submit", "demo.add", '{"a": 2, "b": 3}', env=env)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "5\n"
        peers = meshjobs("peers", "--json", env=env)
        assert peers.returncode == 0
        listed = json.loads(peers.stdout)
        assert listed[0]["peer"] == load_identity(home / IDENTITY_FILE).public_key
        assert "demo.add" in listed[0]["capabilities"]
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0
        up.send_signal(signal.SIGINT)
        assert up.wait(20) == 0
    assert up.stdout.read().strip().endswith("meshjobs broker stopped")


def test_exit_codes(demo_worker: WorkerProcess, broker: NatsServer, home: Path) -> None:
    env = cli_env(home, broker.url)
    started = time.monotonic()
    nobody = meshjobs("submit", "nobody.offers-this", "{}", "--timeout", "30", env=env)
    assert nobody.returncode == 3, nobody.stderr
    assert time.monotonic() - started < 10
    assert "no capable peer" in nobody.stderr

    failed = meshjobs("submit", "demo.fail", '{"message": "disk on fire"}', env=env)
    assert failed.returncode == 1
    assert "RuntimeError: disk on fire" in failed.stderr
    assert "Traceback" not in failed.stderr

    timed_out = meshjobs("submit", "demo.sleep", '{"seconds": 5}', "--timeout", "1", env=env)
    assert timed_out.returncode == 4, timed_out.stderr

    for bad in ['{"a": 1', "[1, 2]", '{"a": NaN}', '{"a": 1, "a": 2}']:
        out = meshjobs("submit", "demo.add", bad, env=env)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    for cap in ["demo.*", "demo.>", "demo add", "mesh.cmd.x", "Demo.Add"]:
        out = meshjobs("submit", cap, "{}", env=env)
        assert out.returncode == 2, (cap, out.stderr)
        assert "invalid capability" in out.stderr

    invalid = meshjobs("submit", "demo.add", '{"a": "two", "b": 3}', env=env)
    assert invalid.returncode == 2 and "a: Input should be" in invalid.stderr

    stranger = cli_env(home.parent / "stranger", broker.url)
    rejected = meshjobs("submit", "demo.add", '{"a": 1, "b": 2}', env=stranger)
    assert rejected.returncode == 5
    assert "[untrusted]" in rejected.stderr


def test_json_record_is_verifiable(demo_worker: WorkerProcess, broker: NatsServer, home: Path) -> None:
    from meshjobs.envelope import digest, open_envelope, open_result

    out = meshjobs("submit", "demo.echo", '{"k": "v"}', "--json", env=cli_env(home, broker.url))
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["value"] == {"k": "v"} and record["status"] == "ok"
    result = open_result(record["signed_result"].encode())
    request = open_envelope(record["signed_request"].encode())
    assert result.request_digest == digest(record["signed_request"].encode())
    assert request.job_id == result.job_id == record["job_id"]


def test_trust_file_admits_another_submitter(
    start_worker: Callable[..., WorkerProcess], broker: NatsServer, home: Path, identity: Identity, tmp_path: Path
) -> None:
    friend_home = tmp_path / "friend"
    friend = Identity.generate()
    from meshjobs.identity import save_identity

    save_identity(friend, friend_home / IDENTITY_FILE)
    trust = tmp_path / "trust.toml"
    trust.write_text(f'[[peer]]\nkey = "{friend.public_key}"\nname = "friend"\n')
    start_worker("--trust", str(trust))
    import asyncio

    asyncio.run(wait_for_instances(broker.url, identity, 1, "demo.add"))
    out = meshjobs("submit", "demo.add", '{"a": 40, "b": 2}', env=cli_env(friend_home, broker.url))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "42\n"


def test_keygen_and_id(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "h")
    first = meshjobs("keygen", env=env)
    assert first.returncode == 0
    key = first.stdout.strip()
    assert key.startswith("U") and len(key) == 56
    again = meshjobs("keygen", env=env)
    assert again.returncode == 2 and "--force" in again.stderr
    assert meshjobs("id", env=env).stdout.strip() == key
    assert json.loads(meshjobs("id", "--json", env=env).stdout)["peer"] == key
    seed = (tmp_path / "h" / IDENTITY_FILE).read_text().strip()
    for out in (first, again):
        assert seed not in out.stdout + out.stderr
    os.chmod(tmp_path / "h" / IDENTITY_FILE, 0o640)
    loose = meshjobs("id", env=env)
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    forced = meshjobs("keygen", "--force", env=env)
    assert forced.returncode == 0 and forced.stdout.strip() != key


def test_worker_bad_app_spec_is_one_line(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "h", "nats://127.0.0.1:1")
    for spec, message in [
        ("nope", "MODULE:ATTR"),
        ("no.such.module:app", "cannot import"),
        ("workers.demo:add", "not a meshjobs App"),
    ]:
        out = meshjobs("worker", spec, env=env)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_unreachable_broker(tmp_path: Path) -> None:
    out = meshjobs("submit", "demo.add", "{}", env=cli_env(tmp_path / "h", "nats://127.0.0.1:1"))
    assert out.returncode == 3
    assert "cannot connect" in out.stderr and "Traceback" not in out.stderr


def _demo_pids(stdout: str) -> list[int]:
    """Every process the demo said it started (the broker and its peers)."""
    return [int(pid) for pid in re.findall(r"\bpid (\d+)", stdout)]


def _alive(pid: int) -> bool:
    """Whether *pid* is still a process the demo started (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and (b"meshjobs" in cmdline or b"nats-server" in cmdline)


def test_meshjobs_demo(tmp_path: Path) -> None:
    out = meshjobs("demo", env=cli_env(tmp_path / "h", COLUMNS="200"), timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert re.search(r"demo\.add\s+│ \{\"a\": 2, \"b\": 3\}\s+│ 0\s+│ 5 ", text), text
    assert "[untrusted]" in text
    identity = re.search(r"^identity\s+(U[A-Z2-7]{55})$", text, re.MULTILINE)
    assert identity, text
    me = identity.group(1)
    # Discovery shows a peer of each kind the demo starts: system (two workers) and ai (the persona).
    assert re.search(r"architecture-review\s+ai\S*\s+local\S*\s+review\.architecture", text), text
    assert re.search(r"payments\s+system\S*\s+local\S*\s+payments\.send", text), text
    # (a) the AI persona's signed result, with what it rests on: model, prompt digest, token usage.
    assert re.search(r"^stand-in\s+http://127\.0\.0\.1:\d+/v1 ", text, re.MULTILINE), text
    assert "AI persona: review.architecture (routed by capability name), a signed result" in text
    assert re.search(rf"worker\s+{me} \(kind ai\)", text), text
    assert re.search(r"model\s+standin\s*$", text, re.MULTILINE), text
    assert re.search(r"prompt sha256\s+[0-9a-f]{64} \(matches the messages the model server received\)", text), text
    usage = re.search(r"usage\s+(\d+) prompt \+ (\d+) completion = (\d+) tokens", text)
    assert usage, text
    prompt, completion, total = map(int, usage.groups())
    assert prompt > 0 and completion > 0 and total == prompt + completion
    assert re.search(r"output\s+\{\"summary\": \"summary \(standin [0-9a-f]{8}\)\", \"verdict\": \"sound\"", text), text
    assert re.search(r"signed\s+MJ1R U", text), text
    # (b) the gated job waits, is approved with the demo's own (operator) key, and its result carries that.
    waiting = text.index("waiting approval: `meshjobs approvals` lists job")
    approved = text.index(f"approved by {me} (this identity, an operator in the worker's trust file)")
    assert waiting < approved
    assert "may decide: this identity); the handler has not run" in text[waiting:approved]
    assert re.search(r"result\s+\"sent 500 cents to bob\"", text[approved:]), text
    assert f'approve by {me} (this identity), reason "demo: the operator approves"' in text[approved:]
    assert f"state approved, decided by {me}" in text[approved:]
    assert "workers drained, stand-in and broker stopped" in text
    pids = _demo_pids(text)
    assert len(pids) == 4  # broker, demo worker, gated worker, persona
    assert not [pid for pid in pids if _alive(pid)]


def test_meshjobs_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C while the gated job waits for approval: the demo still stops what it started."""
    with open(os.devnull, "rb") as devnull:
        demo = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "demo"],
            env=cli_env(tmp_path / "h", COLUMNS="200"), cwd=REPO, stdin=devnull,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    try:
        assert demo.stdout is not None
        seen = ""
        for line in demo.stdout:
            seen += line
            if "submitted; the worker needs an operator's signed approval first" in line:
                break
        pids = _demo_pids(seen)
        assert len(pids) == 4, seen
        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, seen + rest + err
    assert "interrupted" in err and "Traceback" not in err
    assert not [pid for pid in pids if _alive(pid)]
