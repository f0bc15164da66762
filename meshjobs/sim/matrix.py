"""The numbers of issue 11, item 8: every scenario times several seeds, one run at a time, as a table.

``python -m meshjobs.sim.matrix --out runs.jsonl`` runs ``meshjobs sim --json``
for each scenario and seed (40 peers, 30% malicious, 300 jobs by default),
one after the other (each run uses the whole machine), appending every report
to ``--out`` as one JSON line. Runs already in the file are not repeated, so
an interrupted matrix resumes where it stopped, and ``--table-only`` just
prints the table from the file. The table (Markdown, for the README) holds
per scenario the means, and the worst run where the target is per run.
``--collude`` runs colluding camouflage and long-con cheaters (``meshjobs sim
--collude``), ``--role-aware`` cheaters that guess when they are checked
(``meshjobs sim --role-aware``); their rows are marked so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Any

from meshjobs.sim.report import CATCH_ALL, label
from meshjobs.sim.scenarios import COLLUDING, SCENARIOS

#: (column title, key in :func:`reduce`'s result, target as the issue states it)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("wrong (mean)", "wrong_rate", "<= 1%"),
    ("runs/job (mean)", "executions_per_job", "<= 1.5"),
    ("honest share (min)", "honest_work_share", ">= 95%"),
    ("pre-trusted share (max)", "pretrusted_work_share", "<= 30%"),
    ("honest used (min)", "honest_peers_used", ">= 80%"),
    ("honest quarantined (max)", "honest_quarantined", "0"),
    ("cheaters quarantined (min)", "caught", ">= 90%*"),
    ("failed (mean)", "failed_rate", "-"),
)


def reduce(runs: list[dict[str, Any]]) -> dict[str, float]:
    """One scenario's runs reduced as the targets are stated: means for rates, worst run for per-run bounds."""
    caught = [r["malicious_quarantined"] / r["malicious"] if r["malicious"] else 1.0 for r in runs]
    return {
        "wrong_rate": mean(r["wrong_rate"] for r in runs),
        "executions_per_job": mean(r["executions_per_job"] for r in runs),
        "honest_work_share": min(r["honest_work_share"] for r in runs),
        "pretrusted_work_share": max(r["pretrusted_work_share"] for r in runs),
        "honest_peers_used": min(r["honest_peers_used"] for r in runs),
        "honest_quarantined": max(r["honest_quarantined"] for r in runs),
        "caught": min(caught),
        "failed_rate": mean(r.get("failed_rate", 0.0) for r in runs),
    }


def passes(scenario: str, values: dict[str, float]) -> list[str]:
    """The targets a scenario's reduced values miss."""
    missed = []
    checks = {
        "wrong_rate": values["wrong_rate"] <= 0.01,
        "executions_per_job": values["executions_per_job"] <= 1.5,
        "honest_work_share": values["honest_work_share"] >= 0.95,
        "pretrusted_work_share": values["pretrusted_work_share"] <= 0.30,
        "honest_peers_used": values["honest_peers_used"] >= 0.80,
        "honest_quarantined": values["honest_quarantined"] == 0,
        "caught": scenario not in CATCH_ALL or values["caught"] >= 0.9,
    }
    for name, ok in checks.items():
        if not ok:
            missed.append(name)
    return missed


def _cell(name: str, value: float) -> str:
    if name == "executions_per_job":
        return f"{value:.2f}"
    if name == "honest_quarantined":
        return f"{value:g}"
    return f"{value:.1%}"


#: The cheaters' options a row stands for, as the report carries them: (collude, role_aware).
Variant = tuple[bool, bool]
VARIANTS: tuple[Variant, ...] = ((False, False), (True, False), (False, True), (True, True))


def variant(report: dict[str, Any]) -> Variant:
    return bool(report.get("collude")), bool(report.get("role_aware"))


def markdown(reports: list[dict[str, Any]]) -> str:
    """The README table: one row per scenario and variant, a mark on every cell that misses its target."""
    by_scenario: dict[tuple[str, Variant], list[dict[str, Any]]] = {}
    for report in reports:
        by_scenario.setdefault((report["scenario"], variant(report)), []).append(report)
    header = ["scenario", "runs", *(f"{title} [{target}]" for title, _, target in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario, of in [(s, v) for s in SCENARIOS for v in VARIANTS if (s, v) in by_scenario]:
        runs = by_scenario[scenario, of]
        values = reduce(runs)
        missed = set(passes(scenario, values))
        cells = [f"{_cell(key, values[key])}{' ✗' if key in missed else ''}" for _, key, _ in COLUMNS]
        lines.append("| " + " | ".join([label(runs[0]), str(len(runs)), *cells]) + " |")
    first = reports[0] if reports else {}
    lines.append("")
    lines.append(
        f"{first.get('peers', '?')} peers ({first.get('malicious', '?')} malicious, {first.get('pretrusted', 0)} "
        f"pre-trusted), {first.get('jobs', '?')} jobs per run; ✗ marks a missed target; * only for "
        f"{' and '.join(CATCH_ALL)}."
    )
    return "\n".join(lines)


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshjobs.sim.matrix", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file: one report per run (resumable)")
    parser.add_argument("--scenarios", help="comma-separated (default: all; with --collude, camouflage,long-con)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    parser.add_argument("--peers", type=int, default=40)
    parser.add_argument("--malicious", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--pretrusted", type=int, default=3)
    parser.add_argument("--collude", action="store_true", help="colluding cheaters (camouflage and long-con only)")
    parser.add_argument("--role-aware", action="store_true", help="cheaters that guess when they are checked")
    parser.add_argument("--table-only", action="store_true", help="print the table from --out; run nothing")
    args = parser.parse_args(argv)
    scenarios = (args.scenarios or ",".join(COLLUDING if args.collude else SCENARIOS)).split(",")
    if args.collude and (others := [s for s in scenarios if s not in COLLUDING]):
        parser.error(f"--collude applies to {' and '.join(COLLUDING)}, not {', '.join(others)}")
    done = {(r["scenario"], r["seed"], variant(r)) for r in load(args.out)}
    wanted: Variant = (args.collude, args.role_aware)
    for scenario in scenarios:
        for seed in range(1, args.seeds + 1):
            if args.table_only or (scenario, seed, wanted) in done:
                continue
            command = [
                sys.executable, "-m", "meshjobs", "sim", "--json", "--scenario", scenario, "--seed", str(seed),
                "--peers", str(args.peers), "--malicious", str(args.malicious), "--jobs", str(args.jobs),
                "--pretrusted", str(args.pretrusted), *(["--collude"] if args.collude else []),
                *(["--role-aware"] if args.role_aware else []),
            ]  # fmt: skip
            print(f"run: {scenario} seed {seed}", file=sys.stderr, flush=True)
            out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if out.returncode not in (0, 4) or not out.stdout.strip():
                print(f"  failed ({out.returncode}): {out.stderr.strip()[-500:]}", file=sys.stderr)
                continue
            report = json.loads(out.stdout)
            report.pop("detail", None)
            with args.out.open("a") as handle:
                handle.write(json.dumps(report) + "\n")
            print(f"  wrong {report['wrong_rate']:.2%}, {report['executions_per_job']:.2f} runs/job, "
                  f"{report['seconds']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    print(markdown(load(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
