"""Link sessions: a signed ephemeral Diffie-Hellman handshake, then per-packet AEAD with a replay window.

Handshake (two messages, SIGMA-style "sign the ephemerals", Krawczyk, CRYPTO 2003):
  initiator -> responder: index_i, eph_i, static_i, timestamp, Sign_i(that || static_r)
  responder -> initiator: index_r, index_i, eph_r, static_r, Sign_r(that || eph_i || static_i)
Both ends are authenticated by their Ed25519 node keys; the session keys come only from the ephemeral X25519
exchange, so they are forward secret. The signature of the initiation covers the intended responder's key, so
it cannot be reflected to a third node, and the responder keeps the newest timestamp per initiator so a
replayed initiation cannot reset a session (the WireGuard rule, section 5.1 of its paper).

Transport: AES-256-GCM from `cryptography` (measured 906k packets/s per core at 1400 B, ~3x its ChaCha and
~8x PyNaCl's), nonce = 32 zero bits || 64-bit counter, associated data = the 13-byte packet header. The
receiver checks a sliding replay window (RFC 6479 style) before and after decryption.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.public
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_scalarmult

from overlay.identity import Identity, verify
from overlay.wire import (
    AEAD_TAG_LEN,
    TRANSPORT_HEADER,
    DecodeError,
    HandshakeInit,
    HandshakeResp,
    PacketType,
)

# Our choice: far beyond any reordering a link shows, and a 1024-bit int shift costs ~100 ns.
REPLAY_WINDOW = 1024
# From the AES-GCM bound we choose to respect: rekey long before 2^64 messages (here: a fresh handshake).
MAX_COUNTER = (1 << 60) - 1
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_Q = struct.Struct("!Q")


class HandshakeError(Exception):
    """A handshake message that fails verification (bad signature, wrong key, replay, stale)."""


class ReplayWindow:
    """Which counters have been accepted: the highest one and a bitmap of the REPLAY_WINDOW below it."""

    __slots__ = ("bits", "top")

    def __init__(self) -> None:
        self.top = -1
        self.bits = 0

    def fresh(self, counter: int) -> bool:
        if counter > self.top:
            return True
        offset = self.top - counter
        return offset < REPLAY_WINDOW and not (self.bits >> offset) & 1

    def mark(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


@dataclass
class Session:
    """One direction pair of keys between two node keys, named by the index each side chose."""

    local_index: int
    remote_index: int
    peer_key: bytes
    initiator: bool
    _send: AESGCM
    _recv: AESGCM
    _counter: int = 0
    _window: ReplayWindow = field(default_factory=ReplayWindow)

    def seal(self, plaintext: bytes) -> bytes:
        counter = self._counter
        if counter > MAX_COUNTER:
            raise HandshakeError("session counter exhausted; a new handshake is needed")
        self._counter = counter + 1
        header = TRANSPORT_HEADER.pack(PacketType.TRANSPORT, self.remote_index, counter)
        return header + self._send.encrypt(_NONCE_PREFIX + _Q.pack(counter), plaintext, header)

    def open(self, packet: bytes, counter: int) -> bytes:
        """Decrypt a transport packet whose header was parsed to `counter`; DecodeError on forgery/replay."""
        if not self._window.fresh(counter):
            raise DecodeError(f"replayed or too old packet (counter {counter})")
        hlen = TRANSPORT_HEADER.size
        try:
            # A view, not a slice: a TCP super-frame is ~64 KB and this is the receive path's hottest copy.
            plaintext = self._recv.decrypt(_NONCE_PREFIX + _Q.pack(counter), memoryview(packet)[hlen:], packet[:hlen])
        except InvalidTag:
            raise DecodeError("transport packet fails authentication") from None
        self._window.mark(counter)
        return plaintext

    def newest(self, counter: int) -> bool:
        """Whether `counter`, just opened, is the highest this session has accepted (not a late packet)."""
        return counter >= self._window.top

    @property
    def overhead(self) -> int:
        return TRANSPORT_HEADER.size + AEAD_TAG_LEN


@dataclass
class PendingHandshake:
    local_index: int
    peer_key: bytes
    ephemeral: nacl.public.PrivateKey
    init: HandshakeInit


def _keys(dh: bytes, eph_i: bytes, eph_r: bytes, static_i: bytes, static_r: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt=eph_i + eph_r, info=b"ipop-overlay link v1" + static_i + static_r).derive(dh)
    return okm[:32], okm[32:]


def _dh(private: nacl.public.PrivateKey, public: bytes) -> bytes:
    try:
        return bytes(crypto_scalarmult(bytes(private), public))
    except (nacl.exceptions.RuntimeError, nacl.exceptions.CryptoError, ValueError, TypeError):
        # libsodium refuses low-order points (an all-zero shared secret).
        raise HandshakeError("peer ephemeral key is not usable") from None


def new_index() -> int:
    return int.from_bytes(os.urandom(4), "big")


class Handshaker:
    """Makes and checks handshake messages for one node identity."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._last_timestamp: dict[bytes, int] = {}

    def initiate(self, peer_key: bytes, local_index: int, timestamp_ns: int) -> PendingHandshake:
        eph = nacl.public.PrivateKey.generate()
        unsigned = HandshakeInit(local_index, bytes(eph.public_key), self.identity.public_key, timestamp_ns, b"")
        sig = self.identity.sign(unsigned.signed_part() + peer_key)
        init = HandshakeInit(local_index, unsigned.ephemeral, unsigned.static, timestamp_ns, sig)
        return PendingHandshake(local_index, peer_key, eph, init)

    def respond(self, init: HandshakeInit, local_index: int) -> tuple[Session, HandshakeResp]:
        if not verify(init.static, init.signed_part() + self.identity.public_key, init.signature):
            raise HandshakeError("handshake initiation has a bad signature")
        last = self._last_timestamp.get(init.static, -1)
        if init.timestamp <= last:
            raise HandshakeError("handshake initiation is a replay (timestamp not newer)")
        eph = nacl.public.PrivateKey.generate()
        dh = _dh(eph, init.ephemeral)
        self._last_timestamp[init.static] = init.timestamp
        unsigned = HandshakeResp(local_index, init.sender_index, bytes(eph.public_key), self.identity.public_key, b"")
        sig = self.identity.sign(unsigned.signed_part() + init.ephemeral + init.static)
        resp = HandshakeResp(local_index, init.sender_index, unsigned.ephemeral, unsigned.static, sig)
        k_ir, k_ri = _keys(dh, init.ephemeral, resp.ephemeral, init.static, self.identity.public_key)
        session = Session(local_index, init.sender_index, init.static, False, AESGCM(k_ri), AESGCM(k_ir))
        return session, resp

    def complete(self, pending: PendingHandshake, resp: HandshakeResp) -> Session:
        if resp.static != pending.peer_key:
            raise HandshakeError("handshake response from a different key than the one we called")
        signed = resp.signed_part() + pending.init.ephemeral + self.identity.public_key
        if not verify(resp.static, signed, resp.signature):
            raise HandshakeError("handshake response has a bad signature")
        dh = _dh(pending.ephemeral, resp.ephemeral)
        k_ir, k_ri = _keys(dh, pending.init.ephemeral, resp.ephemeral, self.identity.public_key, resp.static)
        return Session(pending.local_index, resp.sender_index, resp.static, True, AESGCM(k_ir), AESGCM(k_ri))
