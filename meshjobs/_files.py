"""Reading small local files (key, trust and topology files) without being tricked by what they are.

One reader, three levels of care, chosen by who could harm us through the file:

``private`` (key files)
    The path itself must not be a symbolic link; the file must be a regular
    file owned by the current user with no group or other permission bits
    (``chmod 600``), as OpenSSH requires of private keys.
``protected`` (trust files: they decide who may run what)
    Symbolic links are followed (configuration management links files into
    place) but what they lead to is checked: a regular file owned by the
    current user or root that others may not write, nor its group unless
    that is the owner's own private group (as sshd's ``StrictModes`` requires
    of ``authorized_keys``, with Debian's allowance for user-private groups).
    Reading by others is fine: a trust file lists public keys only.
``plain`` (topology, persona and human capability files, attestations:
    examples users copy, and nothing secret)
    A regular file.

Every level refuses FIFOs, devices, sockets and directories *before* opening
them (opening a tape drive or a terminal has side effects), opens with
``O_NONBLOCK`` (a file swapped for a FIFO in between cannot make us wait for a
writer), checks what it opened with ``fstat`` (the same file as the one
checked, still regular) and bounds the size before and while reading.

A missing file raises :class:`FileNotFoundError` so callers can say what to
do about it; every other refusal is one line naming the path, raised as the
caller's :class:`~meshjobs.errors.MeshError` class.

Files we write (credentials, topology, compose files, attestations) are
written whole or not at all: :func:`write_replacing`. TOML files that a model
describes (topology, persona and human capability files) are parsed by one
function, :func:`parse_toml`, whose errors name the file and the first field
at fault, never its value.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import secrets
import stat
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from meshjobs.errors import MeshError

Care = Literal["private", "protected", "plain"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _check_kind(path: Path, what: str, info: os.stat_result, error: type[MeshError]) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {path} is a symbolic link; refusing to follow it (use the file's own path)")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is {_kind(info.st_mode)}, not a regular file")


def _private_group(info: os.stat_result) -> bool:
    """True when the file's group is its owner's own group, with nobody else in it.

    Debian and Ubuntu give each user such a group and a umask of 002, so
    their files are group-writable by default; writable by that group means
    writable by the owner alone (Debian's OpenSSH allows it for the same reason).
    """
    try:
        group = grp.getgrgid(info.st_gid)
        owner = pwd.getpwuid(info.st_uid)
    except KeyError:
        return False
    return owner.pw_gid == info.st_gid and group.gr_name == owner.pw_name and not set(group.gr_mem) - {owner.pw_name}


def _check_owner_and_mode(path: Path, what: str, info: os.stat_result, care: Care, error: type[MeshError]) -> None:
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    if care == "private":
        if info.st_uid != me:
            raise error(f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {me})")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(f"{path} is accessible by other users (mode {mode:04o}); run: chmod 600 {path}")
    elif care == "protected":
        if info.st_uid not in (me, 0):
            raise error(f"{what} {path} belongs to uid {info.st_uid}, neither this user (uid {me}) nor root")
        if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and not _private_group(info)):
            raise error(f"{what} {path} is writable by other users (mode {mode:04o}); run: chmod go-w {path}")


def _open(path: Path, what: str, follow: bool, error: type[MeshError]) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise error(f"{what} {path} is a symbolic link; refusing to follow it (use the file's own path)") from None
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None


def read_local_file(path: Path, *, what: str, max_bytes: int, care: Care, error: type[MeshError]) -> bytes:
    """The bytes of a small local file, after the checks of *care* (see the module docstring).

    *what* names the file in messages ("key file", "trust file"). Raises
    :class:`FileNotFoundError` when there is no file, *error* for every other
    refusal.
    """
    follow = care != "private"
    try:
        before = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    _check_kind(path, what, before, error)
    fd = _open(path, what, follow, error)
    try:
        info = os.fstat(fd)
        _check_kind(path, what, info, error)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise error(f"{what} {path} was replaced while being read; try again")
        _check_owner_and_mode(path, what, info, care, error)
        if info.st_size > max_bytes:
            raise error(f"{what} {path} is larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:  # it grew after the fstat
        raise error(f"{what} {path} is larger than {max_bytes} bytes")
    return b"".join(chunks)


def read_local_text(path: Path, *, what: str, max_bytes: int, error: type[MeshError]) -> str:
    """A small ``plain`` local file (persona, human capability, topology files) as UTF-8 text.

    The checks of :func:`read_local_file`; here a missing file, too, raises *error*.
    """
    try:
        data = read_local_file(path, what=what, max_bytes=max_bytes, care="plain", error=error)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None


def write_replacing(path: Path, data: str | bytes, mode: int = 0o666) -> None:
    """Write *path* whole or not at all: a new temporary file beside it (created with *mode*, less
    the umask), then renamed over it. A reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: str | bytes) -> None:
    """:func:`write_replacing` for secrets and private settings: mode 0600 from the first byte."""
    write_replacing(path, data, 0o600)


M = TypeVar("M", bound=BaseModel)


def parse_toml(text: str, model: type[M], source: str, error: type[MeshError]) -> M:
    """*text* read as TOML and validated by *model*; an *error* naming *source* and the first problem if not."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{source}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """The first problem as ``field.path: what is wrong``, plus how many more; never the offending value."""
    errors = exc.errors(include_input=False, include_url=False)
    # A failed item also fails its container's length check: report the item.
    deepest = [
        e
        for e in errors
        if not any(len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"] for o in errors)
    ]
    errors = deepest or errors
    first = errors[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "missing"
    elif kind == "value_error":
        message = str(first.get("ctx", {}).get("error", first["msg"]))
    else:
        message = first["msg"]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"
