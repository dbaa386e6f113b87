"""Link sessions: handshake authentication, key agreement, replay window, forgery."""

from __future__ import annotations

import nacl.signing
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay._fast import Forged, Keys, Replayed
from overlay.identity import Identity
from overlay.transport.session import (
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REPLAY_WINDOW,
    HandshakeError,
    Handshaker,
    x25519_public,
)
from overlay.wire import DecodeError, HandshakeInit, HandshakeResp, decode_handshake, decode_transport_header


def pair() -> tuple[Identity, Identity, Handshaker, Handshaker]:
    a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    return a, b, Handshaker(a), Handshaker(b)


def handshake() -> tuple:  # type: ignore[type-arg]
    _, b, ha, hb = pair()
    pending = ha.initiate(b.public_key, 11, 1000)
    init = decode_handshake(pending.init.encode())
    assert isinstance(init, HandshakeInit)
    sb, resp = hb.respond(init, 22)
    back = decode_handshake(resp.encode())
    assert isinstance(back, HandshakeResp) and back.receiver_index == 11
    sa = ha.complete(pending, back)
    return sa, sb


def open_packet(session, packet: bytes) -> bytes:  # type: ignore[no-untyped-def]
    _, counter = decode_transport_header(packet)
    return session.open(packet, counter)  # type: ignore[no-any-return]


def test_both_ends_agree_on_keys_in_both_directions() -> None:
    sa, sb = handshake()
    assert open_packet(sb, sa.seal(b"hello b")) == b"hello b"
    assert open_packet(sa, sb.seal(b"hello a")) == b"hello a"


def test_a_replayed_packet_is_refused() -> None:
    sa, sb = handshake()
    p = sa.seal(b"once")
    assert open_packet(sb, p) == b"once"
    with pytest.raises(DecodeError, match="replayed"):
        open_packet(sb, p)


def test_a_flipped_bit_anywhere_fails_authentication_and_does_not_consume_the_counter() -> None:
    sa, sb = handshake()
    p = sa.seal(b"payload")
    for i in range(1, len(p)):
        bad = bytearray(p)
        bad[i] ^= 1
        with pytest.raises(DecodeError):
            open_packet(sb, bytes(bad))
    assert open_packet(sb, p) == b"payload"


def test_initiation_meant_for_another_responder_is_refused() -> None:
    _, _, ha, hb = pair()
    c = Identity.from_seed(bytes([3]) * 32)
    pending = ha.initiate(c.public_key, 1, 1000)
    with pytest.raises(HandshakeError, match="fails authentication"):
        hb.respond(pending.init, 2)


def test_replayed_initiation_cannot_reset_a_session() -> None:
    _, b, ha, hb = pair()
    pending = ha.initiate(b.public_key, 1, 1000)
    hb.respond(pending.init, 2)
    with pytest.raises(HandshakeError, match="replay"):
        hb.respond(pending.init, 3)


def test_response_from_an_unexpected_key_is_refused() -> None:
    a, b, ha, _ = pair()
    c = Identity.from_seed(bytes([3]) * 32)
    pending = ha.initiate(b.public_key, 1, 1000)
    _, resp = Handshaker(c).respond(Handshaker(a).initiate(c.public_key, 1, 1000).init, 9)
    with pytest.raises(HandshakeError):
        ha.complete(pending, HandshakeResp(1, resp.message))


def test_an_initiation_claiming_another_node_key_is_refused() -> None:
    """The payload's Ed25519 key must convert to the static key Noise authenticated: a node cannot present
    someone else's key (and so their certificate) with its own static key."""
    a, b, _, _ = pair()
    c = Identity.from_seed(bytes([3]) * 32)
    liar = Handshaker(c)
    liar.identity = a  # sends a's node key in the payload, keeps c's static key
    pending = liar.initiate(b.public_key, 1, 1000)
    with pytest.raises(HandshakeError, match="does not hold"):
        Handshaker(b).respond(pending.init, 2)


def test_key_conversion_is_remembered_and_an_unusable_key_refused_every_time() -> None:
    x25519_public.cache_clear()
    a = Identity.from_seed(bytes([1]) * 32)
    expected = bytes(nacl.signing.VerifyKey(a.public_key).to_curve25519_public_key())
    assert x25519_public(a.public_key) == expected
    assert x25519_public(a.public_key) == expected
    assert x25519_public.cache_info().hits == 1
    for _ in range(2):
        with pytest.raises(HandshakeError, match="not a usable"):
            x25519_public(bytes(32))
    assert x25519_public.cache_info().currsize == 1


def test_low_order_ephemeral_key_is_refused() -> None:
    _, b, ha, hb = pair()
    pending = ha.initiate(b.public_key, 1, 1000)
    forged = HandshakeInit(bytes(32) + pending.init.message[32:])
    with pytest.raises(HandshakeError):
        hb.respond(forged, 2)


class Picky:
    """Credentials that present a fixed credential and admit only one."""

    def __init__(self, own: bytes, wanted: bytes) -> None:
        self._own, self._wanted = own, wanted
        self.seen: list[tuple[bytes, bytes]] = []

    def prologue(self) -> bytes:
        return b"group-1"

    def own(self) -> bytes:
        return self._own

    def admit(self, node_key: bytes, credential: bytes) -> None:
        self.seen.append((node_key, credential))
        if credential != self._wanted:
            raise HandshakeError("no certificate we accept")


