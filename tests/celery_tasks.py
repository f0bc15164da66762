# mypy: disable-error-code="untyped-decorator"
"""The Celery app of the Celery bridge tests: ``celery -A tests.celery_tasks worker``.

Broker and result backend come from Celery's own ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` (the tests point them at their own redis-server);
``MESHJOBS_TEST_MARKS`` is a directory where ``calc.touch`` leaves evidence that
it ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery, Task

from meshjobs.celery import submit

app = Celery("tests.celery_tasks")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(shared=False, name="calc.add")
def add(x: int, y: int) -> int:
    """Add two numbers.

    More text that is not part of the description.
    """
    return x + y


@app.task(shared=False, name="calc.fail")
def fail(message: str = "boom") -> None:
    """Raise ValueError with the given message."""
    raise ValueError(message)


@app.task(shared=False, name="calc.flaky", bind=True, max_retries=3)
def flaky(self: Task, key: str) -> dict[str, Any]:
    """Fail the first time (Celery retries it after 0.3 s), then succeed."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.3)
    return {"key": key, "retries": self.request.retries}


@app.task(shared=False, name="calc.touch")
def touch(tag: str) -> str:
    """Leave a mark that this task ran with *tag*."""
    (Path(os.environ["MESHJOBS_TEST_MARKS"]) / tag).write_text("ran\n")
    return tag


@app.task(shared=False, name="calc.sleep")
def sleep(seconds: float) -> float:
    """Sleep, then return the seconds."""
    import time

    time.sleep(seconds)
    return seconds


@app.task(shared=False, name="Legacy.Mul")
def legacy_mul(*values: float) -> float:
    """Multiply the positional arguments (a task name that is not a capability name)."""
    product = 1.0
    for value in values:
        product *= value
    return product


@app.task(shared=False, name="Legacy.Div")
def legacy_div(a: float, b: float) -> float:
    """Divide a by b (offered under a name given with --map)."""
    return a / b


@app.task(shared=False, name="calc.mesh_add")
def mesh_add(a: Any, b: Any) -> Any:
    """Ask the mesh (demo.add) to add two numbers: Celery -> mesh."""
    return submit("demo.add", {"a": a, "b": b}, timeout=15)
