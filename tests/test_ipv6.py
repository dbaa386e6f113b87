"""IPv6 inside the VPN: neighbour discovery on the TAP, IPv6 packets through the virtual NIC, ICMPv6 errors,
TCPv6 super-frames cut in software, IPv6 address records, and members reaching each other over IPv6 (in
memory; tests/test_e2e.py and tests/test_trust_netns.py do it with real processes, ping -6 and iperf3)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.config import ConfigError, load_config
from overlay.configvalues import interface6, is_prefix6, resolve_address6
from overlay.datapath import SOURCE_DROP
from overlay.dht.records import (
    check_record,
    decode_address,
    decode_dht_value,
    decode_record,
    encode_dht_value,
    make_record,
    value_kind,
)
from overlay.identity import Identity
from overlay.ids import derived_address6, is_derived_address6
from overlay.tap.frames import (
    ETH_HEADER_LEN,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_TCP,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_TCPV6,
    FrameError,
    VnetHeader,
    ethernet_frame,
    ipv6_header,
    parse_ethernet,
    segment_tcp,
)
from overlay.tap.ndp import (
    IPV6_MIN_MTU,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    advertisement,
    icmpv6_error_allowed,
    icmpv6_unreachable,
    parse_solicitation,
)
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC, Ignored, Outbound, Reply, VirtualNic, check_address6
from overlay.trust.groupkey import GroupKey, format_public_key
from overlay.wire import DecodeError, Kind
from tests.support.memgroup import MemoryGroup, vaddr
from tests.test_tap_frames import KERNEL_MAC, OWN, TAP_MAC, reference_checksum

PREFIX = "fd00:1:2:3::/64"


def ip6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


OWN6 = ip6("fd00:1:2:3::1")
PEER6 = ip6("fd00:1:2:3::77")


def ipv6(src: int, dst: int, payload: bytes, next_header: int = 17, hop_limit: int = 64) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit)
        + src.to_bytes(16, "big")
        + dst.to_bytes(16, "big")
        + payload
    )


def pseudo_checksum_ok(packet: bytes) -> bool:
    """The upper-layer checksum of an IPv6 packet verifies (RFC 8200 §8.1), computed apart from the code."""
    length = len(packet) - 40
    pseudo = packet[8:40] + struct.pack("!I3xB", length, packet[6])
    return reference_checksum(pseudo + packet[40:]) in (0, 0xFFFF)


def solicitation(src: int, target: int, hop_limit: int = 255, dst: int | None = None) -> bytes:
    body = struct.pack("!BBHI", ND_NEIGHBOR_SOLICIT, 0, 0, 0) + target.to_bytes(16, "big")
    body += bytes([1, 1]) + KERNEL_MAC  # source link-layer address option
    solicited_node = ip6("ff02::1:ff00:0") | (target & 0xFFFFFF)
    packet = bytearray(ipv6(src, solicited_node if dst is None else dst, body, 58, hop_limit))
    pseudo = packet[8:40] + struct.pack("!I3xB", len(body), 58)
    struct.pack_into("!H", packet, 42, reference_checksum(bytes(pseudo) + bytes(packet[40:])))
    return bytes(packet)


def nic6() -> VirtualNic:
    return VirtualNic(OWN, 16, TAP_MAC, address6=OWN6, prefix6_len=64)


def from_kernel(packet: bytes) -> bytes:
    return ethernet_frame(DEFAULT_GATEWAY_MAC, KERNEL_MAC, ETH_P_IPV6, packet)


# -- neighbour discovery -------------------------------------------------------------------------------------


def test_nic_answers_a_solicitation_for_a_peer_with_an_advertisement_of_the_gateway_mac() -> None:
    nic = nic6()
    result = nic.from_tap(from_kernel(solicitation(OWN6, PEER6)))
    assert isinstance(result, Reply)
    dst_mac, src_mac, ethertype, payload = parse_ethernet(result.frame)
    assert (dst_mac, src_mac, ethertype) == (KERNEL_MAC, DEFAULT_GATEWAY_MAC, ETH_P_IPV6)
    packet = bytes(payload)
    src, dst, total = ipv6_header(packet)
    assert (src, dst, total) == (PEER6, OWN6, len(packet))
    assert packet[6] == 58 and packet[7] == 255  # RFC 4861 §7.1.2: the kernel drops any other hop limit
    assert pseudo_checksum_ok(packet)
    kind, code, _, flags = struct.unpack_from("!BBHI", packet, 40)
    assert (kind, code) == (ND_NEIGHBOR_ADVERT, 0)
    assert flags == 0x60000000  # solicited and override, not a router
    assert int.from_bytes(packet[48:64], "big") == PEER6
    assert packet[64:66] == bytes([2, 1]) and packet[66:72] == DEFAULT_GATEWAY_MAC


def test_nic_answers_a_unicast_reachability_probe_too() -> None:
    """Neighbour unreachability detection (RFC 4861 §7.3.1) sends solicitations to the neighbour itself."""
    result = nic6().from_tap(from_kernel(solicitation(OWN6, PEER6, dst=PEER6)))
    assert isinstance(result, Reply)


def test_nic_learns_the_kernel_mac_from_a_solicitation() -> None:
    nic = VirtualNic(OWN, 16, b"\x02\x00\x00\x00\x00\x09", address6=OWN6)
    nic.from_tap(from_kernel(solicitation(OWN6, PEER6)))
    assert nic.tap_mac == KERNEL_MAC


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (solicitation(0, OWN6), "nd-duplicate-address-detection"),
        (solicitation(0, PEER6), "nd-duplicate-address-detection"),
        (solicitation(OWN6, OWN6), "nd-own-address"),
        (solicitation(OWN6, ip6("fd00:9::5")), "nd-not-subnet"),
        (solicitation(OWN6, ip6("fd00:1:2:3::")), "nd-not-subnet"),
        (solicitation(OWN6, PEER6, hop_limit=64), "malformed"),
        (ipv6(OWN6, ip6("ff02::2"), bytes([133, 0, 0, 0, 0, 0, 0, 0]), 58, 255), "multicast"),
        (ipv6(OWN6, OWN6, b"x" * 8), "own-address"),
        (ipv6(OWN6, ip6("fd00:9::5"), b"x" * 8), "not-subnet"),
        (ipv6(OWN6, ip6("fd00:1:2:3::"), b"x" * 8), "not-subnet"),
        (ipv6(OWN6, PEER6, b"x" * 8)[:-1], "malformed"),
    ],
)
def test_nic_ignores_and_counts_ipv6(packet: bytes, reason: str) -> None:
    nic = nic6()
    assert nic.from_tap(from_kernel(packet)) == Ignored(reason)
    assert nic.counters == {reason: 1}


def test_a_nic_without_an_ipv6_address_ignores_ipv6_as_before() -> None:
    nic = VirtualNic(OWN, 16, TAP_MAC)
    assert nic.from_tap(from_kernel(solicitation(OWN6, PEER6))) == Ignored("ipv6")


def test_nic_sends_subnet_unicast_ipv6_outbound_trimmed_of_padding() -> None:
    packet = ipv6(OWN6, PEER6, b"payload!")
    result = nic6().from_tap(from_kernel(packet + b"\x00" * 6))
    assert isinstance(result, Outbound)
    assert result.dst_ip == PEER6 and bytes(result.packet) == packet


def test_nic_to_tap_wraps_ipv6_for_the_kernel_and_refuses_others_packets() -> None:
    nic = nic6()
    packet = ipv6(PEER6, OWN6, b"for us")
    frame = nic.to_tap(packet + b"pad")
    assert frame == ethernet_frame(TAP_MAC, DEFAULT_GATEWAY_MAC, ETH_P_IPV6, packet)
    with pytest.raises(FrameError):
        nic.to_tap(ipv6(PEER6, PEER6, b"not for us"))
    with pytest.raises(FrameError):  # no IPv6 address: an IPv6 packet is nobody's here
        VirtualNic(OWN, 16, TAP_MAC).to_tap(packet)
    # IPv4 still works beside it.
    v4 = struct.pack("!BBHHHBBHII", 0x45, 0, 20, 0, 0, 64, 17, 0, OWN + 1, OWN)
    assert parse_ethernet(nic.to_tap(v4))[2] == ETH_P_IP


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("fd00:1::5/64", True),
        ("2001:db8:1::5/48", True),
        ("fe80::5/64", False),  # link-local
        ("ff02::5/64", False),  # multicast
        ("::ffff:10.0.0.5/96", False),  # IPv4-mapped
        ("fd00:1::/64", False),  # subnet-router anycast
        ("fd00:1::5/8", False),
        ("fd00:1::5/128", False),
    ],
)
def test_check_address6_takes_unicast_host_addresses_only(text: str, ok: bool) -> None:
    iface = ipaddress.IPv6Interface(text)
    if ok:
        check_address6(int(iface.ip), iface.network.prefixlen)
    else:
        with pytest.raises(ValueError):
            check_address6(int(iface.ip), iface.network.prefixlen)


@settings(max_examples=400)
@given(st.binary(max_size=120), st.integers(0, 2**128 - 1))
def test_nic_from_tap_of_any_ipv6_bytes_never_raises(body: bytes, dst: int) -> None:
    nic = nic6()
    for payload in (body, ipv6(OWN6, dst, body, 58, 255), solicitation(OWN6, dst)[: 40 + len(body) % 40]):
        result = nic.from_tap(from_kernel(payload))
        assert isinstance(result, (Reply, Outbound, Ignored))


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_parse_solicitation_returns_or_raises_frame_error(data: bytes) -> None:
    for packet in (data, ipv6(OWN6, PEER6, data, 58, 255)):
        try:
            parse_solicitation(packet)
        except FrameError:
            pass


def test_advertisement_refuses_a_bad_mac_as_misuse() -> None:
    with pytest.raises(ValueError):
        advertisement(parse_solicitation(solicitation(OWN6, PEER6)), b"\x01")  # type: ignore[arg-type]


# -- ICMPv6 errors --------------------------------------------------------------------------------------------


def test_icmpv6_unreachable_goes_back_to_the_sender_quoting_what_fits_the_minimum_mtu() -> None:
    original = ipv6(OWN6, PEER6, b"q" * 2000)
    error = icmpv6_unreachable(original, OWN6)
    src, dst, total = ipv6_header(error)
    assert (src, dst, total) == (OWN6, OWN6, IPV6_MIN_MTU)
    assert error[40:42] == bytes([1, 3])  # destination unreachable, address unreachable
    assert error[48:] == original[: IPV6_MIN_MTU - 48]
    assert pseudo_checksum_ok(error)
    small = ipv6(OWN6, PEER6, b"tiny")
    assert icmpv6_unreachable(small, OWN6)[48:] == small


def test_icmpv6_errors_are_not_sent_about_errors_or_multicast_or_unspecified_sources() -> None:
    assert icmpv6_error_allowed(ipv6(OWN6, PEER6, b"udp datagram"))
    assert icmpv6_error_allowed(ipv6(OWN6, PEER6, bytes([128, 0, 0, 0]), 58))  # echo request
    assert not icmpv6_error_allowed(ipv6(OWN6, PEER6, bytes([1, 3, 0, 0]), 58))  # an error
    assert not icmpv6_error_allowed(ipv6(OWN6, ip6("ff02::1"), b"x"))
    assert not icmpv6_error_allowed(ipv6(0, PEER6, b"x"))


# -- TCPv6 super-frames cut in software ----------------------------------------------------------------------


def tcp6_super_frame(payload: bytes, flags: int = 0x18) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1_000_000, 7, 5 << 4, flags, 512, 0, 0)
    return ipv6(OWN6, PEER6, tcp + payload, IPPROTO_TCP)


def test_segment_tcp_cuts_an_ipv6_super_frame_as_the_kernel_would() -> None:
    payload = bytes(range(256)) * 20  # 5,120 bytes
    header = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 74, 1400, ETH_HEADER_LEN + 40, 16)
    segments = segment_tcp(tcp6_super_frame(payload), header)
    assert [len(s) - 60 for s in segments] == [1400, 1400, 1400, 920]
    assert b"".join(s[60:] for s in segments) == payload
    for i, s in enumerate(segments):
        _, _, total = ipv6_header(s)
        assert total == len(s)
        assert pseudo_checksum_ok(s)
        assert int.from_bytes(s[44:48], "big") == 1_000_000 + 1400 * i
        assert s[53] == (0x18 if i == len(segments) - 1 else 0x10)  # PSH on the last only


def test_segment_tcp_refuses_an_ipv6_super_frame_with_an_extension_header() -> None:
    packet = bytearray(tcp6_super_frame(b"x" * 3000))
    packet[6] = 0  # hop-by-hop options
    header = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 74, 1400, ETH_HEADER_LEN + 40, 16)
    with pytest.raises(FrameError):
        segment_tcp(bytes(packet), header)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(48, 2000))
def test_segment_tcp_of_arbitrary_ipv6_bytes_raises_only_frame_error(data: bytes, mss: int) -> None:
    header = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 74, mss, ETH_HEADER_LEN + 40, 16)
    for packet in (data, ipv6(OWN6, PEER6, data, IPPROTO_TCP)):
        try:
            for s in segment_tcp(packet, header):
                assert pseudo_checksum_ok(s)
        except FrameError:
            pass


# -- addresses: derived from the key, or chosen ---------------------------------------------------------------


def test_a_prefix_gets_the_node_id_as_interface_id_and_a_host_address_stays() -> None:
    assert resolve_address6(PREFIX, 0x0123456789ABCDEF) == "fd00:1:2:3:123:4567:89ab:cdef/64"
    assert resolve_address6("fd00:1:2:3::5/64", 0x0123456789ABCDEF) == "fd00:1:2:3::5/64"
    assert resolve_address6("fd00:1::/48", 1) == "fd00:1::1/48"
    assert is_prefix6(PREFIX) and not is_prefix6("fd00:1:2:3::5/64")
    assert is_derived_address6(derived_address6(ip6("fd00:1:2:3::"), 77), 77)
    assert not is_derived_address6(ip6("fd00:1:2:3::5"), 77)


@pytest.mark.parametrize("text", ["fe80::/64", "fd00::/72", "fd00::/8", "fd00::/64x", "10.0.0.1/16"])
def test_bad_address6_settings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        interface6(text)


CONFIG = """
[node]
key = "node.key"
[xmpp]
jid = "a@example.test"
password = "pw"
room = "g@conference.example.test"
[vnic]
address = "10.254.0.1/16"
address6 = "{address6}"
[group]
{group}
"""


@pytest.mark.parametrize(
    ("address6", "group", "error"),
    [
        ("fd00:1:2:3::/64", "open = true", None),
        ("fd00:1:2:3::5/64", "open = true", None),
        ("fd00:1:2:3::/64", 'public_key = "{key}"', None),
        ("fd00:1:2:3::5/64", 'public_key = "{key}"', "in a group with certificates write the prefix"),
        ("fe80::/64", "open = true", "unique-local"),
    ],
)
def test_config_takes_address6_and_with_certificates_only_a_prefix(
    tmp_path: object, address6: str, group: str, error: str | None
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "node.toml"
    key = format_public_key(GroupKey.from_seed(bytes(32)).public_key) if "{key}" in group else ""
    path.write_text(CONFIG.format(address6=address6, group=group.format(key=key)))
    if error is None:
        assert load_config(path).vnic_address6 == address6
    else:
        with pytest.raises(ConfigError, match=error):
            load_config(path)


# -- IPv6 address records ---------------------------------------------------------------------------------------


def test_ipv6_record_round_trips_and_signs_its_family() -> None:
    identity = Identity.from_seed(bytes([5]) * 32)
    address = str(ipaddress.IPv6Address(derived_address6(ip6("fd00:1:2:3::"), identity.node_id)))
    record = make_record(identity, "room", address, 1000.0)
    assert decode_record(record.encode()) == record
    assert check_record(record, "room", 1001.0) is None
    assert decode_dht_value(encode_dht_value(address, record), Kind.DHT_VALUE6) == (address, record)
    assert decode_dht_value(encode_dht_value(address, None), Kind.DHT_VALUE6) == (address, None)
    assert value_kind(address) == Kind.DHT_VALUE6 and value_kind("10.254.0.1") == Kind.DHT_VALUE
    assert decode_address(ipaddress.IPv6Address(address).packed) == address
    with pytest.raises(DecodeError):  # a v4 answer carrying a v6 record
        decode_dht_value(encode_dht_value("10.254.0.1", record))
    with pytest.raises(DecodeError):
        decode_address(bytes(8))


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_ipv6_value_and_record_decoders_parse_or_raise_decode_error(data: bytes) -> None:
    for decode in (
        lambda b: decode_dht_value(b, Kind.DHT_VALUE6),
        decode_record,
        lambda b: decode_record(bytes([3]) + b),
    ):
        try:
            decode(data)
        except DecodeError:
            pass


def test_a_certificate_holder_may_publish_only_the_ipv6_address_derived_from_its_key() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=41, group_key=GroupKey.from_seed(bytes([41]) * 32), address6=PREFIX)
        try:
            for _ in range(3):
                await g.add_node()
            trust = g.nodes[0].trust
            assert trust is not None
            own = g.nodes[0].identity
            cert = trust.own()
            mine = g.vaddr6(0)
            assert trust.record_problem(mine, own.public_key, cert) is None
            assert trust.record_problem(g.vaddr6(1), own.public_key, cert) == (
                "IPv6 address not derived from the signer's key"
            )
            assert trust.record_problem("fd00:1:2:3::5", own.public_key, cert) is not None
        finally:
            await g.stop()

    asyncio.run(scenario())


# -- members reach each other over IPv6 (real nodes in memory) -------------------------------------------------


def test_members_reach_each_other_over_ipv6_through_the_dht_and_relays() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=42, address6=PREFIX)
        try:
            assert await g.form_ring(6, 30.0)
            pairs = [(a, b) for a in range(6) for b in range(6) if a != b]
            assert await g.reach(pairs, 20.0, v6=True) == []
            held = {address for n in g.nodes for address in n.dht.held()}
            assert {g.vaddr6(i) for i in range(6)} <= held and {vaddr(i) for i in range(6)} <= held
        finally:
            await g.stop()

    asyncio.run(scenario())


def test_the_python_path_hands_an_ipv6_flow_to_the_compiled_one_and_finds_it_again_by_its_address() -> None:
    """DataPath tells the compiled data path (overlay/fastpath.py set_flow) each IPv6 address it sent to on a link
    to its owner, as it does for IPv4, and DataPath.flow finds the same link and header for that address."""

    async def scenario() -> None:
        g = MemoryGroup(seed=45, address6=PREFIX)
        try:
            assert await g.form_ring(3, 30.0)
            assert await g.reach([(0, 1), (0, 2)], 20.0, v6=True) == []
            node = g.nodes[0]
            routes = {i: node.router.data_route(g.nodes[i].id) for i in (1, 2)}
            direct = [i for i, route in routes.items() if route is not None and route[0] == g.nodes[i].id]
            assert direct, f"node 0 routes to neither member directly: {routes}"
            i = direct[0]
            flows: list[tuple[int, int, bytes]] = []
            node.datapath.fast = SimpleNamespace(set_flow=lambda *flow: flows.append(flow))
            g.send6(0, i, b"over a link")
            address = int(ipaddress.IPv6Address(g.vaddr6(i)))
            assert await g.wait_for(lambda: bool(flows), 5.0)
            assert flows[0][:2] == (address, g.nodes[i].id)
            assert node.datapath.flow(address) == flows[0][1:]
        finally:
            g.nodes[0].datapath.fast = None
            await g.stop()

    asyncio.run(scenario())


def test_with_certificates_an_ipv6_source_not_derived_from_the_sender_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=43, group_key=GroupKey.from_seed(bytes([43]) * 32), address6=PREFIX)
        try:
            assert await g.form_ring(5, 30.0)
            assert await g.reach([(1, 4)], 15.0, v6=True) == []
            before = g.nodes[4].counters.get(SOURCE_DROP, 0)
            spoofed = [g.send6(1, 4, f"spoofed {k}".encode(), src=g.vaddr6(3)) for k in range(3)]
            spoofed.append(g.send6(1, 4, b"made up", src="fd00:1:2:3::5"))
            assert await g.wait_for(lambda: g.nodes[4].counters.get(SOURCE_DROP, 0) >= before + 4, 8.0)
            assert not any(g.received(4, p) for p in spoofed)
            honest = g.send6(1, 4, b"honest")
            assert await g.wait_for(lambda: g.received(4, honest), 5.0)
        finally:
            await g.stop()

    asyncio.run(scenario())


def test_a_packet_for_an_ipv6_address_nobody_owns_gets_an_icmpv6_error() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=44, address6=PREFIX)
        try:
            assert await g.form_ring(3, 30.0)
            nobody = "fd00:1:2:3::dead"
            packet = ipv6(ip6(g.vaddr6(0)), ip6(nobody), b"anyone?")
            g.taps[0].inject(from_kernel(packet))
            start = time.monotonic()

            def error_back() -> bool:
                return any(
                    f[12:14] == ETH_P_IPV6.to_bytes(2, "big") and f[54] == 1 and f[62:] == packet
                    for f in g.taps[0].written
                )

            assert await g.wait_for(error_back, 10.0), "no ICMPv6 address unreachable came back"
            assert time.monotonic() - start >= 4.0  # after the lookup timed out, not before
        finally:
            await g.stop()

    asyncio.run(scenario())
