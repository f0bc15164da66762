"""The numbers of a simulation run, from ground truth. Pure: no network, no processes.

Ground truth is what the harness knows and the mesh does not: which peers
cheat, the honest value of every job, and the execution log every simulated
peer appends to on each run of its handler. Definitions (issue 11):

- ``wrong_rate``: jobs whose value, as returned to the submitter, differs
  from the honest value, over jobs finished (a job that failed returned no
  value: it counts in ``failed_rate``, not here);
- ``executions_per_job``: handler runs for the submitter's jobs (from the
  log, the authoritative count) over jobs finished;
  ``executions_reported_per_job`` is what ``Submitted.executions`` said, over answered jobs (compare
  ``executions_per_answered_job``; ``execution_count_mismatches`` counts answered jobs where they differ);
- ``honest_work_share``: the honest peers' share of all executions over
  their fair share (their fraction of the peers), capped at 1 — "honest peers
  do at least 95% of their fair share" is ``honest_work_share >= 0.95``;
  ``honest_work_ratio`` is the same uncapped (above 1 when cheaters lose work);
- ``pretrusted_work_share``: the pre-trusted peers' share of all executions;
- ``honest_peers_used``: the fraction of honest peers (pre-trusted ones
  included) that ran at least one job;
- ``malicious_quarantined``, ``honest_quarantined``: peers quarantined at the
  end (by the trust service's signed records, or an operator order).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from meshjobs.sim.scenarios import Plan, expected

#: The acceptance targets of issue 11, item 8: (field, comparison, bound).
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("wrong_rate", "<=", 0.01),
    ("executions_per_job", "<=", 1.5),
    ("honest_work_share", ">=", 0.95),
    ("pretrusted_work_share", "<=", 0.30),
    ("honest_peers_used", ">=", 0.80),
    ("honest_quarantined", "<=", 0),
)
#: Scenarios in which at least 90% of the cheaters must end quarantined.
CATCH_ALL = ("always-wrong", "camouflage")


@dataclass
class JobResult:
    """What the submitter saw for one job."""

    task: int
    value: Any = None
    worker: str | None = None
    executions: int | None = None
    """As ``Submitted.executions`` reported it (None: the field is missing)."""
    error: str | None = None
    seconds: float = 0.0


def parse_log(text: str) -> list[dict[str, Any]]:
    """The execution log's lines; a torn last line (a killed process) is skipped."""
    lines = []
    for raw in text.splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            lines.append(item)
    return lines


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def summarize(
    plan: Plan,
    results: list[JobResult],
    executions: list[dict[str, Any]],
    *,
    submitter: str,
    quarantined: set[int],
    jobs: int,
) -> dict[str, Any]:
    """Every number of a run (see the module docstring), as one JSON-ready object."""
    finished = len(results)
    answered = [r for r in results if r.error is None]
    wrong = [r for r in answered if r.value != expected(plan.seed, r.task)]
    mine = [e for e in executions if e.get("submitter") == submitter and 0 <= int(e.get("task", -1)) < jobs]
    per_peer = Counter(int(e["peer"]) for e in mine)
    per_task = Counter(int(e["task"]) for e in mine)
    total = len(mine)
    honest, bad, anchors = plan.honest, plan.malicious, plan.pretrusted
    honest_runs = sum(n for p, n in per_peer.items() if p in honest)
    fair = _share(len(honest), plan.peers)
    ratio = _share(_share(honest_runs, total), fair)
    reported = [r.executions for r in results if r.executions is not None]
    mismatched = sum(1 for r in results if r.executions is not None and r.executions != per_task.get(r.task, 0))
    errors = Counter((r.error or "").split(":", 1)[0] for r in results if r.error is not None)
    return {
        "wrong_rate": round(_share(len(wrong), finished), 4),
        "executions_per_job": round(_share(total, finished), 4),
        "honest_work_share": round(min(ratio, 1.0), 4),
        "honest_work_ratio": round(ratio, 4),
        "pretrusted_work_share": round(_share(sum(per_peer[p] for p in anchors), total), 4),
        "honest_peers_used": round(_share(sum(1 for p in honest if per_peer[p]), len(honest)), 4),
        "honest": len(honest),
        "malicious": len(bad),
        "pretrusted": len(anchors),
        "malicious_quarantined": len(quarantined & bad),
        "honest_quarantined": len(quarantined & honest),
        "jobs": jobs,
        "jobs_finished": finished,
        "answered": len(answered),
        "wrong": len(wrong),
        "failed": finished - len(answered),
        "failed_rate": round(_share(finished - len(answered), finished), 4),
        "errors": dict(sorted(errors.items())),
        "executions": total,
        "malicious_executions": sum(n for p, n in per_peer.items() if p in bad),
        "executions_per_answered_job": round(_share(sum(per_task[r.task] for r in answered), len(answered)), 4),
        "executions_reported_per_job": round(_share(sum(reported), len(reported)), 4) if reported else None,
        "execution_count_mismatches": mismatched,
        "other_executions": len(executions) - total,
        "max_peer_executions": max(per_peer.values(), default=0),
    }


def check(report: dict[str, Any]) -> list[str]:
    """The acceptance targets *report* misses, one line each (empty: all met)."""
    missed = []
    for name, op, bound in TARGETS:
        value = report.get(name)
        if value is None or (value > bound if op == "<=" else value < bound):
            missed.append(f"{name} = {value} (target {op} {bound:g})")
    if report.get("scenario") in CATCH_ALL and report["malicious"]:
        caught = report["malicious_quarantined"] / report["malicious"]
        if caught < 0.9:
            missed.append(f"malicious quarantined = {caught:.0%} (target >= 90% in {report['scenario']})")
    return missed


def label(report: dict[str, Any]) -> str:
    """The scenario a report ran, with the cheaters' options: ``long-con (colluding, role-aware)``."""
    traits = [t for t, on in (("colluding", report.get("collude")), ("role-aware", report.get("role_aware"))) if on]
    return f"{report['scenario']} ({', '.join(traits)})" if traits else str(report["scenario"])
