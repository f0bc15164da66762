"""Sandboxed execution against a real Docker engine (scripts/ensure-docker starts one).

Every container runs with ``network_mode="none"``: nothing here sends traffic
anywhere but to this machine's loopback. Without an engine these tests are
skipped with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshjobs import App, Client, HandlerError, Identity, TrustPolicy, UsageError, Worker, WorkerConfig
from meshjobs.peers.sandbox import (
    DEFAULT_IMAGE,
    LABEL,
    ContainerSpec,
    ImageNotAllowed,
    SandboxError,
    SandboxInputError,
    SandboxResult,
    SandboxUnavailable,
    check_image,
    run_in_container,
    sandboxed_capability,
)
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs, wait_for_instances
from workers.sandbox import SandboxConfig, build_app, load_config

pytestmark = pytest.mark.integration

RUN = secrets.token_hex(4)
LABELS = {"meshjobs.test": RUN}
NO_ENGINE = "unix:///nonexistent/meshjobs-test/docker.sock"


def _engine_problem() -> str | None:
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install -e '.[docker]')"
    try:
        docker.from_env(timeout=5).close()
    except docker.errors.DockerException as exc:
        return f"no Docker engine answers ({exc}); start one with scripts/ensure-docker"
    return None


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """A docker SDK client for the engine, with the sandbox image built (offline) if missing."""
    problem = _engine_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a Docker engine: {problem}")
        pytest.skip(problem)
    import docker

    client = docker.from_env(timeout=30)
    try:
        client.images.get(DEFAULT_IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run([str(REPO / "scripts" / "build-sandbox-image"), DEFAULT_IMAGE], check=True, timeout=300)
    yield client
    client.close()


def leftovers(engine: Any) -> list[str]:
    return [c.name for c in engine.containers.list(all=True, filters={"label": LABEL})]


@pytest.fixture(autouse=True)
def no_container_left(engine: Any) -> Iterator[None]:
    """Every test leaves no sandbox container behind, whatever happened in it."""
    assert not leftovers(engine), "sandbox containers left over from before this test"
    yield
    assert not leftovers(engine), "a sandbox container was not removed"


def spec(**limits: Any) -> ContainerSpec:
    return ContainerSpec(image=DEFAULT_IMAGE, **{"timeout": 10.0, **limits})


async def sh(script: str, *, stdin: bytes = b"", files: dict[str, bytes] | None = None, **limits: Any) -> SandboxResult:
    return await run_in_container(spec(**limits), ["sh", "-c", script], stdin=stdin, files=files, labels=LABELS)


async def test_runs_a_command_as_nobody_with_stdin_and_files() -> None:
    result = await sh(
        "id -u; cat; cat data/in.txt; wc -c < blob.bin; echo oops >&2; exit 3",
        stdin=b"from stdin\n",
        files={"data/in.txt": b"from a file\n", "blob.bin": bytes(range(256))},
    )
    assert result.stdout == b"65534\nfrom stdin\nfrom a file\n256\n"
    assert result.stderr == b"oops\n"
    assert (result.exit_code, result.timed_out, result.oom_killed) == (3, False, False)
    assert not result.stdout_truncated and not result.stderr_truncated
    assert 0 < result.wall_seconds < 5


async def test_argv_is_passed_exactly_without_a_shell() -> None:
    weird = ["it's", "$(id)", "*", "a b", ""]
    result = await run_in_container(spec(), ["printf", "[%s]", *weird], labels=LABELS)
    assert result.stdout == b"[it's][$(id)][*][a b][]"


async def test_no_privileges_read_only_root_writable_tmpfs() -> None:
    result = await sh(
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status;"
        "for p in /x /etc/x /etc/passwd /bin/busybox; do echo hi > $p && echo WROTE $p; done;"
        "echo ok > /tmp/t && echo ok > /work/t && cat /tmp/t /work/t"
    )
    assert "CapEff:\t0000000000000000" in result.stdout.decode()
    assert "NoNewPrivs:\t1" in result.stdout.decode()
    assert b"WROTE" not in result.stdout
    assert result.stderr.count(b"Read-only file system") == 4
    assert result.stdout.endswith(b"ok\nok\n")


async def test_tmpfs_is_bounded() -> None:
    result = await sh("dd if=/dev/zero of=/work/big bs=1M count=16", tmpfs_bytes=4 * 1024 * 1024)
    assert result.exit_code != 0
    assert b"No space left on device" in result.stderr


async def test_no_network_even_to_the_hosts_loopback(broker: Any) -> None:
    port = int(broker.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the host reaches the broker...
    result = await sh(f"cat /proc/net/dev; ip route; ip -6 route; nc -w 2 127.0.0.1 {port} </dev/null; echo nc=$?")
    out = result.stdout.decode()
    interfaces = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line and "|" not in line]
    assert interfaces == ["lo"], out  # ...the container has no interface but its own loopback
    assert "default" not in out and "via" not in out
    assert out.rstrip().endswith("nc=1")
    assert b"Connection refused" in result.stderr


async def test_a_fork_bomb_is_contained_by_the_pids_limit(engine: Any) -> None:
    import docker

    # Every bomb process forks in a loop (and dies at its first failed fork),
    # so the pids cgroup stays full; pid 1 just sleeps until the wall clock kills it.
    labels = {**LABELS, "meshjobs.case": "fork-bomb"}
    bomb = "b() { while :; do b & done; }; b & exec sleep 30"
    started = time.monotonic()
    task = asyncio.create_task(run_in_container(spec(pids_limit=32, timeout=3.0), ["sh", "-c", bomb], labels=labels))
    seen = []
    while not task.done():
        for container in engine.containers.list(filters={"label": "meshjobs.case=fork-bomb"}):
            try:
                stats = await asyncio.to_thread(engine.api.stats, container.id, stream=False, one_shot=True)
            except (docker.errors.APIError, ValueError):
                continue  # it ended while we asked (an empty body is a JSON ValueError)
            seen.append(stats.get("pids_stats", {}).get("current", 0))
        await asyncio.sleep(0.1)
    result = await task
    assert result.timed_out and result.exit_code == 137
    assert seen and max(seen) <= 32, seen
    assert max(seen) >= 16, f"the bomb did not get going: {seen}"
    assert time.monotonic() - started < 15
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the machine still forks


async def test_a_memory_hog_is_oom_killed_and_reported() -> None:
    result = await sh('x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo ${#x}', memory_bytes=32 * 1024 * 1024)
    assert result.oom_killed
    assert result.exit_code == 137
    assert not result.timed_out
    assert result.stdout == b""


async def test_the_wall_clock_limit_kills_and_reports() -> None:
    result = await sh("echo started; sleep 30; echo never", timeout=1.0)
    assert result.timed_out
    assert result.exit_code == 137
    assert result.stdout == b"started\n"
    assert 1.0 <= result.wall_seconds < 5


async def test_huge_output_is_truncated_and_drained() -> None:
    result = await sh("yes | head -c 50000000; yes err | head -c 3000 >&2; echo done >&2", output_bytes=1000)
    assert result.exit_code == 0 and not result.timed_out  # drained: the writer never blocked
    assert result.stdout == b"y\n" * 500
    assert result.stdout_truncated and result.stderr_truncated
    assert len(result.stderr) == 1000


async def test_a_cancelled_run_still_removes_its_container(engine: Any) -> None:
    task = asyncio.create_task(sh("sleep 30", timeout=60.0))
    deadline = time.monotonic() + 10
    while not engine.containers.list(filters={"label": f"meshjobs.test={RUN}", "status": "running"}):
        assert time.monotonic() < deadline, "the container never started"
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not leftovers(engine)
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3):  # cancelled while connecting, creating, starting...
        task = asyncio.create_task(sh("sleep 30", timeout=60.0))
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not leftovers(engine), f"left a container when cancelled after {delay} s"


async def test_bad_input_is_refused_before_the_engine_is_asked() -> None:
    for files in ({"../x": b""}, {"/etc/passwd": b""}, {"a/../b": b""}, {"": b""}, {"big": b"x" * (5 << 20)}):
        with pytest.raises(SandboxInputError):
            await run_in_container(spec(), ["true"], files=files, engine=NO_ENGINE)
    for argv in ([], [""], ["a\0b"]):
        with pytest.raises(SandboxInputError):
            await run_in_container(spec(), argv, engine=NO_ENGINE)
    with pytest.raises(ValueError, match="root"):
        ContainerSpec(image=DEFAULT_IMAGE, user="0:0")


async def test_engine_down_is_a_clear_error() -> None:
    with pytest.raises(SandboxUnavailable) as caught:
        await run_in_container(spec(), ["true"], engine=NO_ENGINE)
    message = str(caught.value)
    assert "\n" not in message and "unreachable" in message and NO_ENGINE in message
    assert caught.value.exit_code == 3


async def test_an_image_missing_from_the_engine_is_a_clear_error() -> None:
    with pytest.raises(SandboxError, match="not on the engine") as caught:
        await run_in_container(ContainerSpec(image="meshjobs/not-built-here:0"), ["true"], labels=LABELS)
    assert "\n" not in str(caught.value)


async def test_without_the_docker_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    hide = "import sys; sys.modules['docker'] = None; import workers.sandbox, meshjobs.peers.sandbox"
    imported = subprocess.run([sys.executable, "-c", hide], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr  # the core install imports without the extra
    monkeypatch.setitem(sys.modules, "docker", None)
    with pytest.raises(SandboxUnavailable, match=r"install meshjobs\[docker\]"):
        await run_in_container(spec(), ["true"])


def test_an_image_outside_the_allowlist_is_refused() -> None:
    with pytest.raises(ImageNotAllowed):
        check_image("alpine:latest", [DEFAULT_IMAGE])
    with pytest.raises(UsageError, match="allowlist"):
        sandboxed_capability(App("t"), "t.run", ContainerSpec(image="other/image:1"), images=[DEFAULT_IMAGE])


@pytest.fixture
async def in_process_worker(broker: Any, identity: Identity) -> AsyncIterator[App]:
    """sandbox.run pointed at a dead engine, plus an unrelated capability, served in this process."""
    app = build_app(SandboxConfig(engine=NO_ENGINE))

    @app.capability("sandbox.ping")
    async def ping() -> str:
        return "pong"

    worker = Worker(app, identity, TrustPolicy(frozenset()), WorkerConfig(durable=False))
    task = asyncio.create_task(worker.serve(broker.url))
    try:
        await wait_for_instances(broker.url, identity, 1, "sandbox.ping")
        yield app
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def test_dead_engine_fails_the_job_and_the_worker_keeps_serving(in_process_worker: App, client: Client) -> None:
    with pytest.raises(HandlerError, match="unreachable"):
        await client.submit("sandbox.run", {"argv": ["true"]}, timeout=20)
    assert (await client.submit("sandbox.ping", timeout=10)).value == "pong"
    with pytest.raises(UsageError, match="image"):
        await client.submit("sandbox.run", {"argv": ["true"], "image": "alpine:latest"}, timeout=10)
    with pytest.raises(UsageError, match="files"):
        await client.submit("sandbox.run", {"argv": ["true"], "files": {"../x": "y"}}, timeout=10)
    assert (await client.submit("sandbox.ping", timeout=10)).value == "pong"


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.toml"
    path.write_text(f'images = ["{DEFAULT_IMAGE}", "other/image:2"]\n[limits]\npids_limit = 16\ntimeout = 5\n')
    config = load_config(path)
    assert config.images == (DEFAULT_IMAGE, "other/image:2")
    assert (config.spec().pids_limit, config.spec().timeout, config.spec().image) == (16, 5.0, DEFAULT_IMAGE)
    path.write_text('images = ["x:1"]\n[limits]\nuser = "root"\n')
    with pytest.raises(UsageError, match="root"):
        load_config(path)
    path.write_text("images = []\n")
    with pytest.raises(UsageError, match="images"):
        load_config(path)


async def test_end_to_end_signed_sandbox_run(broker: Any, home: Path, identity: Identity, tmp_path: Path) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(f'images = ["{DEFAULT_IMAGE}"]\n[limits]\ntimeout = 5\noutput_bytes = 4096\n')
    worker = WorkerProcess.launch(
        "workers.sandbox:app", home, broker.url, tmp_path / "worker.log", MESHJOBS_SANDBOX_CONFIG=str(config)
    )
    try:
        await wait_for_instances(broker.url, identity, 1, "sandbox.run")
        args = {
            "argv": ["sh", "-c", "cat hello.txt; tr a-z A-Z; yes | head -c 100000"],
            "stdin": "shout\n",
            "files": {"hello.txt": "hi from a file\n"},
        }
        async with await Client.connect(broker.url, identity) as client:
            outcome = await client.submit("sandbox.run", args, timeout=30)
        value = outcome.value
        assert value["stdout"].startswith("hi from a file\nSHOUT\ny\ny\n")
        assert len(value["stdout"]) == 4096 and value["stdout_truncated"]
        assert (value["exit_code"], value["timed_out"], value["oom_killed"]) == (0, False, False)
        assert outcome.worker == identity.public_key
        refused = meshjobs(
            "submit", "sandbox.run", '{"argv": ["true"], "image": "alpine:latest"}', env=cli_env(home, broker.url)
        )
        assert refused.returncode == 2, refused.stderr
        assert "image" in refused.stderr
    finally:
        assert worker.terminate(timeout=30) == 0, worker.output()
