"""Frame codecs and the VirtualNic's decisions, with hostile-input properties for every decoder."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.tap.frames import (
    ARP_REPLY,
    ARP_REQUEST,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ArpPacket,
    FrameError,
    arp_reply,
    encode_arp,
    ethernet_frame,
    icmp_error_allowed,
    icmp_unreachable,
    ipv4_addresses,
    parse_arp,
    parse_ethernet,
)
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC, Ignored, Outbound, Reply, VirtualNic

TAP_MAC = bytes.fromhex("0a0000000001")
KERNEL_MAC = bytes.fromhex("0a00000000aa")


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


OWN = ip("10.254.0.1")
PEER = ip("10.254.3.7")


def reference_checksum(data: bytes) -> int:
    """Written independently of frames.internet_checksum: add big-endian words, fold carries, invert."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += int.from_bytes(data[i : i + 2], "big")
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def ipv4(src: int, dst: int, payload: bytes = b"hello", protocol: int = 17, flags_frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(payload), 7, flags_frag, 64, protocol, 0, src, dst)
    csum = reference_checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + payload


def arp_request(sender_ip: int, target_ip: int, sender_mac: bytes = KERNEL_MAC) -> bytes:
    arp = encode_arp(ArpPacket(ARP_REQUEST, sender_mac, sender_ip, b"\x00" * 6, target_ip))
    return ethernet_frame(b"\xff" * 6, sender_mac, ETH_P_ARP, arp)


def nic() -> VirtualNic:
    return VirtualNic(OWN, 16, TAP_MAC)


# -- Ethernet --------------------------------------------------------------------------------------------


def test_ethernet_round_trip_keeps_addresses_type_and_payload() -> None:
    frame = ethernet_frame(b"\x01" * 6, b"\x02" * 6, ETH_P_IP, b"payload")
    dst, src, ethertype, payload = parse_ethernet(frame)
    assert (dst, src, ethertype, bytes(payload)) == (b"\x01" * 6, b"\x02" * 6, ETH_P_IP, b"payload")
    assert len(frame) == 14 + 7


def test_ethernet_shorter_than_header_is_frame_error() -> None:
    with pytest.raises(FrameError):
        parse_ethernet(b"\x00" * 13)


def test_ethernet_encoder_rejects_wrong_mac_length_as_misuse() -> None:
    with pytest.raises(ValueError) as info:
        ethernet_frame(b"\x01" * 5, b"\x02" * 6, ETH_P_IP, b"")
    assert not isinstance(info.value, FrameError)


# -- ARP -------------------------------------------------------------------------------------------------


def test_arp_round_trip() -> None:
    packet = ArpPacket(ARP_REPLY, b"\x02" * 6, ip("1.2.3.4"), b"\x03" * 6, ip("5.6.7.8"))
    assert parse_arp(encode_arp(packet)) == packet


def test_arp_reply_swaps_addresses_and_answers_with_our_mac() -> None:
    request = parse_arp(arp_request(OWN, PEER)[14:])
    reply = parse_arp(arp_reply(request, DEFAULT_GATEWAY_MAC))
    assert reply.op == ARP_REPLY
    assert (reply.sender_mac, reply.sender_ip) == (DEFAULT_GATEWAY_MAC, PEER)
    assert (reply.target_mac, reply.target_ip) == (KERNEL_MAC, OWN)


def test_arp_reply_to_a_reply_is_misuse() -> None:
    with pytest.raises(ValueError):
        arp_reply(ArpPacket(ARP_REPLY, KERNEL_MAC, OWN, TAP_MAC, PEER), DEFAULT_GATEWAY_MAC)


@pytest.mark.parametrize(
    "field_offset, value",
    [(0, b"\x00\x06"), (2, b"\x86\xdd"), (4, b"\x08"), (5, b"\x10"), (6, b"\x00\x03")],
    ids=["htype", "ptype", "hlen", "plen", "op"],
)
def test_arp_with_unsupported_header_field_is_frame_error(field_offset: int, value: bytes) -> None:
    good = bytearray(arp_request(OWN, PEER)[14:])
    good[field_offset : field_offset + len(value)] = value
    with pytest.raises(FrameError):
        parse_arp(bytes(good))


def test_arp_truncated_is_frame_error() -> None:
    with pytest.raises(FrameError):
        parse_arp(arp_request(OWN, PEER)[14:41])


# -- IPv4 ------------------------------------------------------------------------------------------------


def test_ipv4_addresses_reads_source_and_destination() -> None:
    assert ipv4_addresses(ipv4(OWN, PEER)) == (OWN, PEER)


