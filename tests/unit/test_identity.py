"""Identity: nkey encoding, key files (0600, bounded, checked), login-nonce guard."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import nkeys
import pytest

from meshjobs.errors import IdentityError
from meshjobs.identity import (
    MAX_KEY_FILE_BYTES,
    Identity,
    decode_public,
    decode_seed,
    load_identity,
    load_or_create,
    save_identity,
    verify,
)


def test_encoding_matches_the_nkeys_library() -> None:
    identity = Identity.generate()
    kp = nkeys.from_seed(bytearray(identity.seed_text().encode()))
    assert kp.public_key.decode() == identity.public_key
    # Same key, same signatures: one key serves NATS login and meshjobs.
    assert kp.sign(b"nonce-bytes") == identity.sign(b"nonce-bytes")
    assert verify(identity.public_key, b"abc", identity.sign(b"abc"))


def test_seed_checksum_is_checked() -> None:
    seed = Identity.generate().seed_text()
    # Change one character in the middle: nkeys 0.2.1 would accept this.
    bad = seed[:20] + ("A" if seed[20] != "A" else "B") + seed[21:]
    with pytest.raises(ValueError, match="checksum"):
        decode_seed(bad)


def test_public_key_checks() -> None:
    public = Identity.generate().public_key
    assert len(decode_public(public)) == 32
    for bad in ("", "U" * 56, public[:-1], "N" + public[1:], public.lower()):
        with pytest.raises(ValueError):
            decode_public(bad)


def test_key_file_is_private_and_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.nk"
    first = Identity.generate()
    save_identity(first, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(IdentityError, match="already exists"):
        save_identity(Identity.generate(), path)
    assert load_identity(path).public_key == first.public_key
    second = Identity.generate()
    save_identity(second, path, overwrite=True)
    assert load_identity(path).public_key == second.public_key
    assert [p.name for p in path.parent.iterdir()] == ["identity.nk"]  # no temp files left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.nk"
    save_identity(Identity.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"x" * (MAX_KEY_FILE_BYTES + 1), "larger than"),
        (b"SUnot-a-seed\n", "not a valid key file"),
        (b"\xff\xfe\x00", "not ASCII"),
        (b"", "not a valid key file"),
    ],
)
def test_bad_key_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "identity.nk"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match=message):
        load_identity(path)


def test_missing_key_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="meshjobs keygen"):
        load_identity(tmp_path / "nope.nk")


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.nk"
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create(path)[0].public_key)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert load_identity(path).public_key == keys[0]


def test_login_nonce_guard_refuses_envelope_bytes() -> None:
    identity = Identity.generate()
    assert len(identity.sign_login_nonce("QWxhZGRpbjpvcGVuIHNlc2FtZQ")) == 64
    with pytest.raises(IdentityError):
        identity.sign_login_nonce('meshjobs/1 envelope\x00{"version":1}')


def test_repr_never_shows_the_seed() -> None:
    identity = Identity.generate()
    assert identity.seed_text() not in repr(identity)
    assert identity.public_key in repr(identity)


# -- what a key file is: refusals name the path and never block ------------------------------------


def load_in_thread(path: Path, timeout: float = 5.0) -> BaseException | Identity:
    """Load *path* in a daemon thread so a regression that blocks (on a FIFO) fails instead of hanging."""
    outcome: list[BaseException | Identity] = []

    def target() -> None:
        try:
            outcome.append(load_identity(path))
        except BaseException as exc:  # noqa: BLE001 — handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"load_identity({path}) blocked for {timeout} s"
    return outcome[0]


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.nk"
    save_identity(Identity.generate(), real)
    link = tmp_path / "identity.nk"
    link.symlink_to(real)
    with pytest.raises(IdentityError, match=rf"{link} is a symbolic link"):
        load_identity(link)
    dangling = tmp_path / "dangling.nk"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(IdentityError, match="symbolic link"):
        load_identity(dangling)
    # load_or_create does not take a dangling link for "no identity yet" and write through it.
    with pytest.raises(IdentityError, match="symbolic link"):
        load_or_create(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "identity.nk"
    os.mkfifo(fifo, 0o600)
    outcome = load_in_thread(fifo)
    assert isinstance(outcome, IdentityError), outcome
    assert str(fifo) in str(outcome) and "FIFO" in str(outcome)


def test_device_and_directory_are_refused(tmp_path: Path) -> None:
    outcome = load_in_thread(Path("/dev/null"))
    assert isinstance(outcome, IdentityError) and "/dev/null is a character device" in str(outcome), outcome
    with pytest.raises(IdentityError, match=rf"{tmp_path} is a directory"):
        load_identity(tmp_path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602, 0o610])
def test_any_group_or_other_bit_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.nk"
    save_identity(Identity.generate(), path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match=f"mode {mode:04o}.*chmod 600 {path}"):
        load_identity(path)


def test_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (chown); this run is not root")
    path = tmp_path / "identity.nk"
    save_identity(Identity.generate(), path)
    os.chown(path, 65534, 65534)
    with pytest.raises(IdentityError, match=rf"{path} belongs to uid 65534"):
        load_identity(path)


def test_refusals_are_one_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    (tmp_path / "link").symlink_to("/dev/null")
    for path in (Path("/dev/null"), tmp_path, tmp_path / "fifo", tmp_path / "link"):
        outcome = load_in_thread(path)
        assert isinstance(outcome, IdentityError) and str(path) in str(outcome) and "\n" not in str(outcome)
