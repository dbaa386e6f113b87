"""Link sessions: handshake authentication, key agreement, replay window, forgery."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.transport.session import REPLAY_WINDOW, HandshakeError, Handshaker, ReplayWindow
from overlay.wire import DecodeError, HandshakeInit, decode_handshake, decode_transport_header


def pair() -> tuple[Identity, Identity, Handshaker, Handshaker]:
    a, b = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    return a, b, Handshaker(a), Handshaker(b)


def handshake() -> tuple:  # type: ignore[type-arg]
    _, b, ha, hb = pair()
    pending = ha.initiate(b.public_key, 11, 1000)
    init = decode_handshake(pending.init.encode())
    assert isinstance(init, HandshakeInit)
    sb, resp = hb.respond(init, 22)
    sa = ha.complete(pending, decode_handshake(resp.encode()))  # type: ignore[arg-type]
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


def test_initiation_signed_for_another_responder_is_refused() -> None:
    _, _, ha, hb = pair()
    c = Identity.from_seed(bytes([3]) * 32)
    pending = ha.initiate(c.public_key, 1, 1000)
    with pytest.raises(HandshakeError, match="bad signature"):
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
        ha.complete(pending, resp)


def test_low_order_ephemeral_key_is_refused() -> None:
    a, b, _, hb = pair()
    init = HandshakeInit(1, bytes(32), a.public_key, 1000, b"")
    init = HandshakeInit(1, bytes(32), a.public_key, 1000, a.sign(init.signed_part() + b.public_key))
    with pytest.raises(HandshakeError):
        hb.respond(init, 2)


@given(st.lists(st.integers(0, 3 * REPLAY_WINDOW), max_size=200))
def test_replay_window_accepts_each_counter_at_most_once_against_a_set_reference(counters: list[int]) -> None:
    w = ReplayWindow()
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and c > top - REPLAY_WINDOW
        assert w.fresh(c) == expected
        if expected:
            w.mark(c)
            seen.add(c)
            top = max(top, c)