def test_ipv4_addresses_accepts_trailing_padding() -> None:
    assert ipv4_addresses(ipv4(OWN, PEER, b"") + b"\x00" * 26) == (OWN, PEER)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: b"\x65" + p[1:],  # version 6
        lambda p: b"\x44" + p[1:],  # IHL 4 words = 16 bytes
        lambda p: b"\x4f" + p[1:],  # IHL 60 bytes > total length
        lambda p: p[:2] + (len(p) + 1).to_bytes(2, "big") + p[4:],  # total length past the end
        lambda p: p[:19],  # truncated header
    ],
    ids=["version", "ihl-small", "ihl-large", "total-length", "truncated"],
)
def test_ipv4_header_violations_are_frame_errors(mutate: object) -> None:
    with pytest.raises(FrameError):
        ipv4_addresses(mutate(ipv4(OWN, PEER)))  # type: ignore[operator]


# -- ICMP ------------------------------------------------------------------------------------------------


def test_icmp_unreachable_is_addressed_back_with_valid_checksums_and_quote() -> None:
    original = ipv4(OWN, PEER, b"0123456789abcdef")
    gateway = ip("10.254.255.254")
    packet = icmp_unreachable(original, from_ip=gateway)
    header, icmp = packet[:20], packet[20:]
    assert ipv4_addresses(packet) == (gateway, OWN)
    assert header[9] == 1  # protocol ICMP
    assert int.from_bytes(header[2:4], "big") == len(packet)
    assert reference_checksum(header) == 0, "IPv4 header checksum must verify"
    assert reference_checksum(icmp) == 0, "ICMP checksum must verify"
    assert (icmp[0], icmp[1]) == (3, 1)  # destination unreachable, host unreachable (RFC 792)
    assert icmp[4:8] == b"\x00" * 4
    assert icmp[8:] == original[:28], "quote is the original header plus 64 bits of data"


def test_icmp_unreachable_quotes_short_packet_whole_and_takes_code() -> None:
    original = ipv4(OWN, PEER, b"abc")
    icmp = icmp_unreachable(original, from_ip=PEER, code=13)[20:]
    assert icmp[1] == 13
    assert icmp[8:] == original
    assert reference_checksum(icmp) == 0


def test_icmp_errors_are_not_sent_about_errors_fragments_or_multicast() -> None:
    echo = b"\x08\x00" + b"\x00" * 6
    unreachable = b"\x03\x01" + b"\x00" * 6
    assert icmp_error_allowed(ipv4(OWN, PEER))
    assert icmp_error_allowed(ipv4(OWN, PEER, echo, protocol=1))
    assert not icmp_error_allowed(ipv4(OWN, PEER, unreachable, protocol=1))
    assert not icmp_error_allowed(ipv4(OWN, PEER, flags_frag=185))  # offset 185*8, not the first fragment
    assert icmp_error_allowed(ipv4(OWN, PEER, flags_frag=0x2000))  # more-fragments set, offset 0: first
    assert not icmp_error_allowed(ipv4(OWN, ip("224.0.0.251")))
    assert not icmp_error_allowed(ipv4(OWN, ip("255.255.255.255")))


# -- VirtualNic ------------------------------------------------------------------------------------------


def test_nic_answers_arp_for_subnet_peer_with_gateway_mac() -> None:
    n = nic()
    result = n.from_tap(arp_request(OWN, PEER))
    assert isinstance(result, Reply)
    dst, src, ethertype, payload = parse_ethernet(result.frame)
    assert (dst, src, ethertype) == (KERNEL_MAC, DEFAULT_GATEWAY_MAC, ETH_P_ARP)
    reply = parse_arp(payload)
    assert reply == ArpPacket(ARP_REPLY, DEFAULT_GATEWAY_MAC, PEER, KERNEL_MAC, OWN)


def test_nic_learns_kernel_mac_from_arp_request() -> None:
    n = nic()
    n.from_tap(arp_request(OWN, PEER))
    frame = n.to_tap(ipv4(PEER, OWN))
    assert frame[:6] == KERNEL_MAC


