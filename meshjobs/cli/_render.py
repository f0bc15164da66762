"""Human-readable output (rich tables). Scripts use ``--json`` instead.

Whatever a peer chose (names, descriptions, regions, capabilities, reasons,
details) goes through :func:`safe_text` before it reaches a terminal, here and
in every plain listing: a name must not be able to clear the screen, recolour
or hide text (rich markup, ANSI escapes) or reorder what follows it (bidi
overrides).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshjobs.discovery import PeerInfo
from meshjobs.infra.mesh import MeshHealth

#: C0 controls (ESC, CR, BS, ...), DEL and C1 controls (CSI is 0x9b): shown as \xNN.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
#: Bidi embeddings, overrides and isolates, direction marks, line and paragraph separators: shown as \uNNNN.
_INVISIBLE = (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = {**_CONTROLS, **{c: f"\\u{c:04x}" for c in _INVISIBLE}}


def safe_text(value: object, *, markup: bool = True) -> str:
    """Peer-supplied text made safe to print: controls and bidi marks as visible escapes (``\\x1b``,
    ``\\u202e``), and with *markup* (text headed for rich) rich markup escaped too.

    Use ``markup=False`` for plain ``click.echo`` output, where brackets are just brackets.
    """
    text = str(value).translate(_ESCAPES)
    return escape(text) if markup else text


def short_key(key: str) -> str:
    """Enough of a peer key to tell peers apart in a table; ``--json`` has it whole."""
    return key[:12] + "…" if len(key) > 12 else key


def narrow_table(title: str, columns: list[tuple[str, int | None]], rows: list[list[str]], width: int) -> Table:
    """A table that fits *width* (80 columns and up) without breaking a header word ("commun|ity").

    *columns* are (header, width limit); every column but the one whose limit
    is None gets a fixed width — its longest line, at least its header, and
    at most its limit when the longest lines would not fit — so rich never
    squeezes it; the unlimited column takes what is left and folds its cells.
    Rows are cells already made safe.
    """
    longest = [
        max([len(header), *(len(line) for row in rows for line in row[i].split("\n"))])
        for i, (header, _) in enumerate(columns)
    ]
    wide = next(i for i, (_, limit) in enumerate(columns) if limit is None)
    gaps = 3 * (len(columns) - 1)  # padding and separator between columns
    roomy = sum(w for i, w in enumerate(longest) if i != wide) + len(columns[wide][0]) + gaps <= width
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, (header, limit) in enumerate(columns):
        if limit is None:
            table.add_column(header, min_width=len(header), overflow="fold")
        else:
            table.add_column(
                header, width=longest[i] if roomy else max(len(header), min(longest[i], limit)), overflow="fold"
            )
    for row in rows:
        table.add_row(*row)
    return table


def _trust_cell(row: dict[str, Any]) -> str:
    state = "quarantined" if row.get("quarantined") else "auto-quar." if row.get("auto_quarantined") else ""
    return f"{row['score']:.2f}" + (f"\n{state}" if state else "")


def peers_table(peers: Iterable[PeerInfo | dict[str, Any]], console: Console | None = None) -> None:
    """One row per worker process; a trust column when the rows carry scores. Fits 80 columns."""
    console = console or Console()
    rows = [p.as_dict() if isinstance(p, PeerInfo) else p for p in peers]
    if not rows:
        console.print("no peers answered discovery")
        return
    scored = any("score" in r for r in rows)
    # region/community share a column, score and quarantine another: 80 columns hold the table.
    # ✓ marks what an operator attested; the rest is the peer's own claim.
    columns: list[tuple[str, int | None]] = [("peer", 13), ("name", 10), ("kind", 7), ("where", 11)]
    columns += [("trust", 11)] if scored else []
    cells = []
    for r in rows:
        attested = set(r.get("attested", ()))

        def mark(field: str, r: dict[str, Any] = r, attested: set[str] = attested) -> str:
            return safe_text(r[field]) + ("✓" if field in attested else "")

        where = "/".join(mark(c) for c in ("region", "community") if r[c]) or "-"
        row = [safe_text(short_key(r["peer"])), safe_text(r["name"] or "-"), mark("kind") if r["kind"] else "-", where]
        row += [_trust_cell(r)] if scored else []
        cells.append([*row, ", ".join(safe_text(c) for c in r["capabilities"])])
    title = f"{len(rows)} worker process(es)" + (
        "; ✓ attested by an operator" if any(r.get("attested") for r in rows) else ""
    )
    console.print(narrow_table(title, [*columns, ("capabilities", None)], cells, console.width))


def jobs_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Durable jobs (``JobState.as_dict()`` rows), oldest first. Job ids stay whole, for copying."""
    console = console or Console()
    if not rows:
        console.print("no durable jobs")
        return
    columns: list[tuple[str, int | None]] = [("job", 32), ("state", 7), ("capability", 16), ("tries", 5)]
    cells = [
        [safe_text(r["job_id"]), safe_text(r["state"]), safe_text(r["capability"]), str(r["attempts"]),
         safe_text(r["detail"] or "-")]
        for r in rows
    ]  # fmt: skip
    console.print(narrow_table(f"{len(rows)} durable job(s)", [*columns, ("detail", None)], cells, console.width))


def dlq_table(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Dead letters: job id, capability, attempts, reason."""
    console = console or Console()
    if not rows:
        console.print("the dead-letter queue is empty")
        return
    cells = [
        [safe_text(r["job_id"]), safe_text(r["capability"]), str(r["attempts"]), safe_text(r["reason"])] for r in rows
    ]
    columns: list[tuple[str, int | None]] = [("job", 32), ("capability", 16), ("tries", 5), ("reason", None)]
    console.print(narrow_table(f"{len(rows)} dead job(s)", columns, cells, console.width))


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr when it is a terminal (nothing otherwise); yields ``advance(n)``.

    Scripts that read stdout (or a log that captures stderr) never see bar
    redraws; people at a terminal see the work move.
    """
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def status(description: str) -> Iterator[Callable[[str], None]]:
    """A spinner with a changing line on stderr when it is a terminal; yields ``update(text)``."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    console = Console(stderr=True)
    with console.status(description) as spinner:
        yield lambda text: spinner.update(f"{description}: {safe_text(text)}")


def mesh_table(health: MeshHealth, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title_justify="left", title=f"JetStream meta leader: {safe_text(health.meta_leader or 'none')}")
    for column in ("server", "role", "region", "status", "routes", "gateways", "leaf links", "clients"):
        table.add_column(column)
    for s in health.servers:
        status = "[green]ok[/]" if s.up and not s.problems else f"[red]{safe_text('; '.join(s.problems))}[/]"
        table.add_row(
            safe_text(s.name) + (" ★" if s.name == health.meta_leader else ""),
            safe_text(s.role),
            safe_text(s.region),
            status,
            safe_text(", ".join(s.routes) or "-"),
            safe_text(", ".join(s.gateways) or "-"),
            str(s.leafnodes),
            str(s.connections),
        )
    console.print(table)
