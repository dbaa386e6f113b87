"""Wire format: round trips, and the fuzz invariant: peer bytes parse or raise DecodeError, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import wire
from overlay.dht import records
from overlay.dht.records import AddressRecord
from overlay.transport import signals
from overlay.wire import FLAG_EXACT, Contact, DecodeError, Kind, LinkMsg, Routed

DECODERS = [
    wire.decode_handshake,
    wire.decode_transport_header,
    wire.decode_unknown_session,
    wire.decode_neighbours,
    wire.decode_relay,
    wire.decode_token,
    wire.decode_routed,
    wire.decode_no_route,
    lambda b: wire.decode_contact(b),
    wire.decode_found,
    records.decode_record,
    records.decode_dht_value,
    records.decode_address,
    wire.decode_probe,
    wire.decode_suspect,
    wire.decode_beacon,
    wire.decode_find,
    signals.decode_signal,
    signals.decode_ice_params,
    signals.decode_routed_signal,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(range(len(DECODERS))))
def test_every_decoder_parses_or_raises_decode_error(data: bytes, which: int) -> None:
    try:
        DECODERS[which](data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0x81, 0x82, 0x83, 0x04, 0x03, 0x0B, 0x0C]), st.binary(max_size=200))
def test_decoders_with_a_plausible_type_byte_still_only_raise_decode_error(first: int, rest: bytes) -> None:
    data = bytes([first]) + rest
    for decode in DECODERS:
        try:
            decode(data)
        except DecodeError:
            pass


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(list(Kind)),
    st.binary(max_size=100),
)
def test_routed_round_trip(ttl: int, flags: int, src: int, dst: int, wm: int, kind: Kind, body: bytes) -> None:
    p = Routed(ttl, flags, src, dst, wm, kind, body)
    assert wire.decode_routed(p.encode()) == p
    assert wire.decode_routed(wire.reroute(p, 3, 5)) == Routed(3, flags, src, dst, 5, kind, body)


def test_routed_with_unknown_kind_is_a_decode_error() -> None:
    data = bytearray(Routed(5, FLAG_EXACT, 1, 2, 3, Kind.DATA, b"x").encode())
    data[wire.ROUTED_HEADER.size - 1] = 0xEE
    with pytest.raises(DecodeError, match="unknown routed kind"):
        wire.decode_routed(bytes(data))


@given(
    st.lists(st.integers(0, 2**64 - 1), max_size=wire.MAX_NEIGHBOURS),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
)
def test_neighbour_list_round_trip_carries_the_beacon(ids: list[int], overlay: int, seq: int) -> None:
    assert wire.decode_neighbours(wire.encode_neighbours(ids, overlay, seq)) == (ids, overlay, seq)
    assert wire.decode_beacon(wire.encode_beacon(overlay, seq)) == (overlay, seq)


_ICE_TEXT = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", min_size=4, max_size=32
)
CANDIDATES = st.builds(
    signals.IceCandidate,
    st.sampled_from(signals.CANDIDATE_TYPES),
    st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)),
    st.integers(1, 65535),
    st.integers(0, 2**32 - 1),
    _ICE_TEXT,
)


@given(
    st.sampled_from(list(signals.SignalType)),
    st.integers(0, 2**32 - 1),
    st.one_of(
        st.none(),
        st.builds(
            signals.IceParams,
            _ICE_TEXT,
            _ICE_TEXT.filter(lambda t: len(t) >= 22),
            st.lists(CANDIDATES, max_size=6).map(tuple),
        ),
    ),
    st.booleans(),
)
def test_signal_round_trip_with_and_without_ice(
    kind: signals.SignalType, attempt: int, ice: signals.IceParams | None, direct_only: bool
) -> None:
    contact = Contact(bytes(range(32)), "10.254.0.9", ("198.18.0.7", 5800), 1234567, bytes(64))
    signal = signals.Signal(kind, attempt, contact, ice, direct_only)
    assert signals.decode_signal(signal.encode()) == signal
    assert signal.encode()[0] & signals.DIRECT_ONLY == (signals.DIRECT_ONLY if direct_only else 0)
    body = signals.encode_routed_signal(42, signal, 7)
    assert signals.decode_routed_signal(body) == (42, 7, signal.encode())


@pytest.mark.parametrize("first", [0x00, 0x05, 0x80, 0x85, 0xFF])
def test_a_signal_of_an_unknown_type_is_a_decode_error_with_or_without_the_direct_only_bit(first: int) -> None:
    contact = Contact(bytes(range(32)), "10.254.0.9", ("198.18.0.7", 5800), 1234567, bytes(64))
    raw = bytearray(signals.Signal(signals.SignalType.OFFER, 1, contact).encode())
    raw[0] = first
    with pytest.raises(DecodeError, match="unknown signal type"):
        signals.decode_signal(bytes(raw))


def test_find_carries_the_member_a_joiner_is_reachable_through() -> None:
    contact = Contact(bytes(range(32)), "10.254.0.9", ("198.18.0.7", 5800), 1, bytes(64))
    assert wire.decode_find(wire.encode_find(7, contact, 99)) == (7, contact, 99)
    assert wire.decode_find(wire.encode_find(7, contact)) == (7, contact, None)
    with pytest.raises(DecodeError):
        wire.decode_find(wire.encode_find(7, contact) + b"xy")


@given(st.integers(0, 2**64 - 1))
def test_probe_is_big_enough_to_be_fragmented_and_round_trips_its_token(token: int) -> None:
    probe = wire.encode_probe(token)
    assert probe[0] == LinkMsg.PROBE and len(probe) == wire.PROBE_SIZE > 1500
    assert wire.decode_probe(probe) == token
    ack = wire.encode_ping(LinkMsg.PROBE_ACK, token)
    assert ack[0] == LinkMsg.PROBE_ACK and wire.decode_token(ack) == token


def test_probe_without_a_whole_token_is_refused() -> None:
    with pytest.raises(DecodeError):
        wire.decode_probe(bytes([LinkMsg.PROBE]) + bytes(7))


def test_neighbour_list_with_a_lying_count_is_refused() -> None:
    data = bytes([LinkMsg.NEIGHBOURS, 3]) + bytes(16)
    with pytest.raises(DecodeError):
        wire.decode_neighbours(data)


@pytest.mark.parametrize("endpoint", [("198.18.0.7", 5800), ("2001:db8::1", 1)])
def test_contact_round_trip_for_ipv4_and_ipv6_endpoints(endpoint: tuple[str, int]) -> None:
    c = Contact(bytes(range(32)), "10.254.0.9", endpoint, 1234567, bytes(64))
    decoded, rest = wire.decode_contact(c.encode() + b"tail")
    assert decoded == c and rest == b"tail"
    assert c.signed_part("room-a") != c.signed_part("room-b")


def test_record_round_trip_and_bad_lifetime_refused() -> None:
    r = AddressRecord("10.254.0.2", bytes(32), 1000, 2000, bytes(64))
    assert records.decode_record(r.encode()) == r
    bad = AddressRecord("10.254.0.2", bytes(32), 2000, 1000, bytes(64))
    with pytest.raises(DecodeError, match="expires before"):
        records.decode_record(bad.encode())


def test_no_link_packet_can_be_mistaken_for_stun() -> None:
    # RFC 8489 section 5: the top two bits of every STUN message are zero.
    for t in wire.PacketType:
        assert t >> 6 != 0


def test_a_tunnel_packet_must_carry_a_whole_transport_packet() -> None:
    head = wire.TRANSPORT_HEADER.pack(wire.PacketType.TUNNEL, 5, 9) + bytes(wire.TUNNEL_LINK_PART)
    inner = wire.TRANSPORT_HEADER.pack(wire.PacketType.TRANSPORT, 6, 1) + bytes(1 + wire.AEAD_TAG_LEN)
    assert wire.decode_transport_header(head + inner) == (5, 9)
    with pytest.raises(wire.DecodeError, match="too short"):
        wire.decode_transport_header(head + inner[:-1])
    with pytest.raises(wire.DecodeError, match="other than a transport packet"):
        wire.decode_transport_header(head + bytes([wire.PacketType.SEALED]) + inner[1:])
