"""The data path with TAP offload: virtio_net_hdr codec, checksum completion, and super-frames carried
between two real nodes (memory underlay and TAPs) with their offload header unchanged."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.dht.records import make_record
from overlay.identity import Identity
from overlay.node import Node, NodeSettings
from overlay.tap.device import MemoryTap
from overlay.tap.frames import (
    ARP_REQUEST,
    ETH_P_ARP,
    ETH_P_IP,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_ECN,
    VNET_GSO_TCPV4,
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
    ArpPacket,
    FrameError,
    VnetHeader,
    complete_checksum,
    encode_arp,
    ethernet_frame,
    internet_checksum,
    parse_vnet_header,
)
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.underlay import MemoryNetwork, MemoryUnderlay
from overlay.wire import ROUTED_HEADER, Kind, LinkMsg

ROOM = "group1@conference.example.test"
A, B = "10.254.0.1", "10.254.0.2"
TSO = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1360, 34, 16)


def ipv4(src: str, dst: str, protocol: int, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, protocol, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:] + payload


def udp_with_partial_checksum(src: str, dst: str, data: bytes) -> bytes:
    """A UDP packet as a kernel with checksum offload hands it over: the pseudo-header sum in the field."""
    length = 8 + len(data)
    pseudo = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!BBH", 0, 17, length)
    partial = ~internet_checksum(pseudo) & 0xFFFF
    return ipv4(src, dst, 17, struct.pack("!HHHH", 4000, 4001, length, partial) + data)


def udp_checksum_ok(packet: bytes) -> bool:
    src, dst, udp = packet[12:16], packet[16:20], packet[20:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
    return internet_checksum(pseudo + udp) == 0


# --- codec ---------------------------------------------------------------------------------------------------


def test_vnet_header_round_trips_through_encode_and_parse() -> None:
    frame_len = 14 + 60000
    assert parse_vnet_header(TSO.encode(), frame_len) == TSO
    assert parse_vnet_header(ZERO_VNET_HDR, 60) == VnetHeader(0, 0, 0, 0, 0, 0)
    assert TSO.is_gso and VnetHeader(1, VNET_GSO_TCPV4 | VNET_GSO_ECN, 54, 1360, 34, 16).is_gso
    assert not VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 6).is_gso


@pytest.mark.parametrize(
    "header",
    [
        VnetHeader(0x04, 0, 0, 0, 0, 0),  # unknown flag
        VnetHeader(VNET_F_NEEDS_CSUM, 3, 42, 1400, 34, 6),  # UDP fragmentation offload: not accepted
        VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 0, 34, 16),  # segmentation without a segment size
        VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 8, 34, 16),  # 8-byte segments: a packet storm
        VnetHeader(0, VNET_GSO_TCPV4, 54, 1360, 34, 16),  # segmentation without checksum offload
        VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 99, 16),  # checksum beyond the frame
        VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 4, 16),  # checksum inside the Ethernet header
        VnetHeader(0, 0, 500, 0, 0, 0),  # header length beyond the frame
    ],
)
def test_vnet_header_that_asks_the_kernel_for_something_unsafe_is_refused(header: VnetHeader) -> None:
    with pytest.raises(FrameError):
        parse_vnet_header(header.encode(), 100)


@given(st.binary(max_size=24), st.integers(min_value=0, max_value=70000))
def test_vnet_header_parser_returns_a_header_or_raises_frame_error(data: bytes, frame_len: int) -> None:
    try:
        header = parse_vnet_header(data, frame_len)
    except FrameError:
        return
    assert header.encode() == data[:VNET_HDR_LEN]
    if header.flags & VNET_F_NEEDS_CSUM:
        assert header.csum_start + header.csum_offset + 2 <= frame_len


def test_complete_checksum_fills_in_what_checksum_offload_left_undone() -> None:
    packet = udp_with_partial_checksum(A, B, os.urandom(301))
    assert not udp_checksum_ok(packet)
    done = complete_checksum(packet, VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 14 + 20, 6))
    assert udp_checksum_ok(done) and done[:26] == packet[:26] and done[28:] == packet[28:]


# --- two nodes -------------------------------------------------------------------------------------------------


async def linked(vnet_a: bool, vnet_b: bool) -> tuple[Node, Node, MemoryTap, MemoryTap]:
    net = MemoryNetwork()
    nodes, taps = [], []
    for i, (address, vnet) in enumerate(((A, vnet_a), (B, vnet_b))):
        tap = MemoryTap(name=f"mem{i}", mac=bytes([2, 0, 0, 0, 0, i + 1]), vnet_hdr=vnet)
        node = Node(
            Identity.from_seed(bytes([i + 7]) * 32), NodeSettings(room=ROOM, address=f"{address}/16"),
            MemoryUnderlay(net), tap=tap,
        )  # fmt: skip
        await node.start()
        nodes.append(node)
        taps.append(tap)
    a, b = nodes
    a.links.connect(b.identity.public_key, b.underlay.local_endpoint)
    for _ in range(200):
        if b.id in a.links.links and a.id in b.links.links:
            break
        await asyncio.sleep(0.01)
    assert b.id in a.links.links, "the two nodes did not link"
    now = time.time()
    a.cache.put(make_record(b.identity, ROOM, B, now), now)
    return a, b, taps[0], taps[1]


async def carry(tap_a: MemoryTap, tap_b: MemoryTap, frames: list[bytes]) -> list[bytes]:
    tap_b.written.clear()
    for f in frames:
        tap_a.inject(f)
    for _ in range(100):
        await asyncio.sleep(0.005)
        if len(tap_b.written) >= len(frames):
            break
    return list(tap_b.written)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_super_frame_arrives_with_its_offload_header_unchanged_and_repeats_take_the_cached_route() -> None:
    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked(True, True)
        try:
            packet = ipv4(A, B, 6, os.urandom(60000))
            frame = TSO.encode() + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet)
            out = await carry(tap_a, tap_b, [frame] * 3)
            assert len(out) == 3
            for f in out:
                assert f[:VNET_HDR_LEN] == TSO.encode()
                assert f[VNET_HDR_LEN + 14 :] == packet
                assert f[VNET_HDR_LEN : VNET_HDR_LEN + 6] == tap_b.mac
            assert b.id in a._data_routes  # the later frames skipped the Routed packet
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_plain_packet_reaches_an_offload_tap_behind_a_zero_header() -> None:
    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked(False, True)
        try:
            packet = ipv4(A, B, 17, b"\x0f\xa0\x0f\xa1\x00\x0c\x00\x00ping")
            out = await carry(tap_a, tap_b, [ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet)])
            assert [f[:VNET_HDR_LEN] for f in out] == [ZERO_VNET_HDR]
            assert out[0][VNET_HDR_LEN + 14 :] == packet
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_tap_without_offload_gets_checksums_completed_and_no_super_frames() -> None:
    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked(True, False)
        try:
            small = udp_with_partial_checksum(A, B, b"hello")
            csum_only = VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 6).encode()
            out = await carry(
                tap_a, tap_b, [csum_only + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, small)]
            )
            assert len(out) == 1 and udp_checksum_ok(out[0][14:])
            big = ipv4(A, B, 6, os.urandom(20000))
            out = await carry(
                tap_a, tap_b, [TSO.encode() + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, big)]
            )
            assert out == []
            assert b.counters.get("drop: TCP super-frame for a TAP without offload") == 1
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_hostile_offload_header_from_a_peer_is_dropped_before_the_tap() -> None:
    async def scenario() -> None:
        a, b, _, tap_b = await linked(True, True)
        try:
            packet = ipv4(A, B, 6, os.urandom(100))
            bad = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1360, 34, 5000).encode()  # csum past the end
            header = ROUTED_HEADER.pack(LinkMsg.ROUTED, 63, 1, a.id, b.id, 1, Kind.DATA_GSO)
            tap_b.written.clear()
            a.links.links[b.id].send(header + bad + packet)
            await asyncio.sleep(0.05)
            assert tap_b.written == []
            assert b.counters.get("drop: data not for our address") == 1
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_arp_reply_on_an_offload_tap_carries_a_zero_header() -> None:
    async def scenario() -> None:
        a, b, tap_a, _ = await linked(True, True)
        try:
            ask = ArpPacket(
                ARP_REQUEST, tap_a.mac, int(ipaddress.IPv4Address(A)), bytes(6), int(ipaddress.IPv4Address(B))
            )
            frame = ZERO_VNET_HDR + ethernet_frame(b"\xff" * 6, tap_a.mac, ETH_P_ARP, encode_arp(ask))
            tap_a.written.clear()
            tap_a.inject(frame)
            await asyncio.sleep(0.02)
            assert len(tap_a.written) == 1
            reply = tap_a.written[0]
            assert reply[:VNET_HDR_LEN] == ZERO_VNET_HDR
            assert struct.unpack_from("!H", reply, VNET_HDR_LEN + 12)[0] == ETH_P_ARP
            assert reply[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] == DEFAULT_GATEWAY_MAC
        finally:
            await a.stop()
            await b.stop()

    run(scenario())
