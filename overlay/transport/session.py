"""Link sessions: a Noise IK handshake between two members, then per-packet AEAD with a replay window.

Handshake: Noise_IK_25519_AESGCM_SHA256 (the Noise Protocol Framework, revision 34, overlay/transport/noise.py,
checked against the cacophony vectors). IK because the initiator always knows whom it calls: every contact,
hello and signal names the peer's node key. A node's X25519 static key is its Ed25519 node key converted
(libsodium's crypto_sign_ed25519_*_to_curve25519, RFC 7748 section 4.1's birational map), so the node ID
(the hash of the Ed25519 key) and the key file stay what they were. The prologue binds the group's public
key: members of two groups cannot complete a handshake with each other at all.
  initiator -> responder: msg 1 = e, es, s, ss, payload(index_i, timestamp, node key_i, credential_i)
  responder -> initiator: index_i, msg 2 = e, ee, se, payload(index_r, credential_r)
The credential is the member's group certificate (overlay/trust/); `Credentials.admit` decides whether the
peer's may link. The initiator's node key in the payload must convert to the static key Noise authenticated,
so a certificate cannot be presented by anyone but the key it names. The session keys are Noise's split():
forward secret (ee and se use fresh ephemerals). The responder keeps the newest timestamp per initiator, so a
replayed initiation cannot reset a session (WireGuard's rule, section 5.1 of its paper). Rekeying is a new
handshake after REKEY_AFTER_TIME or REKEY_AFTER_MESSAGES; a session older than REJECT_AFTER_TIME or past
REJECT_AFTER_MESSAGES is refused (WireGuard's constants, section 6.1 of its paper).

Transport: Noise transport messages with an explicit nonce (as WireGuard does): AES-256-GCM (ipsec-mb or
OpenSSL's libcrypto through overlay/_fast.c and overlay/_gcm.h, which the compiled data path shares), nonce = 32
zero bits || 64-bit counter (Noise section 12.3), associated data = the 13-byte packet header. The receiver
checks a sliding replay window (RFC 6479 style) before decryption and marks it after. The counter's top byte is
its lane: each lane has its own counter and window, so each of the node's Engine threads sends in its own lane
(docs/datapath.md, Lanes); Python sends in lane 0.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Protocol

import nacl.exceptions
import nacl.signing

from overlay._fast import REPLAY_WINDOW as FAST_REPLAY_WINDOW
from overlay._fast import Exhausted, Forged, Keys, Replayed
from overlay.identity import Identity
from overlay.tap.frames import Bytes
from overlay.transport.noise import HandshakeState, KeyPair, NoiseError
from overlay.wire import (
    AEAD_TAG_LEN,
    SEALED_LINK_PART,
    TRANSPORT_HEADER,
    DecodeError,
    HandshakeInit,
    HandshakeResp,
    PacketType,
)

# Our choice (overlay/_keys.h): far beyond any reordering a link shows.
REPLAY_WINDOW = FAST_REPLAY_WINDOW
PROTOCOL = "Noise_IK_25519_AESGCM_SHA256"
# WireGuard's timers and limits (its paper, section 6.1): a session's initiator starts a new handshake after
# REKEY_AFTER_TIME or REKEY_AFTER_MESSAGES; nobody sends or accepts on a session past the REJECT limits.
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
# A counter's top byte is its lane (overlay/_keys.h, LANES): each lane counts 56 bits, and the limits are
# WireGuard's, in the same proportion to a lane's space (1/16 of it; 2**13 short of its end).
REKEY_AFTER_MESSAGES = 1 << 52
REJECT_AFTER_MESSAGES = (1 << 56) - (1 << 13) - 1
MAX_COUNTER = REJECT_AFTER_MESSAGES
_INIT_PAYLOAD = struct.Struct("!IQ32s")  # sender index, timestamp (ns), Ed25519 node key; then the credential
_RESP_PAYLOAD = struct.Struct("!I")  # sender index; then the credential
_TRANSPORT, _SEALED = int(PacketType.TRANSPORT), int(PacketType.SEALED)


class HandshakeError(Exception):
    """A handshake message that fails verification (bad signature, wrong key, replay, stale)."""


@dataclass
class Session:
    """One direction pair of keys between two node keys, named by the index each side chose. The keys, the send
    counter and the replay window live in a compiled `Keys` (overlay/_keys.h), shared with the compiled data
    path's thread: a counter is never sent twice and a packet never accepted twice, whichever side handles it."""

    local_index: int
    remote_index: int
    peer_key: bytes
    initiator: bool
    keys: Keys
    created: float = 0.0  # the clock's time at the handshake (rekey and reject timers)
    credential: bytes = b""  # what the peer presented (its certificate's encoding)

    def seal(self, plaintext: Bytes, lane: int = 0) -> bytes:
        """A transport packet, counted in `lane` (only to a peer that keeps a window per lane: HELLO_LANES)."""
        try:
            return self.keys.seal(_TRANSPORT, self.remote_index, plaintext, lane)
        except Exhausted:
            raise HandshakeError("session counter exhausted; a new handshake is needed") from None

    def open(self, packet: Bytes, counter: int) -> bytes:
        """Decrypt a transport packet whose header was parsed to `counter`; DecodeError on forgery/replay."""
        try:
            return self.keys.open(packet, counter)
        except (Replayed, Forged) as e:
            raise DecodeError(str(e)) from None

    def seal_header(self, header: bytes, packet: Bytes, ptype: int = _SEALED, lane: int = 0) -> bytes:
        """A SEALED (routed header, end-to-end packet) or TUNNEL (relay head, the tunnel's transport packet)
        link packet: the header encrypted under the link's key with the packet's tag as associated data, then
        the packet as it is (a relay's cost does not grow with size)."""
        try:
            return self.keys.seal_header(self.remote_index, header, packet, ptype, lane)
        except Exhausted:
            raise HandshakeError("session counter exhausted; a new handshake is needed") from None

    def open_header(self, packet: bytes, counter: int, part: int = SEALED_LINK_PART) -> bytes:
        """The header of a SEALED or TUNNEL packet, `part` bytes after the 13-byte header with its tag (the
        packet it binds follows); DecodeError on forgery or replay. Changing the bound packet's tag fails here;
        changing the rest of it fails where its own key opens it."""
        try:
            return self.keys.open_header(packet, counter, part)
        except (Replayed, Forged) as e:
            raise DecodeError(str(e)) from None

    def wants_rekey(self, now: float) -> bool:
        """WireGuard's rule: the session's initiator rekeys on time or message count."""
        return self.initiator and (now - self.created >= REKEY_AFTER_TIME or self.keys.highest >= REKEY_AFTER_MESSAGES)

    def expired(self, now: float) -> bool:
        return now - self.created >= REJECT_AFTER_TIME

    def newest(self, counter: int) -> bool:
        """Whether `counter`, just opened, is the highest this session has accepted (not a late packet)."""
        return self.keys.newest(counter)

    @property
    def overhead(self) -> int:
        return TRANSPORT_HEADER.size + AEAD_TAG_LEN


