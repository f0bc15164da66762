"""The command line without a broker: identity files, input checks, one-line failures, exit codes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from meshjobs.cli import main
from meshjobs.identity import IDENTITY_FILE, is_public_key


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def invoke(home: Path, *args: str) -> Result:
    env = {"MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": None}
    return CliRunner().invoke(main, list(args), env=env)


def one_line_failure(result: Result, code: int, text: str) -> None:
    """What a user sees for an expected failure: the exit code, one line on stderr, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshjobs: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_keygen_writes_a_private_key_and_id_shows_it(home: Path) -> None:
    made = invoke(home, "keygen")
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert is_public_key(key)
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600
    assert invoke(home, "id").stdout.strip() == key
    shown = invoke(home, "id", "--json")
    assert json.loads(shown.stdout) == {"peer": key, "path": str(home / IDENTITY_FILE)}


def test_keygen_never_replaces_a_key_unless_forced(home: Path) -> None:
    first = invoke(home, "keygen").stdout.strip()
    seed = (home / IDENTITY_FILE).read_bytes()
    one_line_failure(invoke(home, "keygen"), 2, "already exists; use --force")
    assert (home / IDENTITY_FILE).read_bytes() == seed
    forced = invoke(home, "keygen", "--force")
    assert forced.exit_code == 0 and forced.stdout.strip() != first
    assert invoke(home, "id").stdout.strip() == forced.stdout.strip()
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600


def test_id_without_a_key_says_how_to_make_one(home: Path) -> None:
    one_line_failure(invoke(home, "id"), 2, "meshjobs keygen")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["demo.add", '{"a": 1, "a": 2}'], "duplicate key 'a'"),
        (["demo.add", '{"a": NaN}'], "NaN is not allowed"),
        (["demo.add", "[1, 2]"], "must be a JSON object"),
        (["demo.add", "{oops"], "invalid JSON"),
        (["Demo.Add"], "invalid capability 'Demo.Add'"),
        (["demo.*"], "invalid capability"),
        (["mesh.cmd"], "reserved"),
        (["demo.add", "--replicas", "2", "--quorum", "3"], "quorum 3 must be between 1 and replicas (2)"),
        (["demo.add", "--wait", "5"], "--wait applies to --durable jobs"),
        (["demo.add", "--durable", "--region", "eu"], "routing options do not apply"),
    ],
)
def test_submit_refuses_bad_input_before_connecting(home: Path, args: list[str], text: str) -> None:
    # No broker listens there: reaching the network would exit 3, not 2.
    one_line_failure(invoke(home, "submit", *args, "--server", "nats://127.0.0.1:1"), 2, text)


def test_submit_without_a_broker_exits_3(home: Path) -> None:
    invoke(home, "keygen")
    result = invoke(home, "submit", "demo.add", '{"a": 2, "b": 3}', "--server", "nats://127.0.0.1:1")
    one_line_failure(result, 3, "cannot connect to NATS at nats://127.0.0.1:1")


def test_submit_creates_an_identity_on_first_use_and_says_so(home: Path) -> None:
    result = invoke(home, "submit", "demo.add", "--server", "nats://127.0.0.1:1")
    assert result.exit_code == 3
    assert "meshjobs: created identity U" in result.stderr
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("spec", "text"), [("nope", "expected MODULE:ATTR"), ("no_such_module_xyz:app", "cannot import")]
)
def test_worker_with_a_bad_app_spec_exits_2(home: Path, spec: str, text: str) -> None:
    one_line_failure(invoke(home, "worker", spec), 2, text)


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("path", commands(main), ids=lambda p: " ".join(p) or "meshjobs")
def test_every_command_has_help(home: Path, path: tuple[str, ...]) -> None:
    result = invoke(home, *path, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ") and f"main {' '.join(path)}".strip() in result.stdout
    assert not home.exists()  # asking for help creates nothing


def test_version(home: Path) -> None:
    result = invoke(home, "--version")
    assert result.exit_code == 0 and result.stdout.startswith("meshjobs, version ")
