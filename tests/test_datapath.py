"""The data path with TAP offload: virtio_net_hdr codec, checksum completion, and super-frames carried
between two real nodes (memory underlay and TAPs) with their offload header unchanged."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.probes import PROBE_INTERVAL, PROBE_MAX
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
    segment_tcp,
)
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.memory import MemoryNetwork
from overlay.wire import ROUTED_HEADER, Kind, LinkMsg
from tests.support.memgroup import linked_pair

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


def ones_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, word by word: independent of frames.internet_checksum."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp4_checksums_ok(packet: bytes) -> bool:
    """IPv4 header checksum and TCP checksum over the pseudo-header (RFC 793 §3.1) both verify."""
    ip_len = (packet[0] & 0x0F) * 4
    tcp = packet[ip_len:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return ones_sum(packet[:ip_len]) == 0xFFFF and ones_sum(pseudo + tcp) == 0xFFFF


CWR, ACK, PSH, FIN = 0x80, 0x10, 0x08, 0x01


def tcp4_super_frame(payload: bytes, *, seq: int, ip_id: int, flags: int, options: bytes = b"") -> bytes:
    """An IPv4/TCP super-frame as a TSO kernel hands it over: the pseudo-header sum in the TCP checksum."""
    tcp_len = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 777, (tcp_len // 4) << 4, flags, 502, 0, 0) + options
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len + len(payload), ip_id, 0x4000, 64, 6, 0,
        ipaddress.IPv4Address(A).packed, ipaddress.IPv4Address(B).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    pseudo = header[12:20] + struct.pack("!BBH", 0, 6, tcp_len + len(payload))
    tcp = tcp[:16] + struct.pack("!H", ~internet_checksum(pseudo) & 0xFFFF) + tcp[18:]
    return header + tcp + payload


def tso_header(mss: int, tcp_len: int = 20) -> VnetHeader:
    return VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 14 + 20 + tcp_len, mss, 34, 16)


def check_segments(original: bytes, segments: list[bytes], mss: int) -> None:
    """What a receiver of tcp_gso_segment's output may rely on, checked field by field."""
    ip_len = (original[0] & 0x0F) * 4
    tcp_len = (original[ip_len + 12] >> 4) * 4
    payload = original[ip_len + tcp_len : struct.unpack_from("!H", original, 2)[0]]
    seq0, flags0 = struct.unpack_from("!I", original, ip_len + 4)[0], original[ip_len + 13]
    id0 = struct.unpack_from("!H", original, 4)[0]
    assert len(segments) == max(1, -(-len(payload) // mss))
    offset = 0
    for i, seg in enumerate(segments):
        assert tcp4_checksums_ok(seg), f"segment {i} checksums"
        assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
        assert struct.unpack_from("!H", seg, 4)[0] == (id0 + i) & 0xFFFF
        assert seg[6:10] == original[6:10] and seg[12:ip_len] == original[12:ip_len]  # flags, TTL, addresses
        assert struct.unpack_from("!I", seg, ip_len + 4)[0] == (seq0 + offset) & 0xFFFFFFFF
        last = i == len(segments) - 1
        want = flags0 & ~((0 if last else FIN | PSH) | (CWR if i else 0))
        assert seg[ip_len + 13] == want, f"segment {i} flags {seg[ip_len + 13]:#x}, want {want:#x}"
        assert seg[ip_len + 14 : ip_len + 16] == original[ip_len + 14 : ip_len + 16]  # window
        assert seg[ip_len + 20 : ip_len + tcp_len] == original[ip_len + 20 : ip_len + tcp_len]  # options
        chunk = seg[ip_len + tcp_len :]
        assert len(chunk) <= mss
        offset += len(chunk)
    assert b"".join(seg[ip_len + tcp_len :] for seg in segments) == payload


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


def test_segment_tcp_cuts_a_super_frame_as_the_kernel_would() -> None:
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)  # NOP NOP timestamps
    packet = tcp4_super_frame(
        os.urandom(60001), seq=0xFFFFF000, ip_id=0xFFFE, flags=CWR | ACK | PSH | FIN, options=options
    )
    segments = segment_tcp(packet, tso_header(1348, 32))
    assert len(segments) == 45 and all(len(s) <= 1400 for s in segments)
    check_segments(packet, segments, 1348)
    assert segments[0][33] == CWR | ACK and segments[-1][33] == ACK | PSH | FIN  # flags: the checks, spelt out
    assert struct.unpack_from("!H", segments[2], 4)[0] == 0  # IP ID wraps


def test_segment_tcp_of_a_frame_that_fits_one_segment_just_completes_it() -> None:
    packet = tcp4_super_frame(b"x" * 100, seq=5, ip_id=9, flags=ACK | PSH)
    [only] = segment_tcp(packet, tso_header(1360))
    assert only[:16] == packet[:16] and only[20:] != packet[20:] and tcp4_checksums_ok(only)


@pytest.mark.parametrize(
    ("change", "header"),
    [
        ((9, 17), tso_header(1360)),  # UDP, not TCP
        ((6, 0x20), tso_header(1360)),  # More Fragments set
        (None, VnetHeader(VNET_F_NEEDS_CSUM, 4, 54, 1360, 34, 16)),  # TCPv6 segmentation of an IPv4 packet
        (None, VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1360, 34, 6)),  # checksum not TCP's
        (None, VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 8, 34, 16)),  # 8-byte segments
        ((32, 0xF0), tso_header(1360)),  # TCP header length 60 beyond a 20+20+10 byte packet
        ((2, 0xFF), tso_header(1360)),  # IPv4 total length beyond the bytes present
    ],
)
def test_segment_tcp_refuses_a_super_frame_that_does_not_add_up(
    change: tuple[int, int] | None, header: VnetHeader
) -> None:
    packet = bytearray(tcp4_super_frame(b"0123456789", seq=1, ip_id=1, flags=ACK))
    if change is not None:
        packet[change[0]] = change[1]
    with pytest.raises(FrameError):
        segment_tcp(bytes(packet), header)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.integers(0, 255),
    st.integers(0, 10).map(lambda n: bytes(4 * n)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(1, 3000),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=3),
    st.sampled_from([VNET_GSO_TCPV4, VNET_GSO_TCPV4 | VNET_GSO_ECN, 0, 4, 3]),
    st.one_of(st.just(34), st.integers(0, 80)),
    st.one_of(st.just(16), st.integers(0, 40)),
)
def test_segment_tcp_of_any_frame_gives_valid_segments_or_frame_error(
    payload: bytes,
    flags: int,
    options: bytes,
    seq: int,
    ip_id: int,
    mss: int,
    mutations: list[tuple[int, int]],
    gso_type: int,
    csum_start: int,
    csum_offset: int,
) -> None:
    packet = bytearray(tcp4_super_frame(payload, seq=seq, ip_id=ip_id, flags=flags, options=options))
    for where, value in mutations:
        if where < len(packet):
            packet[where] = value
    header = VnetHeader(VNET_F_NEEDS_CSUM, gso_type, 0, mss, csum_start, csum_offset)
    try:
        segments = segment_tcp(bytes(packet), header)
    except FrameError:
        return
    check_segments(bytes(packet), segments, mss)


