"""Rough edges a new user hit (issue 14), each pinned: one clear line and the documented exit code."""

from __future__ import annotations

import io
import socket
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from meshjobs.cli import main
from meshjobs.cli._render import dlq_table, jobs_table, peers_table

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def invoke(home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": None})


def one_line(result: Result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_worker_names_the_missing_attribute(home: Path) -> None:
    one_line(invoke(home, "worker", "workers.demo:missing"), 2, "module 'workers.demo' has no attribute 'missing'")
    one_line(
        invoke(home, "worker", "workers.demo:asyncio"), 2, "workers.demo:asyncio is not a meshjobs App (got module)"
    )


@pytest.mark.parametrize("command", [["peers"], ["submit", "demo.add"], ["worker", "workers.demo:app"], ["doctor"]])
@pytest.mark.parametrize("url", ["foo://bar", "nats://:4222", "nats://host:99999", "nats://ok:4222,http://x"])
def test_a_bad_server_url_is_invalid_not_unanswered(home: Path, command: list[str], url: str) -> None:
    result = invoke(home, *command, "--server", url)
    one_line(result, 2, "invalid URL")
    assert "no server answered" not in result.output


@pytest.mark.parametrize("command", [["keygen"], ["id"], ["up"]])
def test_commands_that_talk_to_no_broker_take_no_server(home: Path, command: list[str]) -> None:
    result = invoke(home, *command, "--server", "nats://127.0.0.1:4222")
    assert result.exit_code == 2 and "No such option '--server'" in result.output


def test_up_on_a_taken_port_says_so(home: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(home, "up", "--port", str(port), "--monitor-port", "0", "--store", str(tmp_path / "s"))
    one_line(result, 2, f"port {port} on 127.0.0.1 is taken (is another `meshjobs up` running?)")
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_submit_wait_without_durable_is_refused(home: Path) -> None:
    one_line(invoke(home, "submit", "demo.add", "--wait", "5"), 2, "--wait applies to --durable jobs")


def render(table: object, rows: list[dict[str, object]], width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), width=width)
    table(rows, console)  # type: ignore[operator]
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue().splitlines()


LONG = "a-very-long-name-" * 4


@pytest.mark.parametrize("scored", [False, True])
def test_peers_headers_do_not_wrap_at_80_columns(scored: bool) -> None:
    row: dict[str, object] = {
        "peer": "U" + "B" * 55, "name": LONG, "kind": "system", "region": "eu-central", "community": "garage",
        "capabilities": [f"cap{i}.{LONG}" for i in range(6)],
    }  # fmt: skip
    if scored:
        row |= {"score": 0.5, "quarantined": False}
    lines = render(peers_table, [row])
    header = next(line for line in lines if line.strip().startswith("peer"))
    words = header.split()
    assert words == ["peer", "name", "kind", "where"] + (["trust"] if scored else []) + ["capabilities"]
    assert all(len(line) <= 80 for line in lines)
    assert any("UBBBBBBBBBBB…" in line for line in lines)  # the short key stays on one line


def test_job_tables_fit_80_columns() -> None:
    job = {"job_id": "0" * 32, "state": "queued", "capability": "demo.fail", "attempts": 2, "detail": LONG * 2}
    lines = render(jobs_table, [job])
    assert next(line for line in lines if "job" in line and "state" in line).split() == [
        "job", "state", "capability", "tries", "detail",
    ]  # fmt: skip
    dead = {"job_id": "1" * 32, "capability": "demo.fail", "attempts": 5, "reason": LONG}
    lines += render(dlq_table, [dead])
    assert all(len(line) <= 80 for line in lines)
    assert render(jobs_table, []) == ["no durable jobs"] and render(dlq_table, []) == ["the dead-letter queue is empty"]


def test_packaging_metadata_uses_an_spdx_license() -> None:
    """setuptools >= 77 warns (during `make demo`'s install) about license tables and License classifiers."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    assert not [c for c in project["project"].get("classifiers", []) if c.startswith("License ::")]
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])


def test_progress_stays_off_a_non_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from meshjobs.cli._render import progress, status

    assert not sys.stderr.isatty()
    with progress("jobs done", total=3) as advance, status("mesh up") as update:
        advance(3)
        update("starting eu-1")
    assert capsys.readouterr() == ("", "")
