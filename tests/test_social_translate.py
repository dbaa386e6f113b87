"""SocialVPN address translation: checksums stay valid for every packet shape, translating back restores the
bytes, two nodes' tables agree end to end, the address pool is stable, and hostile bytes only ever raise
TranslateError or become a counted drop."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.social.translate import (
    INBOUND_DESTINATION,
    INBOUND_QUOTE,
    INBOUND_SOURCE,
    INBOUND_UNKNOWN,
    MALFORMED,
    OUTBOUND_QUOTE,
    OUTBOUND_SOURCE,
    OUTBOUND_UNKNOWN,
    AddressPool,
    Dropped,
    FriendDevice,
    FriendNat,
    SubnetFull,
    ToFriend,
    TranslateError,
    quoted_addresses,
    translate,
)
from tests.test_tap_frames import reference_checksum  # RFC 1071 the slow way, apart from the code


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# -- Packet builders, written independently of the code under test -----------------------------------------

TCP, UDP, ICMP, DCCP, UDPLITE, GRE = 6, 17, 1, 33, 136, 47
MF = 0x2000


def ipv4_packet(
    src: int, dst: int, protocol: int, payload: bytes, *, options: bytes = b"", flags_frag: int = 0, ident: int = 7
) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBHII", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, flags_frag, 64, protocol, 0, src, dst
    )
    header += options
    return header[:10] + reference_checksum(header).to_bytes(2, "big") + header[12:] + payload


def pseudo_header(src: int, dst: int, protocol: int, length: int) -> bytes:
    """RFC 793 §3.1 / RFC 768: source, destination, zero, protocol, transport length."""
    return struct.pack("!IIBBH", src, dst, 0, protocol, length)


def with_checksum(src: int, dst: int, protocol: int, segment: bytes, at: int, *, zero_as_ones: bool) -> bytes:
    value = reference_checksum(pseudo_header(src, dst, protocol, len(segment)) + segment)
    if value == 0 and zero_as_ones:
        value = 0xFFFF
    return segment[:at] + value.to_bytes(2, "big") + segment[at + 2 :]


def tcp_segment(src: int, dst: int, payload: bytes) -> bytes:
    header = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0)
    return with_checksum(src, dst, TCP, header + payload, 16, zero_as_ones=False)


def udp_datagram(src: int, dst: int, payload: bytes, *, checksum: bool = True) -> bytes:
    segment = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    return with_checksum(src, dst, UDP, segment, 6, zero_as_ones=True) if checksum else segment


def dccp_segment(src: int, dst: int, payload: bytes) -> bytes:
    # RFC 4340 §5.1: ports, data offset (4-byte words), CCVal/CsCov, checksum, then the rest (12-byte minimum).
    header = struct.pack("!HHBBH", 5001, 5002, 4, 0, 0) + b"\x00\x01\x00\x00\x00\x00\x00\x05"
    return with_checksum(src, dst, DCCP, header + payload, 6, zero_as_ones=False)


def udplite_datagram(src: int, dst: int, payload: bytes) -> bytes:
    segment = struct.pack("!HHHH", 6001, 6002, 0, 0) + payload  # coverage 0: the whole datagram (RFC 3828)
    return with_checksum(src, dst, UDPLITE, segment, 6, zero_as_ones=True)


def icmp_message(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    message = struct.pack("!BBH", icmp_type, code, 0) + rest + body
    return message[:2] + reference_checksum(message).to_bytes(2, "big") + message[4:]


def icmp_echo(src: int, dst: int, payload: bytes) -> bytes:
    return ipv4_packet(src, dst, ICMP, icmp_message(8, 0, b"\x12\x34\x00\x01", payload))


def icmp_error(
    src: int, dst: int, original: bytes, *, icmp_type: int = 3, code: int = 1, quote: int | None = None
) -> bytes:
    """An ICMP error from `src` to `dst` quoting `original`'s header and `quote` bytes after it (all if None)."""
    header_len = (original[0] & 0x0F) * 4
    quoted = original if quote is None else original[: header_len + quote]
    return ipv4_packet(src, dst, ICMP, icmp_message(icmp_type, code, b"\x00\x00\x00\x00", quoted))


