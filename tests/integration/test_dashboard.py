"""`meshjobs dashboard` against a running mesh, driven in a real headless Chromium.

The embedded broker, a real demo worker process and the dashboard as the CLI
starts it (a subprocess on a free loopback port, stopped by PID); the page is
opened in Debian's chromium through Playwright. Screenshots are kept in
tests/artifacts/dashboard/ (or $MESHJOBS_ARTIFACTS/dashboard/), gitignored.

Under CI=true a missing chromium or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshjobs.client import Client
from meshjobs.durable import Durable
from meshjobs.identity import IDENTITY_FILE, Identity, save_identity
from meshjobs.infra.broker import NatsServer
from meshjobs.submit import SubmitOptions, Submitter
from meshjobs.trust.policy import TrustPolicy
from meshjobs.trust.quarantine import QuarantineBoard
from tests.conftest import REPO, WorkerProcess, cli_env, meshjobs, wait_for_instances

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MESHJOBS_ARTIFACTS") or REPO / "tests" / "artifacts") / "dashboard"
#: How long the page may take to show something that happened (it updates every poll, 0.5 s here).
LIVE_MS = 8000
READ_ONLY_TOKEN = "read-only-dashboard-test-token-0123456789"


def need_browser() -> Any:
    """Playwright's sync API, or skip (fail under CI) when it or Debian's chromium is missing."""
    problem = None
    try:
        from playwright import sync_api
    except ImportError:
        problem = "the playwright package is missing (pip install -e '.[dev]')"
    if problem is None and not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (scripts/ensure-chromium installs Debian's chromium)"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_api


def arun(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine in a thread of its own: Playwright's sync API owns this thread's event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result(timeout=60)


def write_home(path: Path, identity: Identity, trust: str) -> Path:
    save_identity(identity, path / IDENTITY_FILE)
    trust_file = path / "trust.toml"
    trust_file.write_text(trust)
    trust_file.chmod(0o600)
    return path


class Dashboard:
    """`meshjobs dashboard` as a child process, stopped by PID."""

    def __init__(self, proc: subprocess.Popen[str], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        parsed = urllib.parse.urlsplit(url)
        self.port = parsed.port or 0
        self.origin = f"http://127.0.0.1:{self.port}"
        self.token = dict(urllib.parse.parse_qsl(parsed.query)).get("token")
        self.log = log

    @classmethod
    def launch(cls, home: Path, broker: NatsServer, log: Path, *args: str) -> Dashboard:
        monitor = f"http://127.0.0.1:{broker.monitor_port}"
        command = [sys.executable, "-m", "meshjobs", "dashboard", "--port", "0", "--poll", "0.5", "--monitor", monitor]
        with log.open("w") as err:
            proc = subprocess.Popen(
                [*command, *args], env=cli_env(home, broker.url), cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("meshjobs dashboard: http://"):
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"the dashboard did not start: {line!r} {log.read_text()}")
        return cls(proc, line.split()[2], log)

    def stop(self) -> int:
        """SIGTERM, like Ctrl-C or a service manager; the dashboard exits on its own within seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None
    ) -> tuple[int, dict[str, str], str]:
        """One plain HTTP request (no browser): status, headers (lower-case names), body text."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Host": f"127.0.0.1:{self.port}", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
        finally:
            conn.close()

    def bearer(self) -> dict[str, str]:
        assert self.token
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An operator (the dashboard's identity, also the submitter) and a worker that trusts it."""
    root = tmp_path_factory.mktemp("dashboard")
    operator, worker = Identity.generate(), Identity.generate()
    op_trust = f'[[operator]]\nkey = "{operator.public_key}"\nname = "ops"\n'
    worker_trust = f'[[peer]]\nkey = "{operator.public_key}"\n\n{op_trust}'
    return {
        "root": root,
        "operator": operator,
        "worker": worker,
        "operator_home": write_home(root / "operator", operator, op_trust),
        "worker_home": write_home(root / "worker", worker, worker_trust),
        "stranger_home": write_home(root / "stranger", Identity.generate(), op_trust),
    }


