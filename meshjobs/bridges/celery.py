"""Celery tasks as mesh capabilities.

::

    from meshjobs import Worker
    from meshjobs.bridges.celery import bridge_app
    from proj.celery import app as celery_app

    app = bridge_app(celery_app, "proj.tasks.*")   # an ordinary meshjobs App
    await Worker(app, identity, policy).serve(url)  # or: meshjobs celery-bridge proj.celery:app

Every registered task whose name matches the glob (Celery's own ``celery.*``
tasks excepted) becomes one capability. The Worker that runs the app verifies
each signed envelope (signature, trust, window, replay) before any of this
code runs, and signs the result with the bridge's key, as for any handler.

A capability takes the task's arguments by name, plus ``args`` (a list) for
positional ones, exactly like ``apply_async(args=..., kwargs=...)``. They are
checked against the task's ``run`` signature before anything is sent
(exit code 2 for the submitter). The task then goes over the Celery app's own
broker and the bridge waits for its result in a thread, through retries:
success is the value, an exception is a handler failure carrying the
exception's type and message (exit 1), a revoked or expired task is a
timeout (exit 4). The Celery task id is derived from the submitter, the
capability, the mesh job id and the arguments, so a client's retry of the
same job (even through another bridge process) finds the task already sent
instead of sending it twice, and nobody can read another submitter's result
by reusing its job id. Celery records nothing for a task that is still
queued, so a job given up while its task waits in Celery's queue, and then
retried, can send it again: as with any handler, tasks with side effects
should be idempotent (key them on ``self.request.id``). A task not started
by the time the mesh job expires is discarded by Celery (``expires``).

Task names that are not valid capability names are mapped deterministically
(lower case, other characters to ``_``: ``proj.tasks.Add`` -> ``proj.tasks.add``);
a name that cannot be mapped, or two tasks that would share one capability,
refuse the whole bridge with a message naming the tasks, unless an explicit
``overrides`` entry (``--map TASK=CAPABILITY``) names them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

# Absolute imports: this is the real Celery, not meshjobs.celery.
import celery
from celery import states
from celery.app.utils import find_app
from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeout

from meshjobs import App, JobContext
from meshjobs.errors import HandlerError, InvalidArguments, JobTimeout, UsageError
from meshjobs.subjects import capability_problem

log = logging.getLogger("meshjobs.bridges.celery")

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONCURRENCY = 16
#: How often a waiting thread looks whether its job was given up (seconds).
_CHECK_INTERVAL = 1.0
_INVALID_CHARS = re.compile(r"[^a-z0-9_.-]")
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_TASK_ID_NAMESPACE = uuid.UUID("7f1c3a52-4f0e-5b8e-9d1a-6c2b0e4d9a31")


class BridgeError(UsageError):
    """The Celery app or its tasks cannot be bridged as asked (exit 2)."""


class TaskFailed(HandlerError):
    """A Celery task failed with something that is not an exception object."""


class TaskRevoked(JobTimeout, TimeoutError):
    """The Celery task was revoked, expired before it ran, or outlived the job.

    Also a :class:`TimeoutError`, so the worker reports it as a timeout
    (exit 4 for the submitter), like a job that ran out of time.
    """


def load_celery_app(spec: str) -> celery.Celery:
    """Import a Celery app the way ``celery -A`` does (``proj``, ``proj.celery:app``, ...)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = find_app(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BridgeError(f"cannot load the Celery app {spec!r}: {exc}") from None
    if not isinstance(found, celery.Celery):
        raise BridgeError(f"{spec} is not a Celery app (got {type(found).__name__})")
    return found


def capability_name(task_name: str) -> tuple[str | None, str | None]:
    """The capability a task is offered as by default: (name, None), or (None, why not)."""
    if capability_problem(task_name) is None:
        return task_name, None
    mapped = _INVALID_CHARS.sub("_", task_name.lower())
    problem = capability_problem(mapped)
    if problem:
        return None, problem
    return mapped, None


def plan(celery_app: celery.Celery, glob: str = "*", overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Which task becomes which capability: ``{task name: capability}``.

    Raises :class:`BridgeError` listing every task that cannot be bridged.
    """
    overrides = dict(overrides or {})
    celery_app.loader.import_default_modules()  # the tasks of `include=` and `imports`, as a worker loads them
    registered = celery_app.tasks
    names = sorted(n for n in registered if fnmatch.fnmatchcase(n, glob) and not n.startswith("celery."))
    problems = [f"--map {task}=...: no task {task!r} matches {glob!r}" for task in overrides if task not in names]
    if not names:
        known = sorted(n for n in registered if not n.startswith("celery."))
        listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "") or "none"
        raise BridgeError(f"no registered Celery task matches {glob!r} (registered: {listed})")
    chosen: dict[str, str] = {}
    for task in names:
        if task in overrides:
            capability, problem = overrides[task], capability_problem(overrides[task])
            if problem:
                problems.append(f"--map {task}={capability}: {problem}")
                continue
        else:
            mapped, problem = capability_name(task)
            if mapped is None:
                problems.append(f"task {task!r} cannot be a capability ({problem}); name it with --map {task}=NAME")
                continue
            capability = mapped
        if registered[task].ignore_result:
            problems.append(f"task {task!r} ignores its result, so the bridge could never answer; exclude it")
            continue
        chosen[task] = capability
    by_capability: dict[str, list[str]] = {}
    for task, capability in chosen.items():
        by_capability.setdefault(capability, []).append(task)
    for capability, tasks in sorted(by_capability.items()):
        if len(tasks) > 1:
            listed = " and ".join(repr(t) for t in tasks)
            problems.append(f"tasks {listed} would all be {capability!r}; rename all but one with --map TASK=NAME")
    if problems:
        raise BridgeError("cannot bridge these Celery tasks:\n  " + "\n  ".join(problems))
    return chosen


def bridge_app(
    celery_app: celery.Celery,
    glob: str = "*",
    *,
    overrides: Mapping[str, str] | None = None,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> App:
    """A meshjobs :class:`App` (kind ``system``) offering the matching Celery tasks.

    *timeout* bounds each job (queueing in Celery included); *concurrency* is
    how many tasks the bridge waits for at once (threads): match the
    worker's concurrency.
    """
    if concurrency < 1:
        raise BridgeError("concurrency must be at least 1")
    if isinstance(celery_app.backend, DisabledBackend):
        raise BridgeError("the Celery app has no result backend (result_backend): the bridge could not get results")
    chosen = plan(celery_app, glob, overrides)
    label = name or _LABEL_CHARS.sub("_", celery_app.main or "celery")[:64]
    app = App(label, kind="system", description=f"Celery bridge to {celery_app.main or 'a Celery app'}")
    threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="meshjobs-celery")
    for task_name, capability in chosen.items():
        task = celery_app.tasks[task_name]
        doc = inspect.cleandoc(task.__doc__ or "")
        register = app.capability(capability, timeout=timeout, description=doc.splitlines()[0] if doc else "")
        register(_handler(_TaskCall(task, threads)))
    return app


class _TaskCall:
    """Sends one task and waits for it, in a thread: Celery's client API blocks."""

    def __init__(self, task: celery.Task, threads: ThreadPoolExecutor) -> None:
        self.task = task
        self.threads = threads
        try:
            self.signature: inspect.Signature | None = inspect.signature(task.run)
        except (TypeError, ValueError):  # not introspectable: Celery's own check still applies
            self.signature = None

    async def __call__(self, job: JobContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if self.signature is not None:
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArguments(str(exc)) from None
        given_up = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.threads, self._send_and_wait, job, args, kwargs, given_up)
        except asyncio.CancelledError:
            # Timed out or draining: free the thread. The task itself stays in
            # Celery, where a retry of this job finds it by its task id.
            given_up.set()
            raise

    def _send_and_wait(
        self, job: JobContext, args: list[Any], kwargs: dict[str, Any], given_up: threading.Event
    ) -> Any:
        # One thread sends and waits: Celery result backends are per thread
        # unless configured thread-safe, so a result is read where it was sent.
        task_id = _task_id(job, args, kwargs)
        result = self.task.AsyncResult(task_id)
        if result.state == states.PENDING:  # unknown to the backend: not sent yet
            expires = datetime.fromtimestamp(job.expires_at_ms / 1000, UTC)
            result = self.task.apply_async(args=args, kwargs=kwargs, task_id=task_id, expires=expires)

        # Short waits, not one long one: between them the thread sees whether
        # the job was given up (result.get's on_interval fires only once).
        while not given_up.is_set():
            left = job.expires_at_ms / 1000 - time.time()
            if left <= 0:
                break
            try:
                value = result.get(timeout=min(left, _CHECK_INTERVAL), propagate=False, disable_sync_subtasks=False)
            except CeleryTimeout:
                continue
            return _settle(self.task.name, task_id, result.state, value)
        raise TaskRevoked(f"Celery task {self.task.name} ({task_id}) did not finish in time")


def _handler(call: _TaskCall) -> Callable[..., Awaitable[Any]]:
    # The capability's signature: the job context (never an argument), the
    # positional list and any keyword. The task's own signature is checked
    # in _TaskCall, which raises InvalidArguments (exit 2) before sending.
    async def handler(_meshjobs_job: JobContext, args: list[Any] | None = None, **kwargs: Any) -> Any:
        return await call(_meshjobs_job, list(args or []), kwargs)

    return handler


def _task_id(job: JobContext, args: list[Any], kwargs: dict[str, Any]) -> str:
    request = json.dumps([job.submitter, job.capability, job.job_id, args, kwargs], sort_keys=True)
    return str(uuid.uuid5(_TASK_ID_NAMESPACE, request))


def _settle(task_name: str, task_id: str, state: str, value: Any) -> Any:
    """The task's value, or the error its final state means."""
    if state == states.SUCCESS:
        return value
    if state == states.REVOKED:
        log.info("Celery task %s (%s) was revoked: %s", task_name, task_id, value)
        raise TaskRevoked(f"Celery task {task_name} ({task_id}) was revoked or expired: {value}")
    if isinstance(value, Exception):
        # Re-raised as is: the submitter sees the task's exception type and message.
        raise value
    raise TaskFailed(f"Celery task {task_name} ({task_id}) ended in state {state}: {value!r}")