def build(shape: str, src: int, dst: int, payload: bytes, options: bytes = b"") -> bytes:
    """A whole, valid IPv4 packet of the given shape from `src` to `dst`."""
    if shape == "tcp":
        return ipv4_packet(src, dst, TCP, tcp_segment(src, dst, payload), options=options)
    if shape == "udp":
        return ipv4_packet(src, dst, UDP, udp_datagram(src, dst, payload), options=options)
    if shape == "udp-no-checksum":
        return ipv4_packet(src, dst, UDP, udp_datagram(src, dst, payload, checksum=False), options=options)
    if shape == "dccp":
        return ipv4_packet(src, dst, DCCP, dccp_segment(src, dst, payload), options=options)
    if shape == "udplite":
        return ipv4_packet(src, dst, UDPLITE, udplite_datagram(src, dst, payload), options=options)
    if shape == "icmp-echo":
        return ipv4_packet(src, dst, ICMP, icmp_message(8, 0, b"\x12\x34\x00\x01", payload), options=options)
    if shape == "gre":
        return ipv4_packet(src, dst, GRE, payload, options=options)
    raise AssertionError(shape)


PLAIN_SHAPES = ["tcp", "udp", "udp-no-checksum", "dccp", "udplite", "icmp-echo", "gre"]
QUOTED_SHAPES = ["tcp", "udp", "udp-no-checksum", "icmp-echo"]
CHECKSUMS = {TCP: (16, False), UDP: (6, True), DCCP: (6, False), UDPLITE: (6, False)}


def checksum_problems(packet: bytes) -> list[str]:
    """Every checksum of a whole (unfragmented) packet verified from scratch; [] when all are valid."""
    header_len = (packet[0] & 0x0F) * 4
    src, dst = struct.unpack_from("!II", packet, 12)
    problems = []
    if reference_checksum(packet[:header_len]):
        problems.append("ip header")
    body, protocol = packet[header_len:], packet[9]
    if protocol in CHECKSUMS:
        at, zero_is_none = CHECKSUMS[protocol]
        unused = zero_is_none and body[at : at + 2] == b"\x00\x00"
        if not unused and reference_checksum(pseudo_header(src, dst, protocol, len(body)) + body):
            problems.append(f"protocol {protocol}")
    if protocol == ICMP:
        if reference_checksum(body):
            problems.append("icmp")
        if body[0] in (3, 4, 5, 11, 12):
            quoted = body[8:]
            quoted_header_len = (quoted[0] & 0x0F) * 4
            if reference_checksum(quoted[:quoted_header_len]):
                problems.append("quoted ip header")
            if struct.unpack_from("!H", quoted, 2)[0] == len(quoted):  # the quote holds the whole datagram
                problems += [f"quoted {p}" for p in checksum_problems(quoted)]
    return problems


def reflect(packet: bytes) -> bytes:
    """The packet with source and destination swapped, as an echo reply or a TCP answer addresses it; the
    checksums stay valid since their sums do not depend on the order of the words."""
    return packet[:12] + packet[16:20] + packet[12:16] + packet[20:]


