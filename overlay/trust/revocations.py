"""Revocations: the group key's signed "node key K is no longer a member", and the set a node holds of them.

Like Nebula's blocklist, a revocation names a key, not one certificate, but it is bounded in time: it covers
every certificate of that node key issued at or before `revoked_ms`. A member later re-admitted gets a fresh
certificate issued after the revocation and is not covered; a certificate issued (or renewed) before it stays
revoked. Once `until_ms` passes, every certificate it covers has expired anyway, so holders may forget it and
the set stays as small as the group's recent departures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from overlay.identity import KeyFileError, verify
from overlay.ids import node_id_from_public_key
from overlay.trust.certs import (
    KEY_LEN,
    SIGNATURE_LEN,
    CertError,
    Certificate,
    jid_problem,
    length_problem,
    ms,
    u64_problem,
)
from overlay.trust.groupkey import GroupKey

VERSION = 1
# Our choice: far above any real group's recent departures, small enough that a list is at most ~1.6 MB.
MAX_LIST_ENTRIES = 4096

# Domain separation from certificates (overlay/trust/certs.py), which share the version byte and key fields.
_REVOCATION_CONTEXT = b"ipop-overlay revocation v1\x00"
_SET_DIGEST_CONTEXT = b"ipop-overlay revocation set v1\x00"
# version | group | node key | revoked_ms | until_ms | JID length
_REV_HEAD = struct.Struct("!B32s32sQQB")
_COUNT = struct.Struct("!H")
# A revocation naming no node key covers every certificate of its JID: an issuer revokes a member removed from
# the room without knowing which node keys it holds (several issuers, or certificates older than its state).
ALL_NODES = bytes(KEY_LEN)
_DIGEST_LEN = 16


@dataclass(frozen=True, slots=True)
class Revocation:
    group: bytes
    """The Ed25519 public key of the group that revoked (32 bytes)."""
    node_key: bytes
    """The revoked node's Ed25519 public key (32 bytes), or ALL_NODES: every node of `jid`."""
    jid: str
    """The member's bare JID: what a revocation for ALL_NODES covers; for people reading logs otherwise."""
    revoked_ms: int
    """Unix time in milliseconds: certificates of node_key issued at or before it are revoked."""
    until_ms: int
    """Unix time in milliseconds after which every certificate it covers has expired, so it may be forgotten."""
    signature: bytes
    """The group key's Ed25519 signature over signed_part() (64 bytes)."""

    def __post_init__(self) -> None:
        problem = (
            length_problem("group key", self.group, KEY_LEN)
            or length_problem("node key", self.node_key, KEY_LEN)
            or length_problem("signature", self.signature, SIGNATURE_LEN)
            or jid_problem(self.jid)
            or u64_problem("revoked_ms", self.revoked_ms)
            or u64_problem("until_ms", self.until_ms)
        )
        if problem is None and self.until_ms <= self.revoked_ms:
            problem = f"until_ms {self.until_ms} is not after revoked_ms {self.revoked_ms}"
        if problem is not None:
            raise ValueError(problem)

    @property
    def node_id(self) -> int:
        return node_id_from_public_key(self.node_key)

    @property
    def slot(self) -> bytes:
        """What the revocation is about: the node key, or the JID for every node of a member."""
        return self.node_key if self.node_key != ALL_NODES else b"jid:" + self.jid.encode()

    def _unsigned(self) -> bytes:
        jid = self.jid.encode()
        head = _REV_HEAD.pack(VERSION, self.group, self.node_key, self.revoked_ms, self.until_ms, len(jid))
        return head + jid

    def signed_part(self) -> bytes:
        return _REVOCATION_CONTEXT + self._unsigned()

    def encode(self) -> bytes:
        return self._unsigned() + self.signature


def decode_revocation(data: bytes) -> Revocation:
    """Parse a revocation from peer bytes; strict (exact length, known version); raises only CertError."""
    if len(data) < _REV_HEAD.size + SIGNATURE_LEN:
        raise CertError(f"revocation of {len(data)} bytes is too short")
    version, group, node_key, revoked_ms, until_ms, jid_len = _REV_HEAD.unpack_from(data)
    if version != VERSION:
        raise CertError(f"revocation version {version}, this node understands {VERSION}")
    expected = _REV_HEAD.size + jid_len + SIGNATURE_LEN
    if len(data) != expected:
        raise CertError(f"revocation of {len(data)} bytes, its JID length says {expected}")
    jid_bytes = data[_REV_HEAD.size : _REV_HEAD.size + jid_len]
    try:
        jid = jid_bytes.decode()
    except UnicodeDecodeError:
        raise CertError(f"revocation JID {jid_bytes!r} is not UTF-8") from None
    try:
        return Revocation(group, node_key, jid, revoked_ms, until_ms, data[-SIGNATURE_LEN:])
    except ValueError as e:
        raise CertError(f"bad revocation: {e}") from None


def make_revocation(key: GroupKey, *, node_key: bytes, jid: str, now: float, until: float) -> Revocation:
    """Revoke every certificate of `node_key` issued up to `now`.

    `until` is the unix time (seconds) by which all of them have expired: at latest `now` plus the longest
    certificate lifetime the group issues.
    """
    unsigned = Revocation(
        group=key.public_key,
        node_key=node_key,
        jid=jid,
        revoked_ms=ms(now),
        until_ms=ms(until),
        signature=bytes(SIGNATURE_LEN),
    )
    return dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_part()))