def test_segment_tcp_of_arbitrary_bytes_raises_only_frame_error() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.integers(0, 2**16 - 1))
    def fuzz(data: bytes, mss: int) -> None:
        try:
            segment_tcp(data, tso_header(mss))
        except FrameError:
            pass

    fuzz()


# --- two nodes -------------------------------------------------------------------------------------------------


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
        a, b, tap_a, tap_b = await linked_pair(True, True)
        try:
            packet = ipv4(A, B, 6, os.urandom(60000))
            frame = TSO.encode() + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet)
            out = await carry(tap_a, tap_b, [frame] * 3)
            assert len(out) == 3
            for f in out:
                assert f[:VNET_HDR_LEN] == TSO.encode()
                assert f[VNET_HDR_LEN + 14 :] == packet
                assert f[VNET_HDR_LEN : VNET_HDR_LEN + 6] == tap_b.mac
            assert b.id in a.router.data_routes  # the later frames skipped the Routed packet
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_after_routes_change_a_flow_is_found_without_a_packet_and_is_what_the_python_path_sends() -> None:
    """The compiled data path keeps a flow in use while Python checks it after a route change (DataPath.flow):
    the route must come without a packet sent, and its header be the one the Python path's next packet has."""

    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked_pair(False, False)
        try:
            frame = ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, ipv4(A, B, 17, b"x" * 40))
            assert len(await carry(tap_a, tap_b, [frame])) == 1
            b_ip = int(ipaddress.IPv4Address(B))
            before = a.datapath.flow(b_ip)
            assert before is not None and before[0] == b.id
            a.router.forget_routes()
            assert b.id not in a.router.data_routes
            assert a.datapath.flow(b_ip) == before
            link = a.links.links[b.id]
            sent: list[bytes] = []
            send = link.send
            link.send = lambda message: (sent.append(bytes(message)), send(message))[1]  # type: ignore[method-assign]
            a.router.forget_routes()
            assert len(await carry(tap_a, tap_b, [frame])) == 1
            (routed,) = [m for m in sent if m[0] == LinkMsg.ROUTED]
            assert routed[: ROUTED_HEADER.size] == before[1]
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_plain_packet_reaches_an_offload_tap_behind_a_zero_header() -> None:
    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked_pair(False, True)
        try:
            packet = ipv4(A, B, 17, b"\x0f\xa0\x0f\xa1\x00\x0c\x00\x00ping")
            out = await carry(tap_a, tap_b, [ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet)])
            assert [f[:VNET_HDR_LEN] for f in out] == [ZERO_VNET_HDR]
            assert out[0][VNET_HDR_LEN + 14 :] == packet
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_tap_without_offload_gets_checksums_completed_and_super_frames_as_segments() -> None:
    async def scenario() -> None:
        a, b, tap_a, tap_b = await linked_pair(True, False)
        try:
            small = udp_with_partial_checksum(A, B, b"hello")
            csum_only = VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 6).encode()
            out = await carry(
                tap_a, tap_b, [csum_only + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, small)]
            )
            assert len(out) == 1 and udp_checksum_ok(out[0][14:])
            big = tcp4_super_frame(os.urandom(20000), seq=1000, ip_id=7, flags=ACK | PSH)
            frame = TSO.encode() + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, big)
            out = await carry(tap_a, tap_b, [frame])
            assert len(out) == 15 and all(f[:6] == tap_b.mac for f in out)
            check_segments(big, [f[14:] for f in out], TSO.gso_size)
            assert not any(k.startswith("drop") for k in b.counters), b.counters
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_hostile_offload_header_from_a_peer_is_dropped_before_the_tap() -> None:
    async def scenario() -> None:
        a, b, _, tap_b = await linked_pair(True, True)
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
        a, b, tap_a, _ = await linked_pair(True, True)
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