@pytest.fixture(scope="module")
def worker(broker: NatsServer, people: dict[str, Any]) -> Iterator[WorkerProcess]:
    log = people["root"] / "worker.log"
    process = WorkerProcess.launch(
        "workers.demo:app", people["worker_home"], broker.url, log,
        "--name", "dash-demo", "--region", "eu", "--community", "garage",
    )  # fmt: skip
    try:
        arun(lambda: wait_for_instances(broker.url, people["operator"], 1, "demo.sleep"))
        yield process
    finally:
        try:
            process.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def operator_dashboard(broker: NatsServer, people: dict[str, Any], worker: WorkerProcess) -> Iterator[Dashboard]:
    dashboard = Dashboard.launch(people["operator_home"], broker, people["root"] / "dash-op.log", "--operator")
    try:
        yield dashboard
    finally:
        assert dashboard.stop() == 0, dashboard.log.read_text()


@pytest.fixture(scope="module")
def read_only_dashboard(broker: NatsServer, people: dict[str, Any], worker: WorkerProcess) -> Iterator[Dashboard]:
    log = people["root"] / "dash-ro.log"
    dashboard = Dashboard.launch(people["operator_home"], broker, log, "--token", READ_ONLY_TOKEN)
    try:
        yield dashboard
    finally:
        assert dashboard.stop() == 0, dashboard.log.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = need_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context per test (no shared cookies); a screenshot of the end state is always kept."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
        assert not errors, errors
    finally:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        context.close()


def expect(locator: Any) -> Any:
    return need_browser().expect(locator)


def open_page(page: Any, dashboard: Dashboard) -> None:
    page.goto(dashboard.url)  # ?token=... sets the cookie and redirects to /
    assert "token" not in page.url
    expect(page.locator("#live")).to_have_text("live", timeout=LIVE_MS)


async def submit_traced(url: str, identity: Identity, operators: frozenset[str]) -> str:
    """A job whose outcome is filed as signed evidence (a submitter with reputation, as `meshjobs submit`)."""
    async with await Client.connect(url, identity) as client:
        async with await Submitter.open(client, TrustPolicy(operators=operators)) as submitter:
            # demo.sleep is not deterministic: one run, one piece of evidence (no verification runs).
            done = await submitter.submit("demo.sleep", {"seconds": 0.05}, SubmitOptions(timeout=15))
    return done.outcome.job_id


async def enqueue_durable(url: str, identity: Identity) -> str:
    async with await Client.connect(url, identity) as client:
        durable = await Durable.open(client.nc)
        job_id = await durable.submit(identity, "demo.sleep", {"seconds": 0.05})
        await durable.wait(job_id, 15)
        return job_id


async def board_order(url: str, identity: Identity, peer: str) -> Any:
    """The current quarantine order about *peer*, as any peer honouring this operator sees it."""
    async with await Client.connect(url, identity) as client:
        board = await QuarantineBoard.open(client.nc, frozenset({identity.public_key}))
        try:
            return board.orders.get(peer), board.is_quarantined(peer)
        finally:
            await board.close()


def test_every_panel_shows_the_running_mesh(operator_dashboard: Dashboard, people: dict[str, Any], page: Any) -> None:
    open_page(page, operator_dashboard)
    key = people["worker"].public_key
    row = page.locator(f'#peers tr[data-peer="{key}"]')
    expect(row).to_be_visible(timeout=LIVE_MS)
    for text in ("dash-demo", key[:12], "system", "eu", "garage", "demo.sleep", "demo.add", "jobs/s"):
        expect(row).to_contain_text(text)
    expect(row.locator(".state")).to_have_text("ok")
    expect(row.locator("meter")).to_have_count(1)
    server = page.locator('#servers tr[data-server="meshjobs"]')
    expect(server).to_contain_text("healthy")
    expect(server).to_contain_text("2.")  # the server's version, from /varz
    expect(page.locator("#links")).to_contain_text("none (a single server)")
    expect(page.locator("#regions")).to_contain_text("eu")
    expect(page.locator("#communities")).to_contain_text("garage")
    expect(page.locator("#approvals")).to_have_text("no approval gates configured")
    expect(page.locator("#mode")).to_have_text("operator: actions enabled")
    expect(page.locator("#identity")).to_have_text(people["operator"].public_key)


