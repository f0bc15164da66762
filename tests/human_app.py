"""Capabilities a person answers in the human-peer tests (the handler bodies never run)."""

from __future__ import annotations

from pydantic import BaseModel

from meshjobs import App, JobContext

app = App("people", kind="human", description="questions for a person")


class Verdict(BaseModel):
    ok: bool
    note: str


@app.capability("people.add")
async def add(a: int, b: int) -> int:
    """Add two numbers in your head."""
    raise AssertionError("a person answers this: the body never runs")


@app.capability("people.title")
def title(text: str, job: JobContext | None = None) -> str:
    """Give a text a title."""
    raise AssertionError("a person answers this: the body never runs")


@app.capability("people.review")
async def review(text: str) -> Verdict:
    """Review a text."""
    raise AssertionError("a person answers this: the body never runs")