def test_probe_over_a_path_that_carries_big_datagrams_marks_the_link_fragments_ok() -> None:
    async def scenario() -> None:
        a, b, _, _ = await linked_pair(True, True)  # waits for the probe to pass both ways
        try:
            assert a.links.links[b.id].fragments_ok and b.links.links[a.id].fragments_ok
            assert not a.datapath.probes.token  # acknowledged: no probe outstanding
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_link_whose_path_drops_fragments_carries_super_frames_as_segments() -> None:
    async def scenario() -> None:
        # A 1500-byte path that drops IP fragments: no datagram over 1500 bytes arrives.
        net = MemoryNetwork(max_datagram=1500)
        a, b, tap_a, tap_b = await linked_pair(True, True, net)
        try:
            await asyncio.sleep(0.05)
            assert net.oversize >= 2, "the probes should have been too big to pass"
            assert not a.links.links[b.id].fragments_ok and not b.links.links[a.id].fragments_ok
            big = tcp4_super_frame(os.urandom(30000), seq=99, ip_id=1, flags=CWR | ACK | PSH)
            frame = TSO.encode() + ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, big)
            lost = net.oversize
            # The first frame resolves through the routed path, the second takes the cached route.
            for _ in range(2):
                out = await carry(tap_a, tap_b, [frame])
                assert len(out) == 23, len(out)
                assert all(f[:VNET_HDR_LEN] == ZERO_VNET_HDR for f in out)  # plain, finished packets
                check_segments(big, [f[VNET_HDR_LEN + 14 :] for f in out], TSO.gso_size)
            assert net.oversize == lost  # no data datagram was too big
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_unacknowledged_probe_is_repeated_until_it_passes() -> None:
    async def scenario() -> None:
        net = MemoryNetwork(max_datagram=1500)
        a, b, _, _ = await linked_pair(False, False, net)
        try:
            link = a.links.links[b.id]
            due = a.datapath.probes.due[b.id]
            a.datapath.probes.tick(due - 1.0)
            assert a.datapath.probes.due[b.id] == due  # not yet
            net.max_datagram = None  # the path changes: fragments pass now
            a.datapath.probes.tick(due)
            for _ in range(100):
                if link.fragments_ok:
                    break
                await asyncio.sleep(0.01)
            assert link.fragments_ok
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_unanswered_probes_back_off_to_an_hour_and_a_new_path_is_probed_at_once() -> None:
    """A path that never carries a probe (a TURN relay) must not cost 60 KB a minute for the link's life."""

    async def scenario() -> None:
        net = MemoryNetwork(max_datagram=1500)  # no probe ever passes
        a, b, _, _ = await linked_pair(False, False, net)
        try:
            dp, link = a.datapath, a.links.links[b.id]
            t = dp.probes.due[b.id] - PROBE_INTERVAL  # the probe sent at link up
            intervals = []
            for _ in range(15):
                due = dp.probes.due[b.id]
                dp.probes.tick(due - 0.5)
                assert dp.probes.due[b.id] == due  # nothing before it is due
                dp.probes.tick(due)
                intervals.append(due - t)
                t = due
            assert intervals[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]  # six probes in the first minute
            assert intervals[-3:] == [3840.0] * 3
            assert PROBE_MAX == 3840.0
            token = dp.probes.token[b.id]
            # The link moves to another path: probed there at once, and again PROBE_INTERVAL later if unanswered.
            link.path = a.links.path_for(("127.0.0.1", 5899))  # in-memory network: nothing leaves the process
            dp.probes.tick(t + 1.0)
            assert dp.probes.token[b.id] != token
            assert dp.probes.due[b.id] == t + 1.0 + PROBE_INTERVAL
        finally:
            await a.stop()
            await b.stop()

    run(scenario())
