"""A capability behind an approval gate: ``payments.send`` runs only once an operator approved it.

Run it with ``meshjobs worker workers.payments:app --trust trust.toml``, where
the trust file lists the approver as an operator::

    [[operator]]
    key = "U..."            # `meshjobs id` of whoever approves

then ``meshjobs submit payments.send '{"to": "bob", "cents": 500}'`` waits,
``meshjobs approvals`` lists it and ``meshjobs approve JOB_ID`` lets it run.
``meshjobs demo`` does all of this. Nothing is paid: the handler only says
what it would have sent.
"""

from __future__ import annotations

from meshjobs import App
from meshjobs.workflow import Approval

app = App("payments", description="pretend payments that wait for an operator's signed approval")


@app.capability("payments.send", approval=Approval(operators=True), timeout=10)
async def send(to: str, cents: int) -> str:
    """Send a payment (pretend), once an operator of the worker's trust file approved it."""
    if cents <= 0:
        raise ValueError("cents must be positive")
    return f"sent {cents} cents to {to}"