class Credentials(Protocol):
    """What a member presents in its handshakes and how it judges the peer's (overlay/trust/members.py)."""

    def prologue(self) -> bytes:
        """Bytes both ends must agree on: the group's public key."""
        ...

    def own(self) -> bytes:
        """Our credential (certificate encoding) to send."""
        ...

    def admit(self, node_key: bytes, credential: bytes) -> None:
        """Raise HandshakeError with the reason when this peer may not link."""
        ...


class OpenCredentials:
    """No group key: every peer that completes the handshake is admitted (in-memory tests and simulations)."""

    def prologue(self) -> bytes:
        return b"open"

    def own(self) -> bytes:
        return b""

    def admit(self, node_key: bytes, credential: bytes) -> None:
        return None


@dataclass
class PendingHandshake:
    local_index: int
    peer_key: bytes
    state: HandshakeState
    init: HandshakeInit


@dataclass
class OpenedInit:
    """An initiation that authenticated, before we answer it."""

    state: HandshakeState
    sender_index: int
    timestamp: int
    node_key: bytes
    credential: bytes


# Converting checks that the point lies in the prime-order subgroup (a scalar multiplication in libsodium): 76 us,
# as much as one X25519, measured 2026-12-06 under cProfile. Each handshake converts the peer's key once at
# either end, and a link's rekeys every REKEY_AFTER_TIME convert the same key again, so conversions are
# remembered. Keys that fail raise and are not remembered.
@functools.lru_cache(maxsize=1024)
def x25519_public(node_key: bytes) -> bytes:
    """The X25519 public key that an Ed25519 node key converts to; HandshakeError for an unusable key."""
    try:
        return bytes(nacl.signing.VerifyKey(node_key).to_curve25519_public_key())
    except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, ValueError, TypeError):
        raise HandshakeError("node key is not a usable Ed25519 public key") from None


