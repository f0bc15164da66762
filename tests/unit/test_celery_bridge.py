"""The Celery bridge without a network: name mapping, refusals, argument checks, outcomes.

Tasks run in Celery's eager mode (in this process, results in memory), so the
whole handler path runs here; the real broker path is in
tests/integration/test_celery_bridge.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import meshjobs.celery
from meshjobs import App, JobContext
from meshjobs.bridges.celery import (
    BridgeError,
    TaskRevoked,
    _settle,
    _task_id,
    bridge_app,
    capability_name,
    load_celery_app,
    plan,
)
from meshjobs.errors import IdentityError, InvalidArguments, JobTimeout, UsageError

KEY = "U" + "A" * 55


def celery_app(*names: str, backend: str | None = "cache+memory://", ignore: str = "") -> Celery:
    app = Celery("unit", broker="memory://", backend=backend)
    app.conf.update(task_always_eager=True, task_store_eager_result=True)
    for name in names:

        def run(x: int, y: int = 1, *rest: int, **options: Any) -> int:
            """Add things.

            Details that are not the description.
            """
            if x < 0:
                raise ValueError(f"negative: {x}")
            return x + y + sum(rest) + len(options)

        app.task(name=name, ignore_result=name == ignore, shared=False)(run)
    return app


def job(capability: str, submitter: str = KEY, job_id: str = "job-0001") -> JobContext:
    return JobContext(job_id, capability, submitter, KEY, int((time.time() + 30) * 1000))


async def call(app: App, capability: str, args: dict[str, Any]) -> Any:
    cap = app.capabilities[capability]
    return await cap.call(cap.bind(args), job(capability))


def test_valid_names_stay_and_others_are_mapped() -> None:
    assert capability_name("proj.tasks.add") == ("proj.tasks.add", None)
    assert capability_name("proj.tasks.Add") == ("proj.tasks.add", None)
    assert capability_name("Reports.Weekly Summary") == ("reports.weekly_summary", None)
    assert capability_name("mesh.ping")[0] is None
    assert capability_name("a..b")[0] is None


def test_the_plan_skips_celery_tasks_and_follows_the_glob() -> None:
    app = celery_app("proj.tasks.Add", "proj.tasks.sub", "other.task")
    assert any(name.startswith("celery.") for name in app.tasks)
    assert plan(app) == {
        "other.task": "other.task",
        "proj.tasks.Add": "proj.tasks.add",
        "proj.tasks.sub": "proj.tasks.sub",
    }
    assert plan(app, "proj.*") == {"proj.tasks.Add": "proj.tasks.add", "proj.tasks.sub": "proj.tasks.sub"}
    assert plan(app, "proj.*", {"proj.tasks.Add": "proj.plus"})["proj.tasks.Add"] == "proj.plus"


def test_ambiguous_and_impossible_names_are_refused_by_name() -> None:
    app = celery_app("proj.Add", "proj.add", "mesh.ping")
    with pytest.raises(BridgeError) as info:
        plan(app)
    message = str(info.value)
    assert "tasks 'proj.Add' and 'proj.add' would all be 'proj.add'" in message
    assert "task 'mesh.ping' cannot be a capability" in message and "--map mesh.ping=NAME" in message
    assert info.value.exit_code == 2
    fixed = plan(app, overrides={"proj.Add": "proj.add-upper", "mesh.ping": "ops.ping"})
    assert fixed == {"mesh.ping": "ops.ping", "proj.Add": "proj.add-upper", "proj.add": "proj.add"}


def test_bad_overrides_and_useless_tasks_are_refused() -> None:
    app = celery_app("proj.add", "proj.quiet", ignore="proj.quiet")
    with pytest.raises(BridgeError, match="'proj.quiet' ignores its result"):
        plan(app)
    with pytest.raises(BridgeError, match="--map proj.add=Bad: invalid capability 'Bad'"):
        plan(app, "proj.add", {"proj.add": "Bad"})
    with pytest.raises(BridgeError, match="--map proj.nope=...: no task 'proj.nope' matches"):
        plan(app, "proj.add", {"proj.nope": "x"})
    with pytest.raises(BridgeError, match=r"no registered Celery task matches 'x\.\*' \(registered: proj.add, proj"):
        plan(app, "x.*")
    with pytest.raises(BridgeError, match="no result backend"):
        bridge_app(celery_app("proj.add", backend=None))


def test_the_app_describes_each_task() -> None:
    app = bridge_app(celery_app("proj.Add"), timeout=12)
    assert app.kind == "system" and app.name == "unit"
    cap = app.capabilities["proj.add"]
    assert cap.description == "Add things."
    assert cap.timeout == 12


async def test_arguments_are_checked_against_the_task_and_sent() -> None:
    app = bridge_app(celery_app("proj.add"))
    assert await call(app, "proj.add", {"x": 2}) == 3
    assert await call(app, "proj.add", {"args": [2, 3, 4]}) == 9
    assert await call(app, "proj.add", {"x": 2, "y": 5, "flag": True}) == 8
    for bad in ({}, {"y": 1}, {"args": [1], "x": 2}):
        with pytest.raises(InvalidArguments) as info:
            await call(app, "proj.add", bad)
        assert info.value.exit_code == 2
    with pytest.raises(InvalidArguments, match="missing a required argument: 'x'"):
        await call(app, "proj.add", {"y": 1})


async def test_a_task_exception_keeps_its_type_and_message() -> None:
    app = bridge_app(celery_app("proj.add"))
    with pytest.raises(ValueError, match="negative: -1"):
        await call(app, "proj.add", {"x": -1})


async def test_a_retried_job_finds_its_task_instead_of_sending_it_again() -> None:
    runs: list[int] = []
    capp = celery_app()

    @capp.task(name="proj.count", shared=False)  # type: ignore[untyped-decorator]
    def count(n: int) -> int:
        runs.append(n)
        return len(runs)

    app = bridge_app(capp)
    cap = app.capabilities["proj.count"]
    assert [await cap.call(cap.bind({"n": 1}), job("proj.count")) for _ in range(2)] == [1, 1]
    assert await cap.call(cap.bind({"n": 1}), job("proj.count", job_id="job-0002")) == 2
    assert runs == [1, 1]


def test_revoked_is_a_timeout_and_other_states_fail() -> None:
    with pytest.raises(TaskRevoked) as info:
        _settle("t", "id", "REVOKED", "expired")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, JobTimeout)
    assert info.value.exit_code == 4
    assert _settle("t", "id", "SUCCESS", 7) == 7
    with pytest.raises(KeyError):
        _settle("t", "id", "FAILURE", KeyError("k"))


def test_task_ids_bind_submitter_job_and_arguments() -> None:
    one = _task_id(job("a.b"), [1], {"k": 2})
    assert one == _task_id(job("a.b"), [1], {"k": 2})
    assert one != _task_id(job("a.b", submitter="U" + "B" * 55), [1], {"k": 2})
    assert one != _task_id(job("a.b", job_id="job-0002"), [1], {"k": 2})
    assert one != _task_id(job("a.b"), [1], {"k": 3})


def test_load_celery_app() -> None:
    assert isinstance(load_celery_app("tests.celery_tasks:app"), Celery)
    with pytest.raises(BridgeError, match="cannot load the Celery app"):
        load_celery_app("tests.no_such_module:app")
    with pytest.raises(BridgeError, match="is not a Celery app"):
        load_celery_app("workers.demo:app")


async def test_submit_refuses_to_run_inside_an_event_loop(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="synchronous code"):
        meshjobs.celery.submit("demo.add", {"a": 1, "b": 2}, home=tmp_path)


def test_submit_needs_an_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="no identity"):
        meshjobs.celery.submit("demo.add", {"a": 1, "b": 2}, home=tmp_path)