def test_jobs_arrive_live(operator_dashboard: Dashboard, broker: NatsServer, people: dict[str, Any], page: Any) -> None:
    open_page(page, operator_dashboard)
    page.evaluate("window.notReloaded = true")
    operator = people["operator"]
    job_id = arun(lambda: submit_traced(broker.url, operator, frozenset({operator.public_key})))
    row = page.locator(f'#jobs tr[data-job="{job_id}"]')
    expect(row).to_be_visible(timeout=LIVE_MS)
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("demo.sleep")
    expect(row).to_contain_text("ms")  # the latency the submitter measured
    expect(row).to_contain_text("dash-demo")
    expect(row.locator("td.source")).to_have_attribute("title", f"filed and signed by {operator.public_key}")
    durable_id = arun(lambda: enqueue_durable(broker.url, operator))
    durable_row = page.locator(f'#jobs tr[data-job="{durable_id}"]')
    expect(durable_row).to_contain_text("done", timeout=LIVE_MS)
    expect(durable_row).to_contain_text("durable state")
    assert page.evaluate("window.notReloaded") is True  # it came over the event stream, not a reload


def test_a_peer_shows_its_reputation_and_evidence(
    operator_dashboard: Dashboard, broker: NatsServer, people: dict[str, Any], page: Any
) -> None:
    operator, key = people["operator"], people["worker"].public_key
    job_id = arun(lambda: submit_traced(broker.url, operator, frozenset({operator.public_key})))
    open_page(page, operator_dashboard)
    page.locator(f'#peers tr[data-peer="{key}"]').click()
    detail = page.locator("#detail")
    expect(detail).to_contain_text(key, timeout=LIVE_MS)
    expect(detail).to_contain_text("score")
    evidence = detail.locator(f'table.evidence tr[data-job="{job_id}"]')
    expect(evidence).to_be_visible(timeout=LIVE_MS)
    expect(evidence).to_contain_text("success")
    expect(evidence).to_contain_text("demo.sleep")


def test_quarantine_and_release_from_the_page(
    operator_dashboard: Dashboard, broker: NatsServer, people: dict[str, Any], page: Any
) -> None:
    operator, key = people["operator"], people["worker"].public_key
    open_page(page, operator_dashboard)
    page.locator(f'#peers tr[data-peer="{key}"]').click()
    try:
        page.locator("#order-reason").fill("dashboard test: <b>not markup</b>")
        page.locator("#quarantine-button").click()
        expect(page.locator("#order-message")).to_contain_text("quarantine signed", timeout=LIVE_MS)
        expect(page.locator(f'#peers tr[data-peer="{key}"] .state')).to_have_text("quarantined", timeout=LIVE_MS)
        listed = page.locator(f'#quarantine tr[data-peer="{key}"]')
        expect(listed).to_contain_text("dashboard test: <b>not markup</b>")  # shown as text, not parsed
        order, quarantined = arun(lambda: board_order(broker.url, operator, key))
        assert quarantined and order.operator == operator.public_key and order.reason.startswith("dashboard test")
        page.screenshot(path=str(ARTIFACTS / "quarantined.png"), full_page=True)
        page.locator("#order-reason").fill("dashboard test over")
        page.locator("#release-button").click()
        expect(page.locator(f'#peers tr[data-peer="{key}"] .state')).to_have_text("ok", timeout=LIVE_MS)
        order, quarantined = arun(lambda: board_order(broker.url, operator, key))
        assert not quarantined and order.action == "release"
    finally:
        _, quarantined = arun(lambda: board_order(broker.url, operator, key))
        if quarantined:  # leave the shared worker usable for the other tests
            operator_dashboard.request(
                "POST", "/api/orders", headers={**operator_dashboard.bearer(), "Origin": operator_dashboard.origin,
                                                "Content-Type": "application/json"},
                body={"peer": key, "action": "release", "reason": "test cleanup"},
            )  # fmt: skip


