"""AI persona peers end to end: a real nats-server, a persona worker, and a real HTTP server speaking
OpenAI's chat completions protocol (the stand-in), driven into each fault by the job's arguments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from meshjobs import Client, HandlerError, Identity, JobTimeout, TrustPolicy, UsageError, Worker, WorkerConfig
from meshjobs.peers.ai import PersonaPeer, load_persona, resolve_api_key
from meshjobs.peers.openai_standin import OpenAIStandin
from meshjobs.peers.persona import build_messages, prompt_digest
from meshjobs.peers.schema import first_problem
from tests.conftest import REPO, cli_env, wait_for_instances

pytestmark = pytest.mark.integration

KEY_ENV = "MESHJOBS_TEST_AI_KEY"

PERSONA = """
version = 1
name = "it-reviewer"
description = "integration test persona"
system_prompt = "You review designs, briefly."

[endpoint]
base_url = "{url}"
model = "llama3.1"
api_key_env = "{key_env}"
timeout = {timeout}
max_retries = {max_retries}
concurrency = {concurrency}
structured = "{structured}"

[[capability]]
name = "{cap}"
description = "Review a design"
tags = ["design"]
{cap_timeout}

[capability.arguments]
type = "object"
required = ["design"]
additionalProperties = false
properties.design = {{ type = "string", minLength = 1 }}
properties.focus = {{ type = "array", items = {{ type = "string" }} }}

