"""What every command shares: home, servers, identity, running a coroutine, one-line failures.

Environment variables are read here and nowhere else: ``MESHJOBS_SERVER``
(default ``nats://127.0.0.1:4222``) and ``MESHJOBS_HOME`` (default
``~/.meshjobs``), which holds the identity and the trust file.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import nats.errors
import nats.js.errors

from meshjobs.client import Client
from meshjobs.durable import settle_stored
from meshjobs.envelope import result_body
from meshjobs.errors import MeshError, UsageError
from meshjobs.identity import IDENTITY_FILE, Identity, load_or_create
from meshjobs.router import Router
from meshjobs.runtime.app import App
from meshjobs.runtime.config import WorkerConfig
from meshjobs.trust.policy import TRUST_FILE, TrustPolicy, load_trust

DEFAULT_SERVER = "nats://127.0.0.1:4222"
F = TypeVar("F", bound=Callable[..., Any])


#: The largest deadline any option takes (a request, a discovery round, a drain): a day.
DAY_S = 86_400.0
#: The largest wait for durable results: a week, as long as a durable envelope may live.
WEEK_S = 7 * DAY_S


class Bounded(click.ParamType[float, Any]):
    """A finite number in a closed (or left-open) range, checked before a command does anything.

    ``click.FloatRange`` lets ``nan`` through every bound (every comparison
    with nan is false) and ``inf`` through an open upper end, so every float
    option of the CLI uses this type instead: non-numbers, nan, ±inf and
    values out of range are usage errors (exit 2) with one line naming the
    option.
    """

    name = "number"
    unit = ""

    def __init__(self, low: float, high: float, *, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            text = str(value).strip()
            try:
                number = float(text)
            except ValueError:
                self.fail(f"{text[:40]!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{str(value)[:40]!r} is not a finite number", param, ctx)
        if number < self.low or (self.low_open and number == self.low) or number > self.high:
            self.fail(f"{number:g} is out of range (expected {self.describe()})", param, ctx)
        return number

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        above = f"more than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"{above} and at most {self.high:g}{unit}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.name.upper()


class Seconds(Bounded):
    """A duration in seconds: finite, not negative (``positive``: above zero), at most *max*."""

    name = "seconds"
    unit = "seconds"

    def __init__(self, max: float, *, positive: bool = False) -> None:  # noqa: A002 — reads as Seconds(max=DAY_S)
        super().__init__(0.0, max, low_open=positive)


class Fraction(Bounded):
    """A number from 0 to 1 (a reputation score)."""

    name = "fraction"

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)


def home() -> Path:
    return Path(os.environ.get("MESHJOBS_HOME") or Path.home() / ".meshjobs").expanduser()


def fail(message: str, code: int) -> None:
    """Print the message and exit with *code*.

    Messages can carry peer-supplied text (a handler's error, a refusal's
    detail): control characters and bidi marks are shown escaped, and the
    lines of a multi-line message are indented, so none can pass for a line
    of its own.
    """
    from meshjobs.cli._render import safe_text

    lines = [safe_text(line, markup=False) for line in message.split("\n")]
    click.echo("meshjobs: " + "\n  ".join(lines), err=True)
    sys.exit(code)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine; expected failures become one line and their exit code."""
    try:
        return asyncio.run(coro)
    except MeshError as exc:
        result = getattr(exc, "result", None)
        if result is not None and getattr(click.get_current_context(), "meta", {}).get("json"):
            click.echo(json.dumps(result.record(), indent=2))
        fail(str(exc), exc.exit_code)
    except (nats.errors.ConnectionClosedError, nats.errors.StaleConnectionError) as exc:
        # A broker that went away under a command that had no translation for it: still one line, exit 3.
        fail(f"lost the connection to NATS: {exc}", 3)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        # JetStream that stayed unavailable past a command's retries (no leader, no quorum).
        fail(f"JetStream is not available: {exc}", 3)
    except nats.errors.TimeoutError:
        # A request to the broker or JetStream that no translation caught: one line, exit 3 as above.
        fail("NATS did not answer in time", 3)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def guarded(func: F) -> F:
    """Turn MeshError raised outside the event loop into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MeshError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def server_option(func: F) -> F:
    return click.option(
        "--server",
        envvar="MESHJOBS_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        help="NATS URL to connect to (env MESHJOBS_SERVER); comma-separate several.",
    )(func)


def identity_for_use() -> Identity:
    """Load the peer identity, creating one on first use (said on stderr)."""
    path = home() / IDENTITY_FILE
    identity, created = load_or_create(path)
    if created:
        click.echo(f"meshjobs: created identity {identity.public_key} at {path}", err=True)
    return identity


def servers(value: str) -> list[str]:
    """The comma-separated ``--server`` URLs, checked (a typo is "invalid URL", exit 2, not "no server answered")."""
    from meshjobs._nats import check_urls

    return check_urls([s.strip() for s in value.split(",") if s.strip()])


def load_app(spec: str) -> App:
    """Import ``module:attr`` (the current directory is importable, as with celery -A)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR (like workers.demo:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if isinstance(v, App))
        hint = f" (its meshjobs apps: {', '.join(public)})" if public else ""
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}{hint}")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise UsageError(f"{spec} is not a meshjobs App (got {type(app).__name__})")
    return app