addresses = st.integers(min_value=0, max_value=0xFFFFFFFF)
payloads = st.binary(max_size=80)
ip_options = st.integers(min_value=0, max_value=10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
quote_lengths = st.sampled_from([8, 20, 28, None])


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """A valid packet of any shape, ICMP errors quoting the packet that went the other way included."""
    src, dst = draw(addresses), draw(addresses)
    if draw(st.booleans()):
        return build(draw(st.sampled_from(PLAIN_SHAPES)), src, dst, draw(payloads), draw(ip_options))
    original = build(draw(st.sampled_from(QUOTED_SHAPES)), dst, src, draw(payloads), draw(ip_options))
    return icmp_error(src, dst, original, icmp_type=draw(st.sampled_from([3, 4, 5, 11, 12])), quote=draw(quote_lengths))


# -- The packet rewrite ------------------------------------------------------------------------------------

A, B, A2, B2 = ip("172.31.0.1"), ip("172.31.4.9"), ip("10.9.0.33"), ip("10.9.0.1")


@pytest.mark.parametrize("shape", PLAIN_SHAPES)
def test_translating_each_shape_rewrites_both_addresses_and_keeps_every_checksum_valid(shape: str) -> None:
    out = translate(build(shape, A, B, b"some payload bytes"), A2, B2)
    assert struct.unpack_from("!II", out, 12) == (A2, B2)
    assert checksum_problems(out) == []


def test_only_the_address_and_checksum_bytes_change() -> None:
    packet = build("tcp", A, B, b"x" * 30)
    out = translate(packet, A2, B2)
    changed = {i for i in range(len(packet)) if packet[i] != out[i]}
    assert changed <= set(range(10, 20)) | {20 + 16, 20 + 17}


def test_none_keeps_that_address() -> None:
    packet = build("udp", A, B, b"payload")
    assert struct.unpack_from("!II", translate(packet, src=A2), 12) == (A2, B)
    assert struct.unpack_from("!II", translate(packet, dst=B2), 12) == (A, B2)
    assert translate(packet) == packet


def test_udp_without_a_checksum_keeps_zero() -> None:
    out = translate(build("udp-no-checksum", A, B, b"payload"), A2, B2)
    assert out[20 + 6 : 20 + 8] == b"\x00\x00"
    assert checksum_problems(out) == []


def test_udp_checksum_that_computes_to_zero_is_sent_as_all_ones() -> None:
    # Choose the last payload word so that after translation the datagram's sum is -0, i.e. checksum 0.
    def translated_sum(word: int) -> int:
        segment = udp_datagram(A2, B2, b"ab" + word.to_bytes(2, "big"), checksum=False)
        return 0xFFFF - reference_checksum(pseudo_header(A2, B2, UDP, len(segment)) + segment)

    word = (0xFFFF - translated_sum(0)) % 0xFFFF
    packet = ipv4_packet(A, B, UDP, udp_datagram(A, B, b"ab" + word.to_bytes(2, "big")))
    out = translate(packet, A2, B2)
    assert out[20 + 6 : 20 + 8] == b"\xff\xff"
    assert checksum_problems(out) == []
    assert translate(out, A, B) == packet


def test_icmp_echo_checksum_does_not_change() -> None:
    packet = build("icmp-echo", A, B, b"ping")
    assert translate(packet, A2, B2)[20:] == packet[20:]


def test_ip_options_are_copied_and_the_transport_header_found_after_them() -> None:
    options = b"\x07\x07\x04" + bytes(4) + b"\x00"  # record route (RFC 791), one empty slot, end of options
    out = translate(build("tcp", A, B, b"data", options), A2, B2)
    assert out[20:28] == options
    assert checksum_problems(out) == []


def test_bytes_past_the_total_length_are_dropped() -> None:
    packet = build("udp", A, B, b"payload")
    assert translate(packet + b"\x00" * 6, A2, B2) == translate(packet, A2, B2)


def test_a_memoryview_translates_like_bytes() -> None:
    packet = build("tcp", A, B, b"payload")
    assert translate(memoryview(packet), A2, B2) == translate(packet, A2, B2)


def test_an_address_outside_ipv4_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        translate(build("udp", A, B, b""), src=1 << 32)


# Fragments --------------------------------------------------------------------------------------------------


def fragment(packet: bytes, cut: int) -> list[bytes]:
    """Split an unfragmented packet with a 20-byte header after `cut` payload bytes (a multiple of 8)."""
    protocol, (src, dst) = packet[9], struct.unpack_from("!II", packet, 12)
    payload = packet[20:]
    first = ipv4_packet(src, dst, protocol, payload[:cut], flags_frag=MF)
    rest = ipv4_packet(src, dst, protocol, payload[cut:], flags_frag=cut // 8)
    return [first, rest]


def reassemble(fragments: list[bytes]) -> bytes:
    first = fragments[0]
    src, dst = struct.unpack_from("!II", first, 12)
    return ipv4_packet(src, dst, first[9], b"".join(f[20:] for f in fragments))


@given(
    st.sampled_from(["tcp", "udp", "dccp", "udplite"]),
    addresses,
    addresses,
    st.binary(min_size=24, max_size=200),
    st.integers(min_value=3, max_value=5),
)
def test_fragments_translated_one_by_one_reassemble_with_a_valid_checksum(
    shape: str, src: int, dst: int, payload: bytes, eighths: int
) -> None:
    pieces = fragment(build(shape, A, B, payload), eighths * 8)
    translated = [translate(piece, src, dst) for piece in pieces]
    assert translated[1][20:] == pieces[1][20:]  # a later fragment: only its IP header changes
    assert all(reference_checksum(piece[:20]) == 0 for piece in translated)
    assert checksum_problems(reassemble(translated)) == []


def test_a_later_fragment_keeps_its_payload_bytes() -> None:
    later = fragment(build("udp", A, B, bytes(range(64))), 16)[1]
    out = translate(later, A2, B2)
    assert out[20:] == later[20:]
    assert struct.unpack_from("!II", out, 12) == (A2, B2)


def test_a_first_fragment_that_ends_before_the_tcp_checksum_is_rejected() -> None:
    tiny = fragment(build("tcp", A, B, bytes(40)), 8)[0]  # RFC 1858's tiny fragment: 8 bytes of TCP header
    with pytest.raises(TranslateError, match="before its checksum"):
        translate(tiny, A2, B2)


# ICMP errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", QUOTED_SHAPES)
@pytest.mark.parametrize("quote", [8, 28, None])
def test_an_icmp_error_translates_to_the_error_about_the_translated_packet(shape: str, quote: int | None) -> None:
    # B reports a problem with a packet A sent it. After translation the error must be exactly the one B would
    # have sent about the translated packet: quoted addresses reversed, every checksum (quoted ones included,
    # even a quoted TCP checksum whose segment is cut off) what the sender would have computed.
    original = build(shape, A, B, b"the original payload, long enough")
    out = translate(icmp_error(B, A, original, quote=quote), B2, A2)
    assert out == icmp_error(B2, A2, translate(original, A2, B2), quote=quote)
    assert checksum_problems(out) == []


def test_a_quote_of_eight_bytes_leaves_the_cut_off_tcp_checksum_alone() -> None:
    original = build("tcp", A, B, b"payload")
    out = translate(icmp_error(B, A, original, quote=8), B2, A2)
    assert out[20 + 8 + 20 :] == original[20:28]  # ports and sequence number: nothing there to fix
    assert checksum_problems(out) == []


def test_an_error_from_a_router_keeps_the_quoted_final_destination() -> None:
    router, far = ip("172.31.9.9"), ip("192.0.2.77")
    original = build("udp", A, far, b"payload")
    out = translate(icmp_error(router, A, original, icmp_type=11, code=0), ip("10.0.0.1"), A2)
    assert quoted_addresses(out) == (A2, far)
    assert checksum_problems(out) == []


def test_an_icmp_error_too_short_to_quote_a_header_is_rejected() -> None:
    packet = ipv4_packet(B, A, ICMP, icmp_message(3, 1, b"\x00" * 4, b"\x45" + bytes(10)))
    with pytest.raises(TranslateError, match="cannot quote"):
        translate(packet, B2, A2)


def test_an_icmp_error_quoting_something_other_than_ipv4_is_rejected() -> None:
    packet = ipv4_packet(B, A, ICMP, icmp_message(3, 1, b"\x00" * 4, b"\x60" + bytes(39)))
    with pytest.raises(TranslateError, match="quotes IP version 6"):
        translate(packet, B2, A2)


def test_quoted_addresses_are_none_for_packets_that_are_not_icmp_errors() -> None:
    assert quoted_addresses(build("icmp-echo", A, B, b"")) is None
    assert quoted_addresses(build("tcp", A, B, b"")) is None
    assert quoted_addresses(icmp_error(B, A, build("udp", A, B, b""))) == (A, B)


# Malformed input --------------------------------------------------------------------------------------------

GOOD = build("udp", A, B, b"payload")


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (b"", "shorter than the 20-byte header"),
        (GOOD[:19], "shorter than the 20-byte header"),
        (b"\x65" + GOOD[1:], "version 6"),
        (b"\x44" + GOOD[1:], "header length 16"),
        (GOOD[:2] + struct.pack("!H", len(GOOD) + 1) + GOOD[4:], "total length"),
        (GOOD[:2] + struct.pack("!H", 12) + GOOD[4:], "total length"),
        (ipv4_packet(A, B, UDP, b"\x00" * 7), "before its checksum"),
    ],
)
def test_malformed_packets_raise_translate_error_naming_the_problem(packet: bytes, why: str) -> None:
    with pytest.raises(TranslateError, match=why):
        translate(packet, A2, B2)