[capability.result]
type = "object"
required = ["summary", "verdict", "risks"]
additionalProperties = false
properties.summary = {{ type = "string" }}
properties.verdict = {{ type = "string", enum = ["sound", "needs-rework"] }}
properties.risks = {{ type = "array", items = {{ type = "string" }} }}
"""


@dataclass
class Rig:
    url: str
    submitter: Identity
    client: Client
    standin: OpenAIStandin
    tmp: Path
    _cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def serve(
        self,
        *,
        timeout: float = 5,
        max_retries: int = 2,
        concurrency: int = 4,
        cap_timeout: float | None = None,
        key_env: str = KEY_ENV,
        structured: str = "json_schema",
    ) -> tuple[str, PersonaPeer]:
        """Start a persona worker in-process with a fresh capability name; returns (capability, peer)."""
        cap = f"t{secrets.token_hex(4)}.review"
        path = self.tmp / f"{cap}.toml"
        path.write_text(
            PERSONA.format(
                url=self.standin.url,
                key_env=key_env,
                timeout=timeout,
                max_retries=max_retries,
                concurrency=concurrency,
                structured=structured,
                cap=cap,
                cap_timeout=f"timeout = {cap_timeout}" if cap_timeout else "",
            )
        )
        persona = load_persona(path)
        peer = PersonaPeer(persona, resolve_api_key(persona, os.environ))
        worker = Worker(
            peer.app,
            Identity.generate(),
            TrustPolicy(frozenset({self.submitter.public_key})),
            WorkerConfig(durable=False),
        )
        nc = await nats.connect(self.url)
        await worker.start(nc)

        async def stop() -> None:
            await worker.drain()
            await nc.close()
            await peer.aclose()

        self._cleanups.append(stop)
        return cap, peer

    async def close(self) -> None:
        for stop in reversed(self._cleanups):
            await stop()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-meshjobs-test-{secrets.token_hex(12)}"
    monkeypatch.setenv(KEY_ENV, key)
    return key


@pytest.fixture
async def rig(broker: Any, client: Client, identity: Identity, api_key: str, tmp_path: Path) -> AsyncIterator[Rig]:
    with OpenAIStandin(api_key=api_key) as standin:
        rig = Rig(broker.url, identity, client, standin, tmp_path)
        try:
            yield rig
        finally:
            await rig.close()


async def test_a_good_answer_is_signed_with_model_prompt_digest_and_usage(rig: Rig) -> None:
    cap, peer = await rig.serve()
    args = {"design": "One Postgres primary behind a queue of workers.", "focus": ["reliability"]}
    outcome = await rig.client.submit(cap, args, timeout=20)
    value = outcome.value
    assert set(value) == {"output", "model", "prompt_sha256", "usage"}
    spec = peer.persona.capabilities[0]
    assert first_problem(value["output"], spec.result) is None
    assert value["model"] == "llama3.1"
    # The digest covers exactly the messages the server received.
    body = rig.standin.stats.bodies[-1]
    assert value["prompt_sha256"] == prompt_digest(body["messages"])
    assert value["prompt_sha256"] == prompt_digest(build_messages(peer.persona, spec, args))
    usage = value["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["response_format"]["json_schema"]["schema"] == spec.result
    assert outcome.record()["signed_result"].startswith("MJ1R ")


@pytest.mark.parametrize("structured", ["json_object", "none"])
async def test_servers_without_json_schema_support_by_configuration(rig: Rig, structured: str) -> None:
    cap, peer = await rig.serve(structured=structured)
    outcome = await rig.client.submit(cap, {"design": "a design"}, timeout=20)
    assert first_problem(outcome.value["output"], peer.persona.capabilities[0].result) is None
    body = rig.standin.stats.bodies[-1]
    assert body.get("response_format") == ({"type": "json_object"} if structured == "json_object" else None)
    assert "```json" in body["messages"][0]["content"]  # the schema rides in the system prompt instead


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ("malformed", "ModelOutputError: model output does not match the result schema: $: not JSON (invalid JSON"),
        ("schema-violation", "ModelOutputError: model output does not match the result schema: $.summary: expected"),
    ],
)
async def test_output_that_breaks_the_schema_is_refused(rig: Rig, marker: str, expected: str) -> None:
    cap, _ = await rig.serve()
    with pytest.raises(HandlerError) as info:
        await rig.client.submit(cap, {"design": f"[standin-fault:{marker}] a design"}, timeout=20)
    assert expected in str(info.value)
    assert rig.standin.stats.requests == 1  # a wrong answer is refused, not asked again


async def test_slow_model_times_out_clearly_and_the_worker_keeps_serving(rig: Rig) -> None:
    cap, _ = await rig.serve(timeout=1, max_retries=0)
    started = time.monotonic()
    with pytest.raises(HandlerError) as info:
        await rig.client.submit(cap, {"design": "[standin-fault:slow:5] a design"}, timeout=20)
    assert "ModelTimeout: the model endpoint did not answer within 1 s (gave up after 1 attempt(s))" in str(info.value)
    assert time.monotonic() - started < 3
    outcome = await rig.client.submit(cap, {"design": "a design"}, timeout=20)
    assert outcome.value["output"]["verdict"] == "sound"
    # The capability's own timeout, when shorter, ends the job as a timeout (exit code 4).
    short, _ = await rig.serve(timeout=10, cap_timeout=1)
    with pytest.raises(JobTimeout, match=r"did not finish within 1 s"):
        await rig.client.submit(short, {"design": "[standin-fault:slow:5] a design"}, timeout=20)


async def test_rate_limits_are_retried(rig: Rig) -> None:
    cap, _ = await rig.serve(max_retries=2)
    outcome = await rig.client.submit(cap, {"design": "[standin-fault:rate-limit-then-ok:2] a design"}, timeout=20)
    assert outcome.value["output"]["verdict"] == "sound"
    assert rig.standin.stats.requests == 3


async def test_server_errors_exhaust_the_retries(rig: Rig) -> None:
    cap, _ = await rig.serve(max_retries=2)
    with pytest.raises(HandlerError) as info:
        await rig.client.submit(cap, {"design": "[standin-fault:server-error] a design"}, timeout=20)
    message = str(info.value)
    assert "ModelError: the model endpoint answered HTTP 500" in message
    assert "(gave up after 3 attempt(s))" in message
    assert rig.standin.stats.requests == 3


async def test_the_concurrency_bound_holds(rig: Rig) -> None:
    cap, _ = await rig.serve(concurrency=2)
    started = time.monotonic()
    jobs = [rig.client.submit(cap, {"design": f"[standin-fault:slow:0.4] design {i}"}, timeout=20) for i in range(6)]
    outcomes = await asyncio.gather(*jobs)
    assert all(o.value["output"]["verdict"] == "sound" for o in outcomes)
    assert rig.standin.stats.requests == 6
    assert rig.standin.stats.max_in_flight == 2
    assert time.monotonic() - started >= 1.1  # three rounds of two, 0.4 s each


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"design": 5}, "invalid arguments: design: expected string, got integer"),
        ({"design": ""}, "invalid arguments: design: length 0 is less than minLength 1"),
        ({}, "invalid arguments: missing required property 'design'"),
        ({"design": "x", "focus": ["a", 1]}, "invalid arguments: focus[1]: expected string, got integer"),
        ({"design": "x", "colour": "red"}, "invalid arguments: unexpected property 'colour'"),
    ],
)
async def test_bad_arguments_are_usage_errors(rig: Rig, args: dict[str, Any], expected: str) -> None:
    cap, _ = await rig.serve()
    with pytest.raises(UsageError) as info:
        await rig.client.submit(cap, args, timeout=20)
    assert expected in str(info.value)
    assert rig.standin.stats.requests == 0


async def test_the_api_key_is_never_logged(
    rig: Rig,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # meshjobs, openai, httpx2, httpcore2: everything
    wrong = f"sk-wrong-{secrets.token_hex(12)}"
    monkeypatch.setenv("MESHJOBS_TEST_WRONG_KEY", wrong)
    cap, _ = await rig.serve(max_retries=1)
    refused, _ = await rig.serve(key_env="MESHJOBS_TEST_WRONG_KEY")
    messages = [str((await rig.client.submit(cap, {"design": "a design"}, timeout=20)).value)]
    for name, design in ((cap, "[standin-fault:server-error] x"), (refused, "a design")):
        with pytest.raises(HandlerError) as info:
            await rig.client.submit(name, {"design": design}, timeout=20)
        messages.append(str(info.value))
    assert "HTTP 401: Incorrect API key provided." in messages[-1]  # the key is sent, and checked
    out, err = capfd.readouterr()
    assert "HTTP Request: POST" in caplog.text  # the SDK's logs were captured
    for text in (caplog.text, out, err, *messages):
        assert api_key not in text and wrong not in text


def test_the_persona_command_serves_a_file(
    broker: Any, home: Path, identity: Identity, api_key: str, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "meshjobs", "persona"]
    persona_file = str(REPO / "workers" / "personas" / "security-analysis.toml")
    env = cli_env(home, broker.url, **{KEY_ENV: api_key})
    check = subprocess.run(
        [*command, persona_file, "--check", "--api-key-env", "MESHJOBS_TEST_UNSET"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 2
    assert check.stderr.strip().count("\n") == 0
    assert "environment variable MESHJOBS_TEST_UNSET is not set" in check.stderr
    with OpenAIStandin(api_key=api_key) as standin:
        extra = ["--base-url", standin.url, "--model", "standin", "--api-key-env", KEY_ENV]
        log = tmp_path / "persona.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*command, persona_file, *extra], env=env, cwd=REPO, stdout=out, stderr=out)
        try:
            asyncio.run(wait_for_instances(broker.url, identity, 1, "analyse.security"))

            async def ask() -> Any:
                async with await Client.connect(broker.url, identity) as client:
                    args = {"target": "eval(request.args['q'])", "kind": "code"}
                    return (await client.submit("analyse.security", args, timeout=30)).value

            value = asyncio.run(ask())
            assert value["model"] == "standin"
            assert value["output"]["overall_risk"] == "none"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert api_key not in log.read_text()
