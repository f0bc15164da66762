"""Peer identity: an Ed25519 key stored as a NATS user nkey.

One key serves two purposes: NATS nkey login (the server sends a nonce, we sign
it) and signing meshjobs envelopes and results. The two never mix because every
meshjobs signature covers a domain-separation prefix that no login nonce can
start with (:func:`sign_login_nonce` refuses anything that is not a plain
server nonce).

The public key *is* the identity: a 56-character string starting with ``U``.
Names are for display only.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from nacl.bindings import crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshjobs._files import read_local_file
from meshjobs.errors import IdentityError, InvalidKey

# nkey prefix bytes (github.com/nats-io/nkeys): seeds start with "S", users with "U".
_PREFIX_SEED = 18 << 3
_PREFIX_USER = 20 << 3

#: Key files are a single line of 58 characters; anything much larger is not a key.
MAX_KEY_FILE_BYTES = 4096
IDENTITY_FILE = "identity.nk"

_PUBLIC_RE = re.compile(r"U[A-Z2-7]{55}")
_SEED_RE = re.compile(r"SU[A-Z2-7]{56}")
# nats-server nonces are short base64url strings; we refuse to sign anything else.
_NONCE_RE = re.compile(r"[A-Za-z0-9_\-+/=]{8,128}")


def _crc16(data: bytes) -> bytes:
    # nkeys use CRC-16/XMODEM, which is binascii.crc_hqx with a zero start value.
    return binascii.crc_hqx(data, 0).to_bytes(2, "little")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def encode_public(raw: bytes) -> str:
    """Encode a 32-byte Ed25519 public key as a user nkey (``U...``)."""
    if len(raw) != 32:
        raise InvalidKey("an Ed25519 public key is 32 bytes")
    body = bytes([_PREFIX_USER]) + raw
    return _b32(body + _crc16(body))


def decode_public(text: str) -> bytes:
    """Decode a user nkey to its 32 raw bytes, checking prefix and checksum.

    Raises :class:`InvalidKey` (a ValueError) with a short sentence when the text is not a
    valid user public key.
    """
    if not isinstance(text, str) or not _PUBLIC_RE.fullmatch(text):
        raise InvalidKey("not a user public key (56 characters starting with U)")
    data = _unb32(text)
    body, crc = data[:-2], data[-2:]
    if _crc16(body) != crc:
        raise InvalidKey("public key checksum does not match")
    if body[0] != _PREFIX_USER:
        raise InvalidKey("not a user public key")
    return body[1:]


def is_public_key(text: object) -> bool:
    """True when *text* is a well-formed user nkey with a valid checksum."""
    if not isinstance(text, str):
        return False
    try:
        verify_key(text)  # cached: the same few peers are checked on every message
    except ValueError:
        return False
    return True


def encode_seed(seed: bytes) -> str:
    """Encode a 32-byte Ed25519 seed as a user nkey seed (``SU...``)."""
    if len(seed) != 32:
        raise InvalidKey("an Ed25519 seed is 32 bytes")
    b1 = _PREFIX_SEED | (_PREFIX_USER >> 5)
    b2 = (_PREFIX_USER & 31) << 3
    body = bytes([b1, b2]) + seed
    return _b32(body + _crc16(body))


def decode_seed(text: str) -> bytes:
    """Decode a user nkey seed to its 32 raw bytes, checking the checksum.

    nkeys 0.2.1 does not check the seed checksum; we always do.
    """
    if not _SEED_RE.fullmatch(text):
        raise InvalidKey("not a user seed (58 characters starting with SU)")
    data = _unb32(text)
    body, crc = data[:-2], data[-2:]
    if _crc16(body) != crc:
        raise InvalidKey("seed checksum does not match")
    if body[0] & 0xF8 != _PREFIX_SEED or ((body[0] & 7) << 5) | ((body[1] & 0xF8) >> 3) != _PREFIX_USER:
        raise InvalidKey("not a user seed")
    return body[2:]


_verify_keys: dict[str, VerifyKey] = {}


def verify_key(public: str) -> VerifyKey:
    """The PyNaCl verify key for a user nkey, cached (peers are few, lookups many)."""
    key = _verify_keys.get(public)
    if key is None:
        key = VerifyKey(decode_public(public))
        if len(_verify_keys) > 65536:
            _verify_keys.clear()
        _verify_keys[public] = key
    return key


def verify(public: str, message: bytes, signature: bytes) -> bool:
    """Check an Ed25519 signature by a user nkey. Never raises for bad input."""
    try:
        verify_key(public).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A peer's signing key. ``public_key`` is the peer id; the seed never leaves."""

    _signing_key: SigningKey = field(repr=False)
    public_key: str

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        public, _ = crypto_sign_seed_keypair(seed)
        return cls(SigningKey(seed), encode_public(public))

    @classmethod
    def from_seed_text(cls, text: str) -> Identity:
        try:
            return cls.from_seed(decode_seed(text.strip()))
        except ValueError as exc:
            raise IdentityError(f"invalid key: {exc}") from None

    def seed_text(self) -> str:
        """The nkey seed, for writing the key file and for NATS login only."""
        return encode_seed(bytes(self._signing_key))

    def sign(self, message: bytes) -> bytes:
        """Sign *message* (the caller adds the domain prefix). Returns 64 bytes."""
        return self._signing_key.sign(message).signature

    def sign_login_nonce(self, nonce: str) -> bytes:
        """Sign a NATS login nonce, refusing anything but a plain server nonce.

        A malicious server could otherwise send the bytes of a meshjobs
        envelope as its "nonce" and obtain a valid signature over it.
        """
        if not _NONCE_RE.fullmatch(nonce):
            raise IdentityError("refusing to sign an unusual login nonce from the server")
        return self.sign(nonce.encode("ascii"))


def load_identity(path: Path) -> Identity:
    """Read a key file: a regular file (not a symbolic link, FIFO or device), yours, 0600, small, one seed."""
    try:
        data = read_local_file(path, what="key file", max_bytes=MAX_KEY_FILE_BYTES, care="private", error=IdentityError)
    except FileNotFoundError:
        raise IdentityError(f"no identity at {path}; create one with: meshjobs keygen") from None
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise IdentityError(f"{path} is not a key file (not ASCII text)") from None
    try:
        return Identity.from_seed(decode_seed(text))
    except ValueError as exc:
        raise IdentityError(f"{path} is not a valid key file: {exc}") from None


def save_identity(identity: Identity, path: Path, *, overwrite: bool = False) -> None:
    """Write a key file atomically with mode 0600; never replaces one unless asked."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.path.lexists(path) and not overwrite:
        raise IdentityError(f"{path} already exists; use --force to replace it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(identity.seed_text() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, so two racing creators cannot
            # both win and neither overwrites the other.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(f"{path} already exists; use --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create(path: Path) -> tuple[Identity, bool]:
    """Load the identity at *path*, creating it first if there is none.

    Returns ``(identity, created)``. Safe against a concurrent creator: the
    loser of the race loads the winner's key.
    """
    if not os.path.lexists(path):  # a dangling symbolic link is not "no identity": load_identity refuses it
        try:
            identity = Identity.generate()
            save_identity(identity, path)
            return identity, True
        except IdentityError:
            if not os.path.lexists(path):
                raise
    return load_identity(path), False