def local_policy() -> TrustPolicy:
    """This peer's trust file, if it has one."""
    return load_trust(home() / TRUST_FILE, required=False)


async def open_router(client: Client) -> Router | None:
    """A router with reputation and quarantine, or None (with a warning) where JetStream is not reachable."""
    try:
        policy = local_policy()
        return await Router.open(client, policy.operators, policy.trust_services, policy.pretrusted)
    except (MeshError, nats.errors.Error, TimeoutError) as exc:
        click.echo(f"meshjobs: warning: reputation and quarantine unavailable: {exc}", err=True)
        return None


async def refuse_quarantined(client: Client, job_id: str, found: Any) -> None:
    """Raise ``quarantined`` when a durable job's stored result comes from a peer this home's policy refuses.

    A quarantined worker stops taking durable jobs, but one that ignores its
    quarantine can still answer them: its result is never shown.
    """
    router = await open_router(client)
    if router is None:
        return
    try:
        router.refuse(found[0].worker, f"job {job_id}")
    finally:
        await router.close()


def print_value(found: Any, as_json: bool, job_id: str) -> None:
    """Print a stored result like `submit` does, raising what a failure means."""
    result, frame = found
    if as_json:
        click.echo(
            json.dumps({"job_id": job_id, "result": result_body(frame), "signed_result": frame.decode()}, indent=2)
        )
    settle_stored(job_id, found)
    if not as_json:
        click.echo(json.dumps(result.value, ensure_ascii=False))


async def wait_showing_attempts(durable: Any, job_id: str, timeout: float) -> Any:
    """Like ``Durable.wait``, but say on stderr how each attempt went as it happens.

    A failing job is retried with growing delays before it is dead-lettered;
    without this the submitter sits silent through all of it.
    """
    from meshjobs.errors import JobTimeout

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: tuple[str, int, str] | None = None
    while (found := await durable.result(job_id)) is None:
        state = await durable.state(job_id)
        if state is not None and (now := (state.state, state.attempts, state.detail)) != seen:
            seen = now
            if state.state == "queued" and state.detail:
                click.echo(f"meshjobs: job {job_id}: {safe_line(state.detail)}", err=True)
            elif state.state == "running" and state.attempts > 1:
                click.echo(f"meshjobs: job {job_id}: attempt {state.attempts} running", err=True)
        if loop.time() >= deadline:
            raise JobTimeout(f"job {job_id} has no result after {timeout:g} s (it stays queued)")
        await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))
    return found


def safe_line(text: str) -> str:
    """Peer-supplied text for a plain line on the terminal (controls and bidi marks escaped)."""
    from meshjobs.cli._render import safe_text

    return safe_text(text, markup=False)


