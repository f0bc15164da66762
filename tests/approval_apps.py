"""A worker app with an approval gate, for the approval tests.

``meshjobs worker tests.approval_apps:app``: ``gated.pay`` waits for a signed
approval by any operator of the worker's trust file; every run of the
handler is logged (one line per job id) to ``MESHJOBS_TEST_EXEC_LOG``.
"""

from __future__ import annotations

import os

from meshjobs import App, JobContext
from meshjobs.workflow import Approval

app = App("gated")


@app.capability("gated.pay", approval=Approval(operators=True), timeout=10)
async def pay(to: str, cents: int, job: JobContext) -> str:
    path = os.environ.get("MESHJOBS_TEST_EXEC_LOG")
    if path:
        with open(path, "a") as log:
            log.write(job.job_id + "\n")
    return f"paid {cents} to {to}"