def test_read_only_has_no_actions_and_refuses_posts(
    read_only_dashboard: Dashboard, people: dict[str, Any], page: Any
) -> None:
    dashboard, key = read_only_dashboard, people["worker"].public_key
    assert dashboard.token == READ_ONLY_TOKEN
    open_page(page, dashboard)
    expect(page.locator("#mode")).to_have_text("read-only")
    page.locator(f'#peers tr[data-peer="{key}"]').click()
    expect(page.locator("#detail")).to_contain_text(key, timeout=LIVE_MS)
    expect(page.locator("button")).to_have_count(0)
    expect(page.locator("#order-reason")).to_have_count(0)
    # The page's own origin, the cookie and a JSON body: everything but the right to act.
    status = page.evaluate(
        """async (peer) => (await fetch("/api/orders", {method: "POST", headers: {"content-type": "application/json"},
            body: JSON.stringify({peer, action: "quarantine", reason: "x"})})).status""",
        key,
    )
    assert status == 403
    status, _, body = dashboard.request(
        "POST", "/api/orders", headers={**dashboard.bearer(), "Origin": dashboard.origin,
                                        "Content-Type": "application/json"},
        body={"peer": key, "action": "quarantine", "reason": "x"},
    )  # fmt: skip
    assert status == 403 and "read-only" in body


def test_every_request_needs_the_token(operator_dashboard: Dashboard, people: dict[str, Any]) -> None:
    dashboard = operator_dashboard
    assert dashboard.token, "an operator dashboard always prints a token"
    for path in ("/", "/api/state", "/api/events", "/static/app.js", f"/api/peers/{people['worker'].public_key}"):
        assert dashboard.request("GET", path)[0] == 401, path
        assert dashboard.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
    assert dashboard.request("GET", "/?token=wrong")[0] == 401
    status, headers, _ = dashboard.request("GET", f"/?token={dashboard.token}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, headers, body = dashboard.request("GET", "/api/state", headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and json.loads(body)["actions"] is True
    assert "script-src 'self'" in headers["content-security-policy"]
    assert dashboard.request("GET", "/api/state", headers=dashboard.bearer())[0] == 200
    # DNS rebinding: a foreign host name pointing at 127.0.0.1 is not this dashboard.
    assert dashboard.request("GET", "/api/state", headers={**dashboard.bearer(), "Host": "evil.example"})[0] == 421


def test_posts_need_the_same_origin(operator_dashboard: Dashboard, broker: NatsServer, people: dict[str, Any]) -> None:
    dashboard, key = operator_dashboard, people["worker"].public_key
    order = {"peer": key, "action": "quarantine", "reason": "csrf"}
    json_type = {"Content-Type": "application/json"}
    no_token = {"Origin": dashboard.origin, **json_type}
    assert dashboard.request("POST", "/api/orders", headers=no_token, body=order)[0] == 401
    for headers in (
        {},  # no Origin
        {"Origin": "http://evil.example"},
        {"Origin": dashboard.origin, "Sec-Fetch-Site": "cross-site"},
        {"Origin": dashboard.origin, "Content-Type": "text/plain"},  # what a form on another site can send
    ):
        status, _, _ = dashboard.request(
            "POST", "/api/orders", headers={**dashboard.bearer(), **json_type, **headers}, body=order
        )
        assert status == 403, headers
    good = {**dashboard.bearer(), **json_type, "Origin": dashboard.origin}
    assert dashboard.request("POST", "/api/orders", headers=good, body={**order, "action": "delete"})[0] == 400
    assert dashboard.request("POST", "/api/orders", headers=good, body={**order, "peer": "Ujunk"})[0] == 400
    _, quarantined = arun(lambda: board_order(broker.url, people["operator"], key))
    assert not quarantined


def test_the_command_refuses_what_it_cannot_do_safely(broker: NatsServer, people: dict[str, Any]) -> None:
    stranger = cli_env(people["stranger_home"], broker.url)
    out = meshjobs("dashboard", "--operator", "--port", "0", env=stranger)
    assert out.returncode == 2 and "not an operator" in out.stderr
    out = meshjobs("dashboard", "--token", "short", "--port", "0", env=stranger)
    assert out.returncode == 2 and "--token" in out.stderr
    out = meshjobs("dashboard", "--monitor", "ftp://127.0.0.1:8222", "--port", "0", env=stranger)
    assert out.returncode == 2 and "--monitor" in out.stderr
    out = meshjobs("dashboard", "--server", "nats://127.0.0.1:1", "--port", "0", env=stranger)
    assert out.returncode == 3, out.stderr