#: The options every command that runs a worker takes (worker, persona, celery-bridge).
_WORKER_OPTIONS = (
    click.option("--concurrency", "-c", type=click.IntRange(1, 10000), default=16, show_default=True,
                 help="Jobs run at once."),
    click.option("--name", help="Display name in discovery [default: the app's name]."),
    click.option("--region", default="", help="Region this worker claims (an operator's attestation makes it count)."),
    click.option("--community", default="", help="Community this worker claims (attested likewise)."),
    click.option("--attestation", "attestations", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="An operator's signed attestation of this worker (from `meshjobs attest`; repeatable)."),
    click.option("--price", type=Bounded(0.0, 1e9), default=0.0, show_default=True,
                 help="What this worker asks per job, in its signed manifest (submit --max-price filters)."),
    click.option("--trust", "trust_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="Trust file [default: MESHJOBS_HOME/trust.toml]."),
    click.option("--drain-timeout", type=Seconds(max=DAY_S), default=30.0, show_default=True,
                 help="Seconds to finish in-flight jobs on SIGTERM."),
    click.option("--max-attempts", type=click.IntRange(1, 100), default=5, show_default=True,
                 help="Runs of a failing durable job before it goes to the dead-letter queue."),
    click.option("--retry-delay", type=Seconds(max=DAY_S), default=1.0, show_default=True,
                 help="Seconds before a failed durable job runs again; doubles each time."),
)  # fmt: skip


#: ``--metrics-port`` / ``--metrics-host``: a Prometheus endpoint for long-running commands.
_METRICS_OPTIONS = (
    click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                 help="Serve Prometheus metrics on this port (0: any free one) [default: off]."),
    click.option("--metrics-host", default="127.0.0.1", show_default=True,
                 help="Address the metrics endpoint binds (loopback keeps it private)."),
)  # fmt: skip


def metrics_options(func: F) -> F:
    """Add --metrics-port and --metrics-host; start the endpoint with :func:`start_metrics`."""
    for option in reversed(_METRICS_OPTIONS):
        func = option(func)
    return func


def start_metrics(port: int | None, host: str) -> Any:
    """Serve this process's metrics when *port* is given (said on stderr with the URL); None otherwise."""
    if port is None:
        return None
    from meshjobs.observe.metrics import serve_metrics

    server = serve_metrics(port, host)
    click.echo(f"meshjobs: metrics at {server.url}", err=True)
    return server


def worker_options(func: F) -> F:
    """Add the worker options (and --server) to a command; read them back with :func:`worker_setup`."""
    for option in reversed((*_WORKER_OPTIONS, *_METRICS_OPTIONS, server_option)):
        func = option(func)
    return func


def read_attestation(path: Path) -> bytes:
    """An attestation file (public, small; any reader may see it) as its bytes, stripped."""
    from meshjobs._files import read_local_file
    from meshjobs.manifest import MAX_ATTESTATION_BYTES

    try:
        data = read_local_file(
            path, what="attestation file", max_bytes=MAX_ATTESTATION_BYTES, care="plain", error=UsageError
        )
    except FileNotFoundError:
        raise UsageError(f"attestation file {path} does not exist") from None
    return data.strip()


def worker_setup(opts: dict[str, Any]) -> tuple[Identity, TrustPolicy, WorkerConfig, list[str]]:
    """The identity, trust policy, worker config and server URLs the worker options ask for."""
    logging.getLogger("meshjobs").setLevel(min(logging.getLogger().level, logging.INFO))
    urls = servers(opts["server"])
    trust_file = opts["trust_file"]
    policy = load_trust(trust_file or home() / TRUST_FILE, required=trust_file is not None)
    config = WorkerConfig(
        concurrency=opts["concurrency"],
        name=opts["name"],
        region=opts["region"],
        community=opts["community"],
        drain_timeout_s=opts["drain_timeout"],
        max_attempts=opts["max_attempts"],
        retry_delay_s=opts["retry_delay"],
        price=opts["price"],
        attestations=tuple(read_attestation(p) for p in opts["attestations"]),
    )
    identity = identity_for_use()
    # Before the worker exists: a worker built without an observer reports to the process's metrics.
    start_metrics(opts["metrics_port"], opts["metrics_host"])
    return identity, policy, config, urls