@pytest.mark.parametrize(
    "frame, reason",
    [
        (arp_request(OWN, OWN), "arp-gratuitous"),
        (arp_request(PEER, OWN), "arp-own-address"),
        (arp_request(OWN, ip("192.0.2.1")), "arp-not-subnet"),
        (arp_request(OWN, ip("10.254.255.255")), "arp-not-subnet"),
        (
            ethernet_frame(
                TAP_MAC,
                KERNEL_MAC,
                ETH_P_ARP,
                encode_arp(ArpPacket(ARP_REPLY, KERNEL_MAC, OWN, TAP_MAC, PEER)),
            ),
            "arp-reply",
        ),
        (ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IP, ipv4(OWN, OWN)), "own-address"),
        (ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IP, ipv4(OWN, ip("192.0.2.9"))), "not-subnet"),
        (
            ethernet_frame(b"\x01\x00\x5e\x00\x00\xfb", KERNEL_MAC, ETH_P_IP, ipv4(OWN, ip("224.0.0.251"))),
            "multicast",
        ),
        (ethernet_frame(b"\xff" * 6, KERNEL_MAC, ETH_P_IP, ipv4(OWN, ip("10.254.255.255"))), "broadcast"),
        (ethernet_frame(b"\xff" * 6, KERNEL_MAC, ETH_P_IP, ipv4(OWN, ip("255.255.255.255"))), "broadcast"),
        (ethernet_frame(b"\x33\x33\x00\x00\x00\x01", KERNEL_MAC, ETH_P_IPV6, b"\x60" + b"\x00" * 39), "ipv6"),
        (ethernet_frame(b"\xff" * 6, KERNEL_MAC, 0x88CC, b"lldp"), "ethertype"),
        (ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IP, b"\x45\x00"), "malformed"),
        (b"\x00" * 10, "malformed"),
    ],
)
def test_nic_ignores_and_counts(frame: bytes, reason: str) -> None:
    n = nic()
    assert n.from_tap(frame) == Ignored(reason)
    assert n.counters == {reason: 1}


def test_nic_sends_subnet_unicast_outbound_trimmed_of_padding() -> None:
    packet = ipv4(OWN, PEER, b"x")
    result = nic().from_tap(ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IP, packet + b"\x00" * 25))
    assert isinstance(result, Outbound)
    assert result.dst_ip == PEER
    assert bytes(result.packet) == packet


def test_nic_to_tap_wraps_packet_for_the_kernel() -> None:
    packet = ipv4(PEER, OWN)
    dst, src, ethertype, payload = parse_ethernet(nic().to_tap(packet))
    assert (dst, src, ethertype, bytes(payload)) == (TAP_MAC, DEFAULT_GATEWAY_MAC, ETH_P_IP, packet)


def test_nic_to_tap_refuses_packets_for_other_addresses_or_garbage() -> None:
    n = nic()
    with pytest.raises(FrameError):
        n.to_tap(ipv4(OWN, PEER))
    with pytest.raises(FrameError):
        n.to_tap(b"\x60" + b"\x00" * 39)


def test_nic_rejects_network_or_broadcast_as_own_address() -> None:
    with pytest.raises(ValueError):
        VirtualNic(ip("10.254.0.0"), 16, TAP_MAC)
    with pytest.raises(ValueError):
        VirtualNic(OWN, 31, TAP_MAC)


# -- Properties: hostile bytes parse or raise FrameError, nothing else -----------------------------------

frames_like = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda et, body: ethernet_frame(b"\x02" * 6, KERNEL_MAC, et, body),
        st.sampled_from([ETH_P_IP, ETH_P_ARP, ETH_P_IPV6, 0x1234]),
        st.binary(max_size=100),
    ),
    st.builds(
        ipv4,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=40),
    ),
)


@settings(max_examples=400)
@given(frames_like)
def test_decoders_parse_or_raise_frame_error(data: bytes) -> None:
    for decode in (parse_ethernet, parse_arp, ipv4_addresses):
        try:
            decode(data)
        except FrameError:
            pass


@settings(max_examples=400)
@given(st.binary(max_size=60), st.sampled_from([ETH_P_IP, ETH_P_ARP, ETH_P_IPV6]), st.integers(0, 2**32 - 1))
def test_nic_from_tap_never_raises(body: bytes, ethertype: int, dst: int) -> None:
    n = nic()
    for frame in (
        body,
        ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ethertype, body),
        ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IP, ipv4(OWN, dst, body)),
    ):
        result = n.from_tap(frame)
        assert isinstance(result, Reply | Outbound | Ignored)
        if isinstance(result, Outbound):
            assert n.in_subnet(result.dst_ip) and result.dst_ip != OWN


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_nic_to_tap_wraps_or_raises_frame_error(data: bytes) -> None:
    try:
        frame = nic().to_tap(data)
    except FrameError:
        return
    assert ipv4_addresses(frame[14:])[1] == OWN
