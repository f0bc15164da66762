"""Peer-supplied text reaches the terminal escaped: no markup, no ANSI, no bidi tricks, no forged lines."""

from __future__ import annotations

import io

import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from rich.console import Console

from meshjobs.cli._render import mesh_table, peers_table, safe_text
from meshjobs.discovery import PeerInfo
from meshjobs.infra.mesh import MeshHealth, ServerHealth

EVIL = "\x1b[2J[red]evil[/red]\u202e"
SHOWN = "\\x1b[2J[red]evil[/red]\\u202e"


def console() -> Console:
    # A colour terminal, as a user would have: markup would turn into styles, ESC would reach the screen.
    return Console(file=io.StringIO(), record=True, width=400, force_terminal=True, color_system="truecolor")


def raw_output(c: Console) -> str:
    assert isinstance(c.file, io.StringIO)
    return c.file.getvalue()


def test_safe_text() -> None:
    assert safe_text(EVIL, markup=False) == SHOWN
    assert safe_text("ok name-1 ünïcödé 名前 👍") == "ok name-1 ünïcödé 名前 👍"
    controls = "\x00\x07\x08\t\n\r\x7f\x85\x9b\u061c\u200e\u200f\u2028\u2029\u202a\u202d\u2066\u2069"
    shown = safe_text(controls, markup=False)
    assert shown.isprintable() and shown.startswith("\\x00\\x07\\x08\\x09\\x0a\\x0d\\x7f\\x85\\x9b\\u061c")
    assert shown.endswith("\\u202a\\u202d\\u2066\\u2069")
    assert safe_text("[bold]x[/bold]") == "\\[bold]x\\[/bold]"
    assert safe_text(3.5) == "3.5"


@pytest.mark.parametrize("scored", [False, True])
def test_peers_table_shows_a_hostile_name_escaped(scored: bool) -> None:
    peer = PeerInfo(
        peer="U" + "A" * 55, name=EVIL, kind="system", region=EVIL, community="[link=http://x]c[/link]",
        instance="i1", version="1", capabilities=("demo.add", EVIL),
    )  # fmt: skip
    row = peer.as_dict() | ({"score": 0.5, "quarantined": False} if scored else {})
    c = console()
    peers_table([row], c)
    raw, text = raw_output(c), c.export_text(styles=False)
    assert "\x1b[2J" not in raw and "\u202e" not in raw  # styles from rich itself are fine; the peer's are not
    assert text.count(SHOWN) == 3 and "[link=http://x]c[/link]" in text
    assert "evil[/red]" in text  # the markup is shown as typed, not applied


def test_mesh_table_escapes_server_text() -> None:
    server = ServerHealth(name=EVIL, role="hub", region="[red]r", up=False, routes=[EVIL], problems=[EVIL])
    c = console()
    mesh_table(MeshHealth([server]), c)
    raw, text = raw_output(c), c.export_text(styles=False)
    assert "\x1b[2J" not in raw and "\u202e" not in raw
    assert text.count(SHOWN) == 3 and "[red]r" in text


def test_failures_print_peer_text_escaped_on_lines_of_their_own() -> None:
    """A handler's error message travels to the submitter's terminal through fail()."""
    import click

    from meshjobs.cli._common import guarded
    from meshjobs.errors import HandlerError

    @click.command()
    @guarded
    def boom() -> None:
        raise HandlerError(f"handler failed: {EVIL}\nmeshjobs: all good, exit 0")

    out = CliRunner().invoke(boom, [])
    assert out.exit_code == 1
    assert out.output == f"meshjobs: handler failed: {SHOWN}\n  meshjobs: all good, exit 0\n"


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (nats.js.errors.ServiceUnavailableError, "meshjobs: JetStream is not available: "),
        (nats.errors.NoRespondersError, "meshjobs: JetStream is not available: "),
        (nats.errors.TimeoutError, "meshjobs: NATS did not answer in time"),
    ],
)
def test_a_broker_that_does_not_answer_is_one_line_exit_3(error: type[Exception], said: str) -> None:
    """A 503 or a timeout from NATS past a command's retries is a broker problem, not a traceback."""
    import click

    from meshjobs.cli._common import run

    async def unanswered() -> None:
        raise error()

    @click.command()
    def look() -> None:
        run(unanswered())

    out = CliRunner().invoke(look, [])
    assert out.exit_code == 3
    assert out.output.startswith(said) and out.output.count("\n") == 1
