"""`meshjobs sim` end to end: a small run through the CLI, and a clean stop on Ctrl-C.

Each run starts its own embedded broker, trust service and worker processes
(under a private TMPDIR here, so the test can check that nothing is left).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshjobs.sim.scenarios import expected
from tests.conftest import REPO, cli_env

FIELDS = (
    "wrong_rate", "executions_per_job", "honest_work_share", "pretrusted_work_share", "honest_peers_used",
    "honest", "malicious", "malicious_quarantined", "honest_quarantined", "jobs", "seconds",
    "scenario", "seed", "peers", "pretrusted",
)  # fmt: skip


def leftovers(tmp: Path) -> list[str]:
    """Processes whose command line names a path under *tmp* (the run's broker and hosts do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(tmp) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def sim(tmp: Path, home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshjobs", "sim", *args],
        env=cli_env(home, TMPDIR=str(tmp)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sim_json(tmp: Path, home: Path, *args: str) -> dict[str, Any]:
    """A run under a private TMPDIR (*tmp*, created here) that must succeed; its JSON report."""
    tmp.mkdir()
    out = sim(tmp, home, *args, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_small_run_reports_consistent_numbers(tmp_path: Path, home: Path) -> None:
    tmp = tmp_path / "tmp"
    args = ("--peers", "8", "--malicious", "0.375", "--jobs", "40", "--seed", "3", "--processes", "2")
    report = sim_json(tmp, home, *args, "--scenario", "always-wrong", "--rate", "50")
    assert not [f for f in FIELDS if f not in report]
    # One anchor by default for 8 peers (3 for 40): trust needs a root.
    assert (report["scenario"], report["seed"], report["peers"], report["pretrusted"]) == ("always-wrong", 3, 8, 1)
    assert (report["honest"], report["malicious"]) == (5, 3)
    assert report["jobs"] == report["jobs_finished"] == 40
    assert report["answered"] + report["failed"] == 40
    assert report["executions_per_job"] >= 1
    for share in ("wrong_rate", "honest_work_share", "pretrusted_work_share", "honest_peers_used", "failed_rate"):
        assert 0 <= report[share] <= 1, share
    assert 0 <= report["malicious_quarantined"] <= report["malicious"]
    assert report["honest_quarantined"] == 0
    assert report["wrong"] == round(report["wrong_rate"] * 40)
    detail = report["detail"]
    assert len(detail) == 8 and sum(p["executions"] for p in detail) == report["executions"]
    assert sum(p["executions"] for p in detail if p["role"] == "malicious") == report["malicious_executions"]
    assert sum(p["quarantined"] for p in detail if p["role"] != "malicious") == 0
    assert report["other_executions"] == 0
    assert report["seconds"] > 0 and not report["timed_out"]
    assert report["rate"] == 50 and report["job_seconds"] >= 39 / 50  # the 40th job started no sooner
    # Honest peers never answer wrong; every cheater's answer is wrong.
    assert all(p["wrong_answers"] == 0 for p in detail if p["role"] != "malicious")
    assert all(p["wrong_answers"] == p["executions"] for p in detail if p["role"] == "malicious")
    assert list(tmp.iterdir()) == [] and leftovers(tmp) == []


def test_without_anchors_the_mesh_refuses_what_it_cannot_settle(tmp_path: Path, home: Path) -> None:
    """--pretrusted 0: nobody has standing, so a disagreement fails the job rather than guessing; nobody is punished."""
    tmp = tmp_path / "tmp"
    args = ("--peers", "8", "--malicious", "0.375", "--jobs", "30", "--seed", "3", "--processes", "2")
    report = sim_json(tmp, home, *args, "--scenario", "always-wrong", "--pretrusted", "0")
    assert report["pretrusted"] == 0 and report["wrong"] == 0
    assert report["failed"] > 0 and report["errors"] == {"Rejected[no_quorum]": report["failed"]}
    assert report["malicious_quarantined"] == report["honest_quarantined"] == 0
    assert list(tmp.iterdir()) == [] and leftovers(tmp) == []


def test_colluding_cheaters_return_one_wrong_value_per_job(tmp_path: Path, home: Path) -> None:
    """--collude reaches every worker process: cheaters that turned agree with each other, honest peers never."""
    tmp = tmp_path / "tmp"
    args = (
        "--peers",
        "8",
        "--malicious",
        "0.5",
        "--jobs",
        "30",
        "--seed",
        "2",
        "--processes",
        "2",
        "--pretrusted",
        "1",
    )
    report = sim_json(tmp, home, *args, "--scenario", "long-con", "--k", "0", "--collude", "--keep")
    assert report["collude"] is True and report["k"] == 0
    workdir = Path(report["workdir"])
    try:
        runs = [json.loads(line) for line in (workdir / "executions.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(workdir)
    cheaters = {p["index"] for p in report["detail"] if p["role"] == "malicious"}
    by_task: dict[int, list[str]] = {}
    for run in runs:
        if int(run["peer"]) in cheaters:
            by_task.setdefault(int(run["task"]), []).append(run["value"])
    assert all(len(set(values)) == 1 for values in by_task.values())
    assert any(len(values) > 1 for values in by_task.values())  # two cheaters ran one job, and agreed


def test_role_aware_reaches_every_worker_process(tmp_path: Path, home: Path) -> None:
    """--role-aware: each process's spec says so, and a cheater's every guess of a check is an honest answer."""
    tmp = tmp_path / "tmp"
    args = ("--peers", "8", "--jobs", "30", "--seed", "4", "--processes", "2", "--pretrusted", "1")
    report = sim_json(tmp, home, *args, "--scenario", "always-wrong", "--role-aware", "--keep")
    assert report["role_aware"] is True
    workdir = Path(report["workdir"])
    try:
        specs = [json.loads(p.read_text()) for p in sorted(workdir.glob("host-*.json")) if "stats" not in p.name]
        runs = [json.loads(line) for line in (workdir / "executions.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(workdir)
    assert len(specs) == 2 and all(spec["role_aware"] is True for spec in specs)
    cheaters = {p["index"] for p in report["detail"] if p["role"] == "malicious"}
    seen = [run for run in runs if int(run["peer"]) in cheaters]
    assert seen and all(isinstance(run["looks_checked"], bool) for run in runs)
    # Guessed first: always wrong (the scenario); guessed a check: the honest value.
    assert all((run["value"] == expected(4, int(run["task"]))) == run["looks_checked"] for run in seen)


def test_the_matrix_runs_a_variant_once_and_tables_it_in_a_row_of_its_own(tmp_path: Path, home: Path) -> None:
    """The README's matrix command, small: one role-aware run, resumed without running it again."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out_file = tmp_path / "runs.jsonl"
    command = [
        sys.executable, "-m", "meshjobs.sim.matrix", "--out", str(out_file), "--scenarios", "long-con",
        "--seeds", "1", "--peers", "8", "--malicious", "0.25", "--jobs", "30", "--pretrusted", "1", "--role-aware",
    ]  # fmt: skip
    for attempt in range(2):
        out = subprocess.run(
            command, env=cli_env(home, TMPDIR=str(tmp)), cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("run: long-con seed 1" in out.stderr) == (attempt == 0)  # the second time, nothing is run again
        assert "| long-con (role-aware) | 1 |" in out.stdout
    (report,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert report["role_aware"] is True and report["scenario"] == "long-con" and report["peers"] == 8
    assert leftovers(tmp) == []


def test_ctrl_c_stops_every_process_and_removes_the_run(tmp_path: Path, home: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshjobs", "sim", "--peers", "4", "--jobs", "100000", "--processes", "2"],
            env=cli_env(home, TMPDIR=str(tmp)),
            cwd=REPO,
            stdin=devnull,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        # Wait until the run is under way: its execution log has lines.
        while time.monotonic() < deadline and not any(
            p.stat().st_size for p in tmp.glob("meshjobs-sim-*/executions.jsonl")
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert leftovers(tmp), "the run never started its processes"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert leftovers(tmp) == []
    assert list(tmp.iterdir()) == []
