"""The dashboard's access rules and row parsing, without a network (the browser tests are integration)."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from meshjobs.errors import UsageError
from meshjobs.observe.dashboard.access import (
    COOKIE,
    Access,
    AccessGuard,
    is_loopback,
    offered_token,
    same_origin_problem,
    token_problem,
)
from meshjobs.observe.dashboard.evidence import state_row
from meshjobs.observe.dashboard.health import check_monitor_url

TOKEN = "t" * 43


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "", "localhost.evil"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_a_token_is_required_off_loopback_and_for_operators() -> None:
    assert Access.for_bind("127.0.0.1", token=None, operator=False).token is None
    for host, operator in (("0.0.0.0", False), ("192.168.1.10", False), ("::", False), ("127.0.0.1", True)):
        access = Access.for_bind(host, token=None, operator=operator)
        assert access.token and len(access.token) >= 40, (host, operator)
    assert Access.for_bind("127.0.0.1", token=TOKEN, operator=False).token == TOKEN
    assert Access.for_bind("0.0.0.0", token=None, operator=False).loopback is False


def test_weak_tokens_are_refused() -> None:
    assert token_problem("short")
    assert token_problem("a" * 30 + " b")
    assert token_problem("a" * 30 + ";b")
    assert token_problem(TOKEN) is None


def test_token_comparison() -> None:
    access = Access(TOKEN, loopback=True)
    assert access.check_token(TOKEN)
    assert not access.check_token(None) and not access.check_token("") and not access.check_token(TOKEN[:-1])
    assert not access.check_token("é" * 43)
    assert Access(None, loopback=True).check_token(None)


def test_the_token_comes_from_the_header_or_the_cookie() -> None:
    assert offered_token({"authorization": f"Bearer {TOKEN}"}) == TOKEN
    assert offered_token({"cookie": f"other=1; {COOKIE}={TOKEN}"}) == TOKEN
    assert offered_token({"cookie": 'junk="unterminated'}) is None
    assert offered_token({}) is None


def test_state_changes_need_the_same_origin() -> None:
    good = {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765", "content-type": "application/json"}
    assert same_origin_problem("POST", good, "http") is None
    assert same_origin_problem("GET", {}, "http") is None
    assert same_origin_problem("POST", {**good, "origin": "http://evil.example"}, "http")
    assert same_origin_problem("POST", {k: v for k, v in good.items() if k != "origin"}, "http")
    assert same_origin_problem("POST", {**good, "sec-fetch-site": "same-site"}, "http")
    assert same_origin_problem("POST", {**good, "content-type": "text/plain"}, "http")
    assert same_origin_problem("POST", good, "https")  # the origin's scheme must match too


async def call(guard: AccessGuard, method: str, path: str, headers: dict[str, str], query: str = "") -> dict[str, Any]:
    """One request through the guard; returns the response start message (and whether the app ran)."""
    ran: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard.app = app
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": path, "scheme": "http", "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    await guard(scope, receive, send)
    start = sent[0]
    return {"status": start["status"], "headers": dict(start["headers"]), "ran": bool(ran)}


async def test_the_guard() -> None:
    guard = AccessGuard(lambda *a: None, Access(TOKEN, loopback=True))  # type: ignore[arg-type]
    host = {"Host": "127.0.0.1:8765"}
    assert (await call(guard, "GET", "/", host))["status"] == 401
    ok = await call(guard, "GET", "/", {**host, "Authorization": f"Bearer {TOKEN}"})
    assert ok["ran"] and b"content-security-policy" in ok["headers"]
    rebound = await call(guard, "GET", "/", {"Host": "evil.example:8765", "Authorization": f"Bearer {TOKEN}"})
    assert rebound["status"] == 421 and not rebound["ran"]
    first = await call(guard, "GET", "//evil.example/x", host, query=f"token={TOKEN}")
    assert first["status"] == 303 and not first["ran"]
    assert first["headers"][b"location"] == b"/evil.example/x"  # never a protocol-relative redirect
    assert b"HttpOnly" in first["headers"][b"set-cookie"]
    assert (await call(guard, "GET", "/", host, query="token=wrong"))["status"] == 401
    post = {**host, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    assert (await call(guard, "POST", "/api/orders", post))["status"] == 403
    assert (await call(guard, "POST", "/api/orders", {**post, "Origin": "http://127.0.0.1:8765"}))["ran"]


async def test_without_a_token_a_token_query_sets_no_cookie() -> None:
    guard = AccessGuard(lambda *a: None, Access(None, loopback=True))  # type: ignore[arg-type]
    result = await call(guard, "GET", "/", {"Host": "localhost:8765"}, query="token=anything")
    assert result["ran"] and b"set-cookie" not in result["headers"]


def test_durable_states_become_rows() -> None:
    from meshjobs.durable import JobState
    from meshjobs.identity import Identity
    from meshjobs.jobrecords import StateRecord, seal_state

    submitter, worker = Identity.generate(), Identity.generate()
    job, digest = "0123456789abcdef", "d" * 64

    def signed(by: Identity, state: str, updated_ms: int, **extra: object) -> bytes:
        record = StateRecord.model_validate(
            {"version": 1, "job_id": job, "state": state, "capability": "demo.add", "submitter": submitter.public_key,
             "request_digest": digest, "writer": by.public_key, "updated_ms": updated_ms, **extra}
        )  # fmt: skip
        return seal_state(by, record)

    queued_at: dict[str, int] = {}
    key = f"{submitter.public_key}.{job}"
    assert state_row(key, signed(submitter, "queued", 1000), queued_at)
    done = state_row(key, signed(worker, "done", 1250, worker=worker.public_key), queued_at)
    assert done is not None and done["latency_ms"] == 250.0 and done["peer"] == worker.public_key
    assert done["status"] == "done" and done["job_id"] == job
    assert state_row(f"{submitter.public_key}.other-job-id", signed(worker, "done", 1), queued_at) is None
    assert state_row(key, b"not json", queued_at) is None
    unsigned = json.dumps(JobState(job, "done", "demo.add", submitter.public_key, digest).as_dict()).encode()
    assert state_row(key, unsigned, queued_at) is None  # unsigned: junk
    forged = bytearray(signed(worker, "done", 5))
    forged[-3] ^= 1
    assert state_row(key, bytes(forged), queued_at) is None  # the signature no longer verifies


def test_monitor_urls() -> None:
    assert check_monitor_url("http://127.0.0.1:8222/") == "http://127.0.0.1:8222"
    for bad in ("ftp://127.0.0.1:8222", "127.0.0.1:8222", "http://", "http://h:1/?x=1"):
        with pytest.raises(UsageError):
            check_monitor_url(bad)


def test_a_topology_whose_servers_are_down_shows_every_server_and_link_down() -> None:
    """Every server and expected link of the example topology, none running (closed loopback ports)."""
    import itertools
    import socket
    from pathlib import Path

    from meshjobs.infra.topology import load_topology
    from meshjobs.observe.dashboard.health import from_topology

    def closed_ports() -> itertools.count[int]:
        with socket.socket() as probe:  # a port that was free a moment ago; nothing listens on the ones after it
            probe.bind(("127.0.0.1", 0))
            return itertools.count(probe.getsockname()[1])

    topology = load_topology(Path(__file__).resolve().parents[2] / "config" / "topology.toml")
    topology = topology.with_ports(closed_ports())
    view = from_topology(topology)
    assert view["source"] == "topology" and not view["healthy"]
    assert {s["name"] for s in view["servers"]} == set(topology.server_names())
    assert all(not s["up"] and s["problems"] for s in view["servers"])
    kinds = {link["kind"] for link in view["links"]}
    assert kinds == {"route", "gateway", "leaf"} and not any(link["up"] for link in view["links"])
    assert {c["name"] for c in view["communities"]} == {c.name for c in topology.community}