# Properties -------------------------------------------------------------------------------------------------


@given(packets(), addresses, addresses)
def test_every_checksum_stays_valid_after_translation(packet: bytes, src: int, dst: int) -> None:
    assert checksum_problems(packet) == []
    assert checksum_problems(translate(packet, src, dst)) == []


@given(packets(), addresses, addresses)
def test_translating_there_and_back_restores_the_exact_bytes(packet: bytes, src: int, dst: int) -> None:
    old_src, old_dst = struct.unpack_from("!II", packet, 12)
    assert translate(translate(packet, src, dst), old_src, old_dst) == packet


@given(st.sampled_from(QUOTED_SHAPES), payloads, quote_lengths, addresses, addresses)
def test_any_icmp_error_translates_to_the_error_about_the_translated_packet(
    shape: str, payload: bytes, quote: int | None, src: int, dst: int
) -> None:
    original = build(shape, A, B, payload)
    out = translate(icmp_error(B, A, original, quote=quote), dst, src)
    assert out == icmp_error(dst, src, translate(original, src, dst), quote=quote)


def ipv4_like(data: bytes) -> bytes:
    """Random bytes that get past the first checks more often: version 4 and a total length that fits."""
    if len(data) < 20:
        return data
    return bytes([0x40 | (data[0] & 0x0F)]) + data[1:2] + struct.pack("!H", len(data)) + data[4:]


