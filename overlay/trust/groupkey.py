"""The group key: the Ed25519 key pair whose holder admits members by signing their certificates.

The private key stays with the group's administrator, in a 0600 file like a node key (overlay/identity.py);
members only need the public key, kept in a plain 0644 file they can copy around and compare by eye.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing

from overlay.identity import KeyFileError, read_key_file, write_key_file

_HEADER = "ipop-overlay group ed25519 v1"
_PUBLIC_COMMENT = "# ipop-overlay group public key"
PUBLIC_KEY_LEN = 32


class GroupKey:
    __slots__ = ("_signing_key", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls) -> GroupKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> GroupKey:
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, data: bytes) -> bytes:
        return bytes(self._signing_key.sign(data).signature)

    def save(self, path: Path) -> None:
        """Write the private key, readable by its owner only; refuses to overwrite an existing key."""
        write_key_file(path, "group key file", _HEADER, bytes(self._signing_key))

    @classmethod
    def load(cls, path: Path) -> GroupKey:
        hint = "create it with 'ipop-overlay group init --out DIR'"
        seed = read_key_file(path, "group key file", _HEADER, hint, "group init")
        try:
            return cls(nacl.signing.SigningKey(seed))
        except (ValueError, nacl.exceptions.CryptoError):
            raise KeyFileError(f"group key file {path} holds a damaged key") from None


def format_public_key(key: bytes) -> str:
    """The base64 form members copy into their configuration and compare by eye."""
    if len(key) != PUBLIC_KEY_LEN:
        raise ValueError(f"a group public key is {PUBLIC_KEY_LEN} bytes, got {len(key)}")
    return base64.b64encode(key).decode()


def parse_public_key(text: str) -> bytes:
    """Inverse of format_public_key; tolerates surrounding whitespace and missing '=' padding (copy-paste)."""
    compact = text.strip()
    try:
        key = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != PUBLIC_KEY_LEN:
        shown = compact if len(compact) <= 60 else compact[:57] + "..."
        raise ValueError(f"not a group public key (base64 of {PUBLIC_KEY_LEN} bytes): {shown!r}")
    return key


def write_public(path: Path, public_key: bytes) -> None:
    """Write the public key file handed to members; refuses to overwrite one that exists."""
    text = f"{_PUBLIC_COMMENT}\n{format_public_key(public_key)}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise KeyFileError(f"group public key file {path} already exists; remove it or choose another path") from None
    except OSError as e:
        raise KeyFileError(f"cannot create group public key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_public_key(path: Path) -> bytes:
    """The group public key in `path`; '#' comment lines and blank lines are ignored."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise KeyFileError(
            f"group public key file {path} does not exist; copy it from the group's administrator"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot read group public key file {path}: {e.strerror}") from None
    body = "".join(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    try:
        return parse_public_key(body)
    except ValueError:
        raise KeyFileError(
            f"group public key file {path} does not hold a group public key (base64 of {PUBLIC_KEY_LEN} bytes)"
        ) from None
