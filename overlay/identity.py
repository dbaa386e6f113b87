"""Node identity: the Ed25519 key pair a node is known by; its node ID is the hash of the public key.

PyNaCl for keys and signatures (ARCHITECTURE.md: its per-call overhead is fine off the per-packet path).
The private key never leaves the node: it is read from a 0600 file and used to sign and, converted to X25519,
as the static key of the link handshake (overlay/transport/session.py).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import nacl.exceptions
import nacl.signing

from overlay.ids import node_id_from_public_key

_HEADER = "ipop-overlay ed25519 v1"


class KeyFileError(Exception):
    """A key file that cannot be used: one line naming the file and what to do."""


class Identity:
    __slots__ = ("_signing_key", "node_id", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: int = node_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, data: bytes) -> bytes:
        return bytes(self._signing_key.sign(data).signature)

    def x25519_private(self) -> bytes:
        """The X25519 private key this Ed25519 key converts to (libsodium crypto_sign_ed25519_sk_to_curve25519)."""
        return bytes(self._signing_key.to_curve25519_private_key())

    def save(self, path: Path) -> None:
        """Write the private key, readable by its owner only; refuses to overwrite an existing key."""
        write_key_file(path, "key file", _HEADER, bytes(self._signing_key))

    @classmethod
    def load(cls, path: Path) -> Identity:
        seed = read_key_file(path, "key file", _HEADER, f"create it with 'ipop-overlay keygen {path}'", "keygen")
        try:
            return cls(nacl.signing.SigningKey(seed))
        except (ValueError, nacl.exceptions.CryptoError):
            raise KeyFileError(f"key file {path} holds a damaged key") from None


def write_key_file(path: Path, what: str, header: str, secret: bytes, mode: int = 0o600) -> None:
    """A new key file (`header`, then the base64 of `secret`), mode 0600; never overwrites (one line on error)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{what} {path} already exists; remove it or choose another path") from None
    except OSError as e:
        raise KeyFileError(f"cannot create {what} {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{header}\n{base64.b64encode(secret).decode()}\n")


def read_key_file(path: Path, what: str, header: str, missing_hint: str, maker: str) -> bytes:
    """The secret of a key file written by write_key_file. Refused (KeyFileError, one line) when missing,
    unreadable, readable by group or others (as ssh refuses such a private key), or not of this kind."""
    try:
        st = path.stat()
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist; {missing_hint}") from None
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); run 'chmod 600 {path}'"
        )
    lines = text.split()
    if len(lines) < 2 or " ".join(lines[:-1]) != header:
        raise KeyFileError(
            f"{what} {path} is not an ipop-overlay {what.removesuffix(' file')} (made by 'ipop-overlay {maker}')"
        )
    try:
        return base64.b64decode(lines[-1], validate=True)
    except ValueError:
        raise KeyFileError(f"{what} {path} holds a damaged key") from None


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` is public_key's Ed25519 signature of data; any malformed input is just False."""
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True