def new_index() -> int:
    return int.from_bytes(os.urandom(4), "big")


def _session(state: HandshakeState, local: int, remote: int, peer: bytes, initiator: bool, now: float) -> Session:
    assert state.cipher_states is not None
    c1, c2 = state.cipher_states
    k1, k2 = c1.k, c2.k
    assert k1 is not None and k2 is not None
    send, recv = (k1, k2) if initiator else (k2, k1)
    return Session(local, remote, peer, initiator, Keys(send, recv), now)


class Handshaker:
    """Makes and checks handshake messages for one node identity."""

    def __init__(self, identity: Identity, credentials: Credentials | None = None) -> None:
        self.identity = identity
        self.credentials: Credentials = credentials or OpenCredentials()
        self._static = KeyPair(identity.x25519_private())
        self._last_timestamp: dict[bytes, int] = {}

    def _prologue(self) -> bytes:
        return b"ipop-overlay link v2\x00" + self.credentials.prologue()

    def initiate(self, peer_key: bytes, local_index: int, timestamp_ns: int) -> PendingHandshake:
        state = HandshakeState(PROTOCOL, True, self._prologue(), s=self._static, rs=x25519_public(peer_key))
        payload = _INIT_PAYLOAD.pack(local_index, timestamp_ns, self.identity.public_key) + self.credentials.own()
        init = HandshakeInit(state.write_message(payload))
        return PendingHandshake(local_index, peer_key, state, init)

    def open_init(self, init: HandshakeInit) -> OpenedInit:
        """Authenticate an initiation and judge its sender; HandshakeError says why it is refused."""
        state = HandshakeState(PROTOCOL, False, self._prologue(), s=self._static)
        try:
            payload = state.read_message(init.message)
        except NoiseError:
            raise HandshakeError("handshake initiation fails authentication") from None
        if len(payload) < _INIT_PAYLOAD.size:
            raise HandshakeError("handshake initiation payload too short")
        sender_index, timestamp, node_key = _INIT_PAYLOAD.unpack_from(payload)
        if state.rs != x25519_public(node_key):
            raise HandshakeError("handshake initiation names a node key it does not hold")
        credential = payload[_INIT_PAYLOAD.size :]
        self.credentials.admit(node_key, credential)
        if timestamp <= self._last_timestamp.get(node_key, -1):
            raise HandshakeError("handshake initiation is a replay (timestamp not newer)")
        return OpenedInit(state, sender_index, timestamp, node_key, credential)

    def answer(self, opened: OpenedInit, local_index: int, now: float = 0.0) -> tuple[Session, HandshakeResp]:
        """The response to an initiation `open_init` accepted, and the session it starts."""
        if opened.timestamp <= self._last_timestamp.get(opened.node_key, -1):
            raise HandshakeError("handshake initiation is a replay (timestamp not newer)")
        self._last_timestamp[opened.node_key] = opened.timestamp
        state = opened.state
        message = state.write_message(_RESP_PAYLOAD.pack(local_index) + self.credentials.own())
        session = _session(state, local_index, opened.sender_index, opened.node_key, False, now)
        session.credential = opened.credential
        return session, HandshakeResp(opened.sender_index, message)

    def respond(self, init: HandshakeInit, local_index: int, now: float = 0.0) -> tuple[Session, HandshakeResp]:
        return self.answer(self.open_init(init), local_index, now)

    def complete(self, pending: PendingHandshake, resp: HandshakeResp, now: float = 0.0) -> Session:
        try:
            payload = pending.state.read_message(resp.message)
        except NoiseError:
            raise HandshakeError("handshake response fails authentication") from None
        if len(payload) < _RESP_PAYLOAD.size:
            raise HandshakeError("handshake response payload too short")
        (sender_index,) = _RESP_PAYLOAD.unpack_from(payload)
        credential = payload[_RESP_PAYLOAD.size :]
        self.credentials.admit(pending.peer_key, credential)
        session = _session(pending.state, pending.local_index, sender_index, pending.peer_key, True, now)
        session.credential = credential
        return session