def check_revocation(rev: Revocation, group_public: bytes) -> str | None:
    """None when `rev` really comes from the group key `group_public`, else a short reason."""
    if rev.group != group_public:
        return "signed by another group"
    if not verify(group_public, rev.signed_part(), rev.signature):
        return "bad signature"
    return None


class RevocationSet:
    """The verified revocations a node holds, one per node key (or JID): the one with the latest revoked_ms.

    The latest one is enough because its coverage (issued_ms <= revoked_ms) includes every earlier one's.
    """

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[bytes, Revocation] = {}

    def add(self, rev: Revocation, group_public: bytes, now: float) -> bool:
        """Keep `rev` if it is genuine, unexpired and news; True only when the set changed (worth passing on)."""
        if check_revocation(rev, group_public) is not None or rev.until_ms / 1000 <= now:
            return False
        held = self._by_key.get(rev.slot)
        if held is not None:
            # Equal revoked_ms (two revocations in one millisecond): the larger encoding wins, so that every
            # node converges on the same set and neighbours' digests agree.
            if (held.revoked_ms, held.encode()) >= (rev.revoked_ms, rev.encode()):
                return False
        self._by_key[rev.slot] = rev
        return True

    def covers(self, cert: Certificate) -> bool:
        """True when `cert` is revoked (the caller has checked its signature, so issued_ms is the group's)."""
        for slot in (cert.node_key, b"jid:" + cert.jid.encode()):
            rev = self._by_key.get(slot)
            if rev is not None and rev.group == cert.group and cert.issued_ms <= rev.revoked_ms:
                return True
        return False

    def revoked_node_ids(self) -> set[int]:
        """Nodes revoked by key (a revocation of a whole JID is applied through `covers`)."""
        return {rev.node_id for rev in self._by_key.values() if rev.node_key != ALL_NODES}

    def prune(self, now: float) -> int:
        """Forget revocations whose certificates have all expired; returns how many were dropped."""
        expired = [key for key, rev in self._by_key.items() if rev.until_ms / 1000 <= now]
        for key in expired:
            del self._by_key[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._by_key)

    def items(self) -> list[Revocation]:
        """The held revocations in node-key order, so encodings of equal sets are equal."""
        return [self._by_key[key] for key in sorted(self._by_key)]

    def digest(self) -> bytes:
        """16 bytes that differ between sets with different contents: neighbours compare these, not lists."""
        h = hashlib.sha256(_SET_DIGEST_CONTEXT)
        for encoded in sorted(rev.encode() for rev in self._by_key.values()):
            h.update(_COUNT.pack(len(encoded)) + encoded)
        return h.digest()[:_DIGEST_LEN]

    @staticmethod
    def encode_list(revs: Iterable[Revocation]) -> bytes:
        """count (2 bytes) then each revocation as length (2 bytes) and encoding."""
        encoded = [rev.encode() for rev in revs]
        if len(encoded) > MAX_LIST_ENTRIES:
            raise ValueError(f"{len(encoded)} revocations in one list, at most {MAX_LIST_ENTRIES}")
        return _COUNT.pack(len(encoded)) + b"".join(_COUNT.pack(len(e)) + e for e in encoded)

    @staticmethod
    def decode_list(data: bytes) -> list[Revocation]:
        """Inverse of encode_list on peer bytes; strict (every byte accounted for); raises only CertError."""
        if len(data) < _COUNT.size:
            raise CertError(f"revocation list of {len(data)} bytes is too short")
        (count,) = _COUNT.unpack_from(data)
        if count > MAX_LIST_ENTRIES:
            raise CertError(f"revocation list of {count} entries, at most {MAX_LIST_ENTRIES}")
        revs: list[Revocation] = []
        offset = _COUNT.size
        for i in range(count):
            if len(data) < offset + _COUNT.size:
                raise CertError(f"revocation list ends before entry {i} of {count}")
            (size,) = _COUNT.unpack_from(data, offset)
            offset += _COUNT.size
            if len(data) < offset + size:
                raise CertError(f"revocation list entry {i} of {size} bytes runs past the end")
            revs.append(decode_revocation(data[offset : offset + size]))
            offset += size
        if offset != len(data):
            raise CertError(f"revocation list has {len(data) - offset} bytes after its {count} entries")
        return revs

    def save(self, path: Path) -> None:
        """Replace `path` atomically: readers see the old list or the new one, never half of either."""
        data = self.encode_list(self.items())
        tmp = None
        try:
            # mkstemp creates the file 0600 in the same directory, so os.replace is a rename on one filesystem.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            # Make the rename itself durable across a power loss.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise KeyFileError(f"cannot write revocation file {path}: {e.strerror}") from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    @classmethod
    def load(cls, path: Path, group_public: bytes, now: float) -> RevocationSet:
        """The revocations saved in `path` that still verify and matter at `now`; a missing file is an empty set."""
        revs = cls()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return revs
        except OSError as e:
            raise KeyFileError(f"cannot read revocation file {path}: {e.strerror}") from None
        try:
            decoded = cls.decode_list(data)
        except CertError as e:
            raise KeyFileError(
                f"revocation file {path} is damaged ({e}); restore it from a backup or remove it"
            ) from None
        for rev in decoded:
            revs.add(rev, group_public, now)
        return revs