@settings(max_examples=300)
@given(st.binary(max_size=120), st.booleans(), addresses, addresses)
def test_hostile_bytes_translate_or_raise_translate_error_only(data: bytes, shaped: bool, src: int, dst: int) -> None:
    packet = ipv4_like(data) if shaped else data
    try:
        out = translate(packet, src, dst)
    except TranslateError:
        return
    assert struct.unpack_from("!II", out, 12) == (src, dst)
    assert len(out) == struct.unpack_from("!H", packet, 2)[0]


@settings(max_examples=300)
@given(packets(), st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_corrupted_packets_translate_or_raise_translate_error_only(packet: bytes, where: int, value: int) -> None:
    broken = bytearray(packet)
    broken[where % len(broken)] = value
    try:
        translate(bytes(broken), A2, B2)
        quoted_addresses(bytes(broken))
    except TranslateError:
        pass


# -- Two nodes' tables -------------------------------------------------------------------------------------

ALICE_TAP, BOB_TAP = ip("172.31.0.1"), ip("10.77.0.1")
BOB_AT_ALICE, ALICE_AT_BOB = ip("172.31.20.5"), ip("10.77.3.3")  # where each put the other's device


def pair() -> tuple[FriendNat, FriendNat]:
    """Alice's laptop and Bob's phone, with tables that agree."""
    alice, bob = FriendNat(ALICE_TAP), FriendNat(BOB_TAP)
    alice.set_friend("bob/phone", FriendDevice(local=BOB_AT_ALICE, remote=BOB_TAP, remote_view=ALICE_AT_BOB))
    bob.set_friend("alice/laptop", FriendDevice(local=ALICE_AT_BOB, remote=ALICE_TAP, remote_view=BOB_AT_ALICE))
    return alice, bob


def test_outbound_puts_the_packet_in_the_friend_devices_view() -> None:
    alice, _ = pair()
    packet = build("tcp", ALICE_TAP, BOB_AT_ALICE, b"GET /")
    result = alice.outbound(packet)
    assert result == ToFriend("bob/phone", translate(packet, ALICE_AT_BOB, BOB_TAP))


def test_inbound_delivers_a_packet_in_our_view_unchanged_and_trimmed() -> None:
    alice, _ = pair()
    packet = build("udp", BOB_AT_ALICE, ALICE_TAP, b"reply")
    assert alice.inbound("bob/phone", packet + b"\x00\x00") == packet
    assert alice.counters == {}


def test_a_reply_comes_back_as_the_exact_reflection_of_what_was_sent() -> None:
    alice, bob = pair()
    sent = build("tcp", ALICE_TAP, BOB_AT_ALICE, b"hello bob")
    at_bob = alice.outbound(sent)
    assert isinstance(at_bob, ToFriend)
    assert bob.inbound("alice/laptop", at_bob.packet) == at_bob.packet
    back = bob.outbound(reflect(at_bob.packet))
    assert back == ToFriend("alice/laptop", reflect(sent))
    assert alice.inbound("bob/phone", back.packet) == reflect(sent)


def test_an_icmp_error_about_a_friends_packet_reaches_the_friend_as_its_own_kernel_would_see_it() -> None:
    alice, bob = pair()
    sent = build("udp", ALICE_TAP, BOB_AT_ALICE, b"to a closed port")
    at_bob = alice.outbound(sent)
    assert isinstance(at_bob, ToFriend)
    error = bob.outbound(icmp_error(BOB_TAP, ALICE_AT_BOB, at_bob.packet, code=3))
    assert error == ToFriend("alice/laptop", icmp_error(BOB_AT_ALICE, ALICE_TAP, sent, code=3))
    assert alice.inbound("bob/phone", error.packet) == error.packet


@given(st.sampled_from(PLAIN_SHAPES), payloads, ip_options)
def test_every_shape_crosses_both_tables_and_reflects_back_exactly(shape: str, payload: bytes, options: bytes) -> None:
    alice, bob = pair()
    sent = build(shape, ALICE_TAP, BOB_AT_ALICE, payload, options)
    at_bob = alice.outbound(sent)
    assert isinstance(at_bob, ToFriend)
    assert checksum_problems(at_bob.packet) == []
    assert bob.inbound("alice/laptop", at_bob.packet) == at_bob.packet
    back = bob.outbound(reflect(at_bob.packet))
    assert back == ToFriend("alice/laptop", reflect(sent))
    assert alice.counters == bob.counters == {}


def counted(nat: FriendNat, call: Callable[[], object], expected: Dropped) -> None:
    assert call() == expected
    assert nat.counters == {expected.reason: 1}


def test_outbound_to_an_address_given_to_nobody_is_dropped_and_counted() -> None:
    alice, _ = pair()
    counted(alice, lambda: alice.outbound(build("tcp", ALICE_TAP, ip("172.31.99.99"), b"")), OUTBOUND_UNKNOWN)


def test_outbound_from_another_source_is_dropped_and_counted() -> None:
    alice, _ = pair()
    counted(alice, lambda: alice.outbound(build("tcp", ip("192.168.1.5"), BOB_AT_ALICE, b"")), OUTBOUND_SOURCE)


def test_outbound_malformed_bytes_are_dropped_and_counted() -> None:
    alice, _ = pair()
    counted(alice, lambda: alice.outbound(b"\x45\x00"), MALFORMED)


def test_outbound_icmp_error_about_another_flow_is_dropped() -> None:
    alice, _ = pair()
    elsewhere = build("udp", ip("172.31.7.7"), ALICE_TAP, b"")  # a packet from another friend device
    error = icmp_error(ALICE_TAP, BOB_AT_ALICE, elsewhere)
    counted(alice, lambda: alice.outbound(error), OUTBOUND_QUOTE)


def test_inbound_from_a_device_we_do_not_know_is_dropped() -> None:
    alice, _ = pair()
    counted(alice, lambda: alice.inbound("mallory/pc", build("udp", BOB_AT_ALICE, ALICE_TAP, b"")), INBOUND_UNKNOWN)


def test_inbound_with_another_friends_source_address_is_dropped() -> None:
    alice, _ = pair()
    alice.set_friend(
        "carol/pc", FriendDevice(local=ip("172.31.30.30"), remote=ip("10.1.0.1"), remote_view=ip("10.1.0.2"))
    )
    spoofed = build("udp", ip("172.31.30.30"), ALICE_TAP, b"I am carol")
    counted(alice, lambda: alice.inbound("bob/phone", spoofed), INBOUND_SOURCE)


def test_inbound_to_another_destination_is_dropped() -> None:
    alice, _ = pair()
    counted(
        alice,
        lambda: alice.inbound("bob/phone", build("udp", BOB_AT_ALICE, ip("172.31.0.2"), b"")),
        INBOUND_DESTINATION,
    )


def test_inbound_icmp_error_about_a_packet_we_did_not_send_that_device_is_dropped() -> None:
    alice, _ = pair()
    other_flow = build("tcp", ALICE_TAP, ip("172.31.30.30"), b"")  # to carol: bob must not be able to reset it
    counted(alice, lambda: alice.inbound("bob/phone", icmp_error(BOB_AT_ALICE, ALICE_TAP, other_flow)), INBOUND_QUOTE)


def test_inbound_malformed_bytes_are_dropped_and_counted() -> None:
    alice, _ = pair()
    counted(alice, lambda: alice.inbound("bob/phone", b"\x45" + bytes(30)), MALFORMED)


def test_removed_friend_is_unknown_both_ways() -> None:
    alice, _ = pair()
    alice.remove_friend("bob/phone")
    assert alice.outbound(build("udp", ALICE_TAP, BOB_AT_ALICE, b"")) == OUTBOUND_UNKNOWN
    assert alice.inbound("bob/phone", build("udp", BOB_AT_ALICE, ALICE_TAP, b"")) == INBOUND_UNKNOWN


def test_setting_a_friend_again_replaces_its_address() -> None:
    alice, _ = pair()
    moved = FriendDevice(local=ip("172.31.20.6"), remote=BOB_TAP, remote_view=ALICE_AT_BOB)
    alice.set_friend("bob/phone", moved)
    assert alice.friend("bob/phone") == moved
    assert alice.outbound(build("udp", ALICE_TAP, BOB_AT_ALICE, b"")) == OUTBOUND_UNKNOWN
    assert isinstance(alice.outbound(build("udp", ALICE_TAP, ip("172.31.20.6"), b"")), ToFriend)


def test_two_devices_cannot_share_a_local_address_nor_take_ours() -> None:
    alice, _ = pair()
    with pytest.raises(ValueError, match="already 'bob/phone'"):
        alice.set_friend("carol/pc", FriendDevice(local=BOB_AT_ALICE, remote=1, remote_view=2))
    with pytest.raises(ValueError, match="our own address"):
        alice.set_friend("carol/pc", FriendDevice(local=ALICE_TAP, remote=1, remote_view=2))


@settings(max_examples=300)
@given(st.binary(max_size=120), st.booleans())
def test_hostile_bytes_become_a_counted_drop_never_an_exception(data: bytes, shaped: bool) -> None:
    alice, _ = pair()
    packet = ipv4_like(data) if shaped else data
    results = [alice.outbound(packet), alice.inbound("bob/phone", packet), alice.inbound("nobody", packet)]
    drops = [r for r in results if isinstance(r, Dropped)]
    assert all(isinstance(r, ToFriend | bytes | Dropped) for r in results)
    assert sum(alice.counters.values()) == len(drops)


# -- The address pool --------------------------------------------------------------------------------------

OWN = ip("172.31.0.1")


def test_a_device_keeps_its_address_and_devices_get_different_ones() -> None:
    pool = AddressPool(OWN, 16)
    first = pool.address_for("bob/phone")
    assert pool.address_for("bob/phone") == first
    assert pool.address_for("carol/pc") != first
    assert pool.lookup("bob/phone") == first
    assert pool.device_at(first) == "bob/phone"


def test_the_same_device_gets_the_same_address_in_a_fresh_pool() -> None:
    # The table can be lost (a new machine, a deleted file): the hash keeps the address where it was.
    assert AddressPool(OWN, 16).address_for("bob/phone") == AddressPool(OWN, 16).address_for("bob/phone")


def test_a_small_subnet_fills_with_host_addresses_only_then_refuses() -> None:
    own = ip("192.168.5.3")
    pool = AddressPool(own, 29)  # 192.168.5.0/29: hosts .1-.6, ours is .3
    given_out = {pool.address_for(f"device-{i}") for i in range(5)}
    assert given_out == {ip(f"192.168.5.{n}") for n in (1, 2, 4, 5, 6)}
    assert pool.capacity == len(pool) == 5
    with pytest.raises(SubnetFull, match=r"all 5 addresses of 192\.168\.5\.0/29"):
        pool.address_for("one-too-many")
    freed = pool.lookup("device-2")
    pool.release("device-2")
    assert pool.lookup("device-2") is None
    assert pool.address_for("one-too-many") == freed


def test_an_exported_table_imports_to_the_same_addresses() -> None:
    pool = AddressPool(OWN, 16)
    for device in ("bob/phone", "carol/pc", "dave/tv"):
        pool.address_for(device)
    table = pool.export_table()
    assert all(text.startswith("172.31.") for text in table.values())
    restored = AddressPool(OWN, 16)
    restored.import_table(table)
    assert restored.export_table() == table
    assert restored.address_for("erin/pc") not in {ip(text) for text in table.values()}


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"x": "10.0.0.1"}, "not a free host address"),
        ({"x": "172.31.0.0"}, "not a free host address"),
        ({"x": "172.31.255.255"}, "not a free host address"),
        ({"x": "172.31.0.1"}, "not a free host address"),
        ({"x": "172.31.0.9", "y": "172.31.0.9"}, "to both 'x' and 'y'"),
        ({"x": "not an address"}, "address table entry 'x'"),
    ],
)
def test_a_bad_table_is_refused_and_the_pool_keeps_its_own(table: dict[str, str], why: str) -> None:
    pool = AddressPool(OWN, 16)
    before = pool.address_for("bob/phone")
    with pytest.raises(ValueError, match=why):
        pool.import_table(table)
    assert pool.export_table() == {"bob/phone": str(ipaddress.IPv4Address(before))}


def test_the_pool_refuses_a_subnet_without_room_or_an_address_that_is_not_a_host() -> None:
    with pytest.raises(ValueError, match="/31"):
        AddressPool(OWN, 31)
    with pytest.raises(ValueError, match="network or broadcast"):
        AddressPool(ip("172.31.0.0"), 16)


@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=9)), max_size=40))
def test_any_sequence_of_allocations_and_releases_keeps_addresses_unique_and_valid(ops: list[tuple[bool, int]]) -> None:
    own = ip("10.0.0.5")
    pool = AddressPool(own, 28)  # 14 hosts, 13 for devices: enough for the 10 keys
    for allocate, key in ops:
        if allocate:
            pool.address_for(f"d{key}")
        else:
            pool.release(f"d{key}")
    table = {device: ip(text) for device, text in pool.export_table().items()}
    assert len(set(table.values())) == len(table)
    assert all(ip("10.0.0.1") <= a <= ip("10.0.0.14") and a != own for a in table.values())
