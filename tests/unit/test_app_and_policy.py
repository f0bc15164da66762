"""Pure pieces: capability names, trust files, the app registry, the ledger, config rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshjobs.errors import PolicyFileError, Reason, Rejected, UsageError
from meshjobs.identity import Identity
from meshjobs.infra.broker import find_nats_server
from meshjobs.infra.natsconf import render, single_node
from meshjobs.runtime.app import App, JobContext
from meshjobs.runtime.ledger import JobEntry, JobTable, ReplayGuard
from meshjobs.subjects import audience_for, capability_problem, check_capability
from meshjobs.trust.policy import load_trust, parse_trust

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.add", "a", "x-y_z.0.9", "img.resize-v2"])
def test_valid_capabilities(name: str) -> None:
    assert capability_problem(name) is None
    assert audience_for(name) == f"mesh.cmd.{name}"


@pytest.mark.parametrize(
    "name", ["", "demo.*", "demo.>", "*", ">", "demo add", "demo..add", ".demo", "demo.", "Demo", "mesh.x",
             "_INBOX.x", "$SYS.x", "sys", "demo.ä", "a" * 129, "demo\tadd"],
)  # fmt: skip
def test_invalid_capabilities(name: str) -> None:
    assert capability_problem(name)
    with pytest.raises(UsageError):
        check_capability(name)


def test_direct_audience_needs_a_real_peer_key() -> None:
    peer = Identity.generate().public_key
    assert audience_for("demo.add", peer) == f"mesh.peer.{peer}.cmd.demo.add"
    with pytest.raises(UsageError, match="invalid peer id"):
        audience_for("demo.add", "bob")


def test_trust_file_format(tmp_path: Path) -> None:
    alice, bob = Identity.generate().public_key, Identity.generate().public_key
    text = f'[[peer]]\nkey = "{alice}"\nname = "alice"\n\n[[peer]]\nkey = "{bob}"\n'
    policy = parse_trust(text, tmp_path / "trust.toml")
    assert policy.keys == {alice, bob} and policy.names == {alice: "alice"}
    policy.check(alice, "demo.add")
    with pytest.raises(Rejected) as info:
        policy.check(Identity.generate().public_key, "demo.add")
    assert info.value.reason == Reason.UNTRUSTED


def test_example_trust_file_parses() -> None:
    policy = load_trust(REPO / "config" / "trust.example.toml", required=True)
    assert len(policy.keys) >= 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[peer]]\nkey = "UNOTAKEY"\n', "not a user public key"),
        ("[[peer]]\nname = 'x'\n", "'key' is required"),
        ("[[peer]]\nkey = 1\n", "'key' is required"),
        ("[[peers]]\nkey = 'x'\n", "unknown section 'peers'"),
        ("peer = 'x'\n", "array of tables"),
        ("[[peer\n", "not valid TOML"),
    ],
)
def test_bad_trust_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match=message):
        parse_trust(text, tmp_path / "trust.toml")


def test_unknown_trust_field_names_the_field(tmp_path: Path) -> None:
    key = Identity.generate().public_key
    with pytest.raises(PolicyFileError, match="unknown field 'capabilitys'"):
        parse_trust(f'[[peer]]\nkey = "{key}"\ncapabilitys = ["x"]\n', tmp_path / "t.toml")


def test_trust_file_missing(tmp_path: Path) -> None:
    assert load_trust(tmp_path / "none.toml", required=False).keys == frozenset()
    with pytest.raises(PolicyFileError, match="does not exist"):
        load_trust(tmp_path / "none.toml", required=True)


def test_app_validates_arguments_from_type_hints() -> None:
    app = App("t")

    @app.capability("t.add")
    def add(a: int, b: int = 1, ctx: JobContext | None = None) -> int:
        return a + b

    @app.capability("t.ctx")
    async def who(ctx: JobContext, n: int) -> str:
        return ctx.job_id

    cap = app.capabilities["t.add"]
    # An optional context (README's "JobContext | None") is injected too, never an argument.
    assert cap.bind({"a": 2}) == {"a": 2, "b": 1} and cap.context_param == "ctx"
    from meshjobs.errors import InvalidArguments

    with pytest.raises(InvalidArguments, match="a: Field required"):
        cap.bind({})
    with pytest.raises(InvalidArguments, match="c: unexpected argument"):
        cap.bind({"a": 1, "c": 3})
    ctx_cap = app.capabilities["t.ctx"]
    assert ctx_cap.context_param == "ctx" and ctx_cap.is_async
    # The context is injected, never taken from the submitter's arguments.
    with pytest.raises(InvalidArguments, match="ctx: unexpected argument"):
        ctx_cap.bind({"n": 1, "ctx": {"job_id": "forged"}})


def test_app_registration_errors() -> None:
    app = App("t")
    with pytest.raises(UsageError, match="invalid capability"):
        app.capability("t.*")
    app.capability("t.x")(lambda: None)
    with pytest.raises(UsageError, match="registered twice"):
        app.capability("t.x")(lambda: None)
    with pytest.raises(UsageError, match=r"\*args"):
        app.capability("t.y")(lambda *args: None)
    with pytest.raises(UsageError, match="kind"):
        App("t", kind="robot")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^capability 't.z': unknown comparison term 'fuzzy'"):
        app.capability("t.z", compare="fuzzy")


def test_a_declared_comparison_makes_a_capability_checkable() -> None:
    app = App("t")
    app.capability("t.mean", compare="unordered, rel=1e-9")(lambda: 0.0)
    app.capability("t.add", deterministic=True, compare="exact")(lambda: 0)
    app.capability("t.chat")(lambda: "")
    mean, add, chat = (app.capabilities[n] for n in ("t.mean", "t.add", "t.chat"))
    assert mean.deterministic and mean.compare == "rel=1e-09,unordered"
    assert add.deterministic and add.compare == "exact" and not chat.deterministic


def test_replay_guard() -> None:
    guard = ReplayGuard(max_entries=2)
    guard.check_and_record("k", "n1", keep_until_ms=1000, now_ms=0)
    with pytest.raises(Rejected) as info:
        guard.check_and_record("k", "n1", keep_until_ms=1000, now_ms=10)
    assert info.value.reason == Reason.REPLAY
    guard.check_and_record("k2", "n1", keep_until_ms=1000, now_ms=10)  # another submitter
    with pytest.raises(Rejected) as info:
        guard.check_and_record("k", "n3", keep_until_ms=1000, now_ms=20)
    assert info.value.reason == Reason.OVERLOADED  # full of live nonces: shed, never forget
    guard.check_and_record("k", "n3", keep_until_ms=5000, now_ms=2000)  # the old ones expired
    assert len(guard) == 1


def test_job_table_bounds() -> None:
    table = JobTable(max_entries=2, max_result_bytes=10_000)
    for i in range(3):
        key = ("k", f"job{i}")
        table.add(key, JobEntry("c", {}, keep_until_ms=10_000))
        table.complete(key, b"r" * 10, ("ok", None, None), now_ms=0)
    assert table.get(("k", "job0"), 0) is None  # evicted, oldest first
    assert table.get(("k", "job2"), 0) is not None
    assert table.get(("k", "job2"), 20_000) is None  # expired


def test_rendered_config_is_valid_for_nats_server(tmp_path: Path) -> None:
    text = render(single_node(store_dir=tmp_path / "js", port=4222, monitor_port=8222), header="test")
    path = tmp_path / "n.conf"
    path.write_text(text)
    out = subprocess.run([find_nats_server(), "-t", "-c", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert 'listen: "127.0.0.1:4222"' in text
