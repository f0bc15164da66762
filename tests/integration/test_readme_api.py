"""The README's Python API example runs as printed, against a real broker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from meshjobs.infra.broker import NatsServer
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_python_api_example_runs(broker: NatsServer) -> None:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Python API"), flags=re.S)
    assert blocks, "the Python API section has no example"
    for code in blocks:
        assert "nats://127.0.0.1:4222" in code
        code = code.replace("nats://127.0.0.1:4222", broker.url)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(r"42 from U\w{7}\n", out.stdout), out.stdout
