"""The floor plan holds: every module imports on its own, the import rules hold, the public API is pinned.

The rules (README, "Architecture"):
- nothing imports ``meshjobs.cli`` (the CLI sits on top; it imports the library);
- ``meshjobs.infra`` imports no job module (runtime, trust, durable, client, router, submit, ...);
- the ground floor (errors, identity, envelope, subjects, state, _nats, _files, compare) imports nothing above it;
- no module reaches into another's private attributes (no ``noqa: SLF001``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import meshjobs

PACKAGE = Path(meshjobs.__file__).resolve().parent
GROUND = {"errors", "identity", "envelope", "subjects", "state", "_nats", "_version", "_files", "compare"}
JOB_MODULES = ("runtime", "trust", "durable", "client", "router", "submit", "discovery", "catalog", "peers", "bridges")


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def imports_of(name: str) -> set[str]:
    """Every meshjobs module *name* imports, at the top or inside functions (relative imports resolved)."""
    path = PACKAGE.parent / Path(*name.split("."))
    is_package = path.is_dir()
    source = (path / "__init__.py") if is_package else path.with_suffix(".py")
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module.startswith("meshjobs"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("meshjobs"))
    known = set(module_names())
    return {m for m in found if m in known}


# Imports every meshjobs module in a fresh child: the parent preloads only
# third-party packages (the slow part), then forks one child per module, so
# each child starts with no meshjobs module loaded, as a new interpreter would.
_ISOLATED_IMPORTS = """
import importlib, os, sys, traceback
for dep in ("nats", "nats.js", "pydantic", "click", "rich", "nacl.signing", "tomlkit", "openai", "celery",
            "docker", "textual", "prometheus_client", "starlette", "uvicorn"):
    try:
        importlib.import_module(dep)
    except ImportError:
        pass  # an optional extra that is not installed: its modules must say so clearly
failed, running = 0, set()
for name in sys.argv[1:]:
    if len(running) >= 4:
        pid, status = os.wait()
        running.discard(pid)
        failed += status != 0
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(name + ": " + traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
    running.add(pid)
for pid in running:
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone() -> None:
    """An import cycle shows as a partially initialised module when that module is imported first."""
    out = subprocess.run(
        [sys.executable, "-c", _ISOLATED_IMPORTS, *module_names()], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def is_cli(name: str) -> bool:
    return name == "meshjobs.cli" or name.startswith("meshjobs.cli.")


@pytest.mark.parametrize("name", [n for n in module_names() if not is_cli(n) and n != "meshjobs.__main__"])
def test_nothing_imports_the_cli(name: str) -> None:
    assert not {m for m in imports_of(name) if is_cli(m)}


@pytest.mark.parametrize("name", [n for n in module_names() if n.startswith("meshjobs.infra")])
def test_infra_imports_no_job_module(name: str) -> None:
    bad = {m for m in imports_of(name) if m.split(".")[1] in JOB_MODULES}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", [f"meshjobs.{g}" for g in sorted(GROUND)])
def test_ground_floor_imports_only_the_ground_floor(name: str) -> None:
    bad = {m for m in imports_of(name) if m.split(".")[1] not in GROUND}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_no_reach_ins() -> None:
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if "noqa: SLF001" in p.read_text()]
    assert not offenders


def test_public_api_is_pinned() -> None:
    assert sorted(meshjobs.__all__) == sorted([
        "Client", "Constraints", "Durable", "Outcome", "PeerInfo", "Router", "SubmitOptions", "Submitted",
        "Submitter", "App", "JobContext", "Worker", "WorkerConfig", "Identity", "TrustPolicy", "BrokerError",
        "ConnectError", "HandlerError", "IdentityError", "InvalidArguments", "JobTimeout", "MeshError",
        "NoPeerError", "PolicyFileError", "Reason", "Rejected", "UsageError", "__version__",
    ])  # fmt: skip
    for name in meshjobs.__all__:
        assert hasattr(meshjobs, name)
    assert (PACKAGE / "py.typed").exists()


def test_every_raised_error_is_a_mesh_error() -> None:
    """Exceptions raised on purpose derive from MeshError (ValueError/TypeError only inside validators)."""
    import meshjobs.errors as errors

    tree_names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.MeshError)}
    doc = errors.__doc__ or ""
    missing = sorted(n for n in tree_names if n not in doc)
    assert not missing, f"errors.py's docstring tree lacks {missing}"
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if node.name == "MeshError":
                    continue
                if bases & {"Exception", "ValueError", "RuntimeError"} and not bases & tree_names:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not offenders, offenders
