"""Reading local files: regular, bounded, never blocking; trust files not writable by others."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from meshjobs._files import read_local_file
from meshjobs.errors import PolicyFileError
from meshjobs.identity import Identity
from meshjobs.trust.policy import MAX_TRUST_FILE_BYTES, load_trust


def trust_text() -> str:
    return f'[[peer]]\nkey = "{Identity.generate().public_key}"\n'


def load_in_thread(path: Path, timeout: float = 5.0) -> object:
    """Run load_trust in a daemon thread, so a regression that blocks on a FIFO fails instead of hanging."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(load_trust(path, required=True))
        except BaseException as exc:  # noqa: BLE001 — handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"load_trust({path}) blocked for {timeout} s"
    return outcome[0]


def test_a_readable_trust_file_and_a_symlink_to_it_load(tmp_path: Path) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(trust_text())
    os.chmod(path, 0o644)  # others may read it: public keys only
    assert len(load_trust(path, required=True).keys) == 1
    link = tmp_path / "linked.toml"
    link.symlink_to(path)  # configuration management links files into place
    assert len(load_trust(link, required=True).keys) == 1


@pytest.mark.parametrize("mode", [0o646, 0o666, 0o602])
def test_trust_file_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(trust_text())
    os.chmod(path, mode)
    with pytest.raises(PolicyFileError, match=rf"{path} is writable by other users .*chmod go-w"):
        load_trust(path, required=True)


def test_trust_file_writable_by_a_shared_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(trust_text())
    os.chmod(path, 0o664)
    if os.geteuid() == 0:
        os.chown(path, 0, 65534)  # root's file, writable by group nogroup: others could change who is trusted
    else:
        pytest.skip("needs root to give the file a shared group")
    with pytest.raises(PolicyFileError, match="writable by other users"):
        load_trust(path, required=True)


def test_group_write_by_the_owners_private_group_is_allowed(tmp_path: Path) -> None:
    """Debian and Ubuntu: umask 002 with one private group per user; that group is the owner alone."""
    import grp
    import pwd

    me = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(me.pw_gid)
    if group.gr_name != me.pw_name or set(group.gr_mem) - {me.pw_name}:
        pytest.skip(f"this user's primary group {group.gr_name!r} is not a private group")
    path = tmp_path / "trust.toml"
    path.write_text(trust_text())
    os.chown(path, me.pw_uid, me.pw_gid)
    os.chmod(path, 0o664)
    assert len(load_trust(path, required=True).keys) == 1


def test_trust_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (chown); this run is not root")
    path = tmp_path / "trust.toml"
    path.write_text(trust_text())
    os.chown(path, 65534, 65534)
    with pytest.raises(PolicyFileError, match="belongs to uid 65534"):
        load_trust(path, required=True)


def test_fifo_device_directory_and_oversized_trust_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_TRUST_FILE_BYTES + 1))
    dangling = tmp_path / "dangling.toml"
    dangling.symlink_to(tmp_path / "missing")
    cases = {
        fifo: "is a FIFO",
        Path("/dev/null"): "is a character device",
        tmp_path: "is a directory",
        big: "larger than",
        dangling: "does not exist",
    }
    for path, message in cases.items():
        outcome = load_in_thread(path)
        assert isinstance(outcome, PolicyFileError), (path, outcome)
        assert message in str(outcome) and str(path) in str(outcome) and "\n" not in str(outcome)


def test_plain_files_only_need_to_be_regular_and_small(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_bytes(b"x" * 10)
    os.chmod(path, 0o666)
    assert read_local_file(path, what="topology", max_bytes=10, care="plain", error=PolicyFileError) == b"x" * 10
    with pytest.raises(PolicyFileError, match="larger than 9 bytes"):
        read_local_file(path, what="topology", max_bytes=9, care="plain", error=PolicyFileError)
    with pytest.raises(FileNotFoundError):
        read_local_file(tmp_path / "none", what="topology", max_bytes=9, care="plain", error=PolicyFileError)