def test_credentials_travel_both_ways_and_are_judged_with_the_authenticated_key() -> None:
    a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    ca, cb = Picky(b"cert-a", b"cert-b"), Picky(b"cert-b", b"cert-a")
    ha, hb = Handshaker(a, ca), Handshaker(b, cb)
    pending = ha.initiate(b.public_key, 1, 1000)
    sb, resp = hb.respond(pending.init, 2, now=50.0)
    sa = ha.complete(pending, resp, now=50.0)
    assert cb.seen == [(a.public_key, b"cert-a")] and ca.seen == [(b.public_key, b"cert-b")]
    assert sa.credential == b"cert-b" and sb.credential == b"cert-a"
    assert open_packet(sb, sa.seal(b"x")) == b"x"


def test_a_refused_credential_or_another_group_gets_no_session() -> None:
    a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    hb = Handshaker(b, Picky(b"cert-b", b"cert-a"))
    with pytest.raises(HandshakeError, match="no certificate"):
        hb.respond(Handshaker(a, Picky(b"forged", b"cert-b")).initiate(b.public_key, 1, 1000).init, 2)
    # A node of another group (a different prologue) cannot even complete the Noise message.
    with pytest.raises(HandshakeError, match="fails authentication"):
        hb.respond(Handshaker(a).initiate(b.public_key, 1, 2000).init, 2)


def test_rekey_and_reject_timers_follow_wireguard() -> None:
    sa, sb = handshake()
    assert sa.initiator and not sb.initiator
    assert not sa.wants_rekey(REKEY_AFTER_TIME - 1) and sa.wants_rekey(REKEY_AFTER_TIME)
    assert not sb.wants_rekey(REKEY_AFTER_TIME)  # only the initiator rekeys on time
    assert not sa.expired(REJECT_AFTER_TIME - 1) and sa.expired(REJECT_AFTER_TIME)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_initiation_bytes_raise_only_handshake_errors(data: bytes) -> None:
    _, _, _, hb = pair()
    try:
        msg = decode_handshake(bytes([0x81]) + data)
    except DecodeError:
        return
    assert isinstance(msg, HandshakeInit)
    with pytest.raises(HandshakeError):
        hb.respond(msg, 2)


@given(st.lists(st.integers(0, 3 * REPLAY_WINDOW), max_size=200))
def test_replay_window_accepts_each_counter_at_most_once_against_a_set_reference(counters: list[int]) -> None:
    key = bytes(range(32))
    sender, receiver = Keys(key, key), Keys(key, key)
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and c > top - REPLAY_WINDOW
        sender.counter = c
        packet = sender.seal(0x83, 7, c.to_bytes(4, "big"))
        if expected:
            assert receiver.open(packet, c) == c.to_bytes(4, "big")
            seen.add(c)
            top = max(top, c)
        else:
            with pytest.raises(Replayed):
                receiver.open(packet, c)
        assert receiver.top == top


@given(st.binary(max_size=3000), st.integers(0, 2**32 - 1), st.integers(0, 2**56 - 2**14), st.binary(max_size=64))
def test_keys_are_aes_256_gcm_as_the_wire_format_says(plain: bytes, remote: int, counter: int, junk: bytes) -> None:
    """Interoperable with any AES-256-GCM: nonce = 4 zero bytes + the counter, associated data = the header."""
    send, recv = bytes(range(32)), bytes(range(32, 64))
    keys = Keys(send, recv)
    keys.counter = counter
    packet = keys.seal(0x83, remote, plain)
    header = packet[:13]
    assert header == bytes([0x83]) + remote.to_bytes(4, "big") + counter.to_bytes(8, "big")
    nonce = bytes(4) + counter.to_bytes(8, "big")
    assert AESGCM(send).decrypt(nonce, packet[13:], header) == plain
    theirs = header + AESGCM(recv).encrypt(nonce, plain, header)
    with pytest.raises(Forged):  # a forgery does not use up the counter
        keys.open(theirs[:13] + junk + theirs[13:] if junk else theirs[:-1] + bytes([theirs[-1] ^ 1]), counter)
    assert keys.open(theirs, counter) == plain
    with pytest.raises(Replayed):
        keys.open(theirs, counter)


@given(
    st.sampled_from([0x84, 0x86]),
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=16, max_size=2000),
    st.integers(0, 2**56 - 2**14),
)
def test_header_sealing_is_aes_256_gcm_of_the_head_bound_to_the_packet_after_it(
    ptype: int, head: bytes, packet: bytes, counter: int
) -> None:
    """SEALED and TUNNEL packets: the head encrypted with the 13-byte header and the bound packet's tag (its
    last 16 bytes) as associated data, the packet after it as it is."""
    send, recv = bytes(range(32)), bytes(range(32, 64))
    keys = Keys(send, recv)
    keys.counter = counter
    out = keys.seal_header(7, head, packet, ptype)
    header = out[:13]
    assert header == bytes([ptype]) + (7).to_bytes(4, "big") + counter.to_bytes(8, "big")
    part = len(head) + 16
    assert out[13 + part :] == packet
    nonce = bytes(4) + counter.to_bytes(8, "big")
    assert AESGCM(send).decrypt(nonce, out[13 : 13 + part], header + packet[-16:]) == head
    receiver = Keys(recv, send)
    retagged = out[:-1] + bytes([out[-1] ^ 1])
    with pytest.raises(Forged):  # another packet's tag: the head no longer opens, and the counter is not used up
        receiver.open_header(retagged, counter, part)
    assert receiver.open_header(out, counter, part) == head
