"""SocialVPN on the compiled data path (overlay/_fast.c with `social`, overlay/social/datapath.py): a social Engine
rewrites each packet our kernel sends a friend device into the device's view of the addresses exactly as
FriendNat.outbound does (overlay/social/translate.py, the reference here), delivers DATA from a device only from
the address we gave it and to ours (FriendNat.inbound), relays nothing, and passes up what Python translates or
checks itself: fragments, ICMP errors, other protocols, other sources. Engines between test sockets on loopback
and SOCK_SEQPACKET pairs standing in for TAPs, as in tests/test_fastpath.py."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.social.datapath import DATA_HEADER, SocialPath
from overlay.social.translate import FriendDevice, FriendNat, translate
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.wire import LinkMsg, decode_transport_header, encode_relay
from tests.test_fastpath import A_ID, B_ID, C_ID, TAP_MAC, Node, Wire, header, session_pair
from tests.test_fastpath_ipv6 import nothing_on, opener
from tests.test_social_translate import (
    GRE,
    MF,
    TCP,
    UDP,
    build,
    checksum_problems,
    icmp_error,
    ip,
    ip_options,
    ipv4_packet,
    payloads,
    pseudo_header,
    udp_datagram,
)
from tests.test_tap_frames import reference_checksum

OURS = ip("172.31.0.1")  # our TAP address, /16
LOCAL_B = ip("172.31.4.9")  # where we placed B's device
VIEW = ip("10.9.0.33")  # where B's device placed us
REMOTE_B = ip("10.9.0.1")  # B's own TAP address
ETH4 = DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00"
DELIVERED4 = TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00"
UP_FRAME, UP_DATAGRAM = 2, 1


@pytest.fixture
def social() -> Iterator[tuple[Node, Wire, Wire]]:
    """Our social Engine, linked to B's device (its sessions' far end at wire_b; our index 11, B's 22) with the
    address we gave it as the link's source, and the flow to that address; and C's device, linked too."""
    a = Node(A_ID, OURS, check=True, social=True, prefix_len=16)
    wire_b, wire_c = Wire(), Wire()
    ka, _ = session_pair()
    kc, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, LOCAL_B)
    a.engine.set_link(C_ID, kc, 33, 12, wire_c.endpoint, 0, True, ip("172.31.7.7"))
    a.engine.set_flow(LOCAL_B, B_ID, DATA_HEADER, 30.0, 0, VIEW, REMOTE_B)
    a.engine.start()
    yield a, wire_b, wire_c
    a.close()
    for w in (wire_b, wire_c):
        w.sock.close()


def sent_plain(wire: Wire) -> bytes:
    datagram = wire.recv()
    _, counter = decode_transport_header(datagram)
    return opener().open(datagram, counter)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["tcp", "udp", "udp-no-checksum", "icmp-echo"]), payloads, ip_options, st.booleans())
def test_a_packet_to_a_friend_device_leaves_rewritten_exactly_as_the_python_path_translates_it(
    social,  # type: ignore[no-untyped-def]
    shape: str,
    payload: bytes,
    options: bytes,
    dont_fragment: bool,
) -> None:
    a, wire_b, _ = social
    packet = bytearray(build(shape, OURS, LOCAL_B, payload, options))
    if dont_fragment:  # DF changes the header's checksum; still no fragment
        packet[6] |= 0x40
        packet[10:12] = b"\x00\x00"
        ihl = (packet[0] & 15) * 4
        packet[10:12] = reference_checksum(bytes(packet[:ihl])).to_bytes(2, "big")
    a.kernel.send(ETH4 + bytes(packet))
    out = sent_plain(wire_b)
    assert out == DATA_HEADER + translate(bytes(packet), VIEW, REMOTE_B)
    assert checksum_problems(out[1:]) == []


def test_a_udp_checksum_that_computes_to_zero_leaves_as_all_ones(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b, _ = social

    def translated_sum(word: int) -> int:  # as tests/test_social_translate.py: after the rewrite, a sum of -0
        segment = udp_datagram(VIEW, REMOTE_B, b"ab" + word.to_bytes(2, "big"), checksum=False)
        return 0xFFFF - reference_checksum(pseudo_header(VIEW, REMOTE_B, UDP, len(segment)) + segment)

    word = (0xFFFF - translated_sum(0)) % 0xFFFF
    packet = ipv4_packet(OURS, LOCAL_B, UDP, udp_datagram(OURS, LOCAL_B, b"ab" + word.to_bytes(2, "big")))
    a.kernel.send(ETH4 + packet)
    out = sent_plain(wire_b)
    assert out[1 + 20 + 6 : 1 + 20 + 8] == b"\xff\xff"
    assert out == DATA_HEADER + translate(packet, VIEW, REMOTE_B)


def test_what_the_python_path_translates_or_drops_goes_up_unchanged(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b, _ = social
    tcp = build("tcp", OURS, LOCAL_B, b"x" * 40)
    cases = [
        build("dccp", OURS, LOCAL_B, b"d"),  # a pseudo-header checksum the Engine does not know
        build("gre", OURS, LOCAL_B, b"g" * 8),  # another protocol
        ipv4_packet(OURS, LOCAL_B, TCP, tcp[20:48], flags_frag=MF),  # a first fragment
        ipv4_packet(OURS, LOCAL_B, TCP, tcp[48:], flags_frag=3),  # a later one
        icmp_error(OURS, LOCAL_B, build("udp", LOCAL_B, OURS, b"u")),  # its quote is rewritten and checked
        build("tcp", ip("172.31.0.99"), LOCAL_B, b"s"),  # not from our address
        build("tcp", OURS, LOCAL_B, b"")[:38],  # cut inside the TCP header
    ]
    frames = [ETH4 + c for c in cases]
    for f in frames:
        a.kernel.send(f)
    assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == frames
    assert nothing_on(wire_b)
    assert GRE == cases[1][9]


def test_data_from_a_friend_device_is_delivered_only_from_its_address_to_ours(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b, wire_c = social
    kb = opener()  # B's end of the session our link to B holds

    def from_b(message: bytes) -> bytes:
        datagram = kb.seal(0x83, 11, message)
        wire_b.send_to(a, datagram)
        return datagram

    good = build("tcp", LOCAL_B, OURS, b"hello")
    refused = [
        from_b(DATA_HEADER + build("tcp", ip("172.31.7.7"), OURS, b"spoofed")),  # C's address
        from_b(DATA_HEADER + build("tcp", LOCAL_B, ip("172.31.0.2"), b"elsewhere")),  # not for us
        from_b(DATA_HEADER + icmp_error(LOCAL_B, OURS, build("udp", OURS, ip("172.31.7.7"), b"q"))),  # Python checks
        from_b(header(B_ID, A_ID) + build("tcp", LOCAL_B, OURS, b"routed")),  # a group's data: not between friends
        from_b(encode_relay(LinkMsg.RELAY, C_ID, kb.seal(0x83, 33, b"\x01" + bytes(8)))),  # friends relay nothing
        from_b(b"\x12" + bytes(8)),  # PLACES: Python's
    ]
    assert [m[1] for m in a.up_messages() if m[0] == UP_DATAGRAM] == refused
    assert nothing_on(wire_c)
    from_b(DATA_HEADER + good)
    assert a.kernel.recv(70000) == DELIVERED4 + good


def test_a_device_whose_address_is_not_known_yet_has_its_data_go_up(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b, _ = social
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    datagram = opener().seal(0x83, 11, DATA_HEADER + build("udp", LOCAL_B, OURS, b"early"))
    wire_b.send_to(a, datagram)
    assert [m[1] for m in a.up_messages() if m[0] == UP_DATAGRAM] == [datagram]


def test_flows_and_engines_of_the_wrong_kind_are_refused() -> None:
    social = Node(A_ID, OURS, check=True, social=True, prefix_len=16)
    group = Node(B_ID, ip("10.9.0.2"))
    try:
        for bad in ((header(A_ID, B_ID), 30.0, 0), (DATA_HEADER, 30.0, 0), (DATA_HEADER, 30.0, 0, VIEW, 0)):
            with pytest.raises(ValueError):
                social.engine.set_flow(LOCAL_B, B_ID, *bad)  # type: ignore[arg-type]
        for bad in ((DATA_HEADER, 30.0, 0, VIEW, REMOTE_B), (header(B_ID, A_ID), 30.0, 0, VIEW, REMOTE_B)):
            with pytest.raises(ValueError):
                group.engine.set_flow(LOCAL_B, A_ID, *bad)  # type: ignore[arg-type]
    finally:
        social.close()
        group.close()
    with pytest.raises(ValueError):
        Node(A_ID, OURS, check=False, social=True)  # a social Engine checks every source


def test_the_social_path_gives_each_device_its_flow_and_source_and_nothing_else() -> None:
    nat = FriendNat(OURS)
    devices = {"bob@x/pc": SimpleNamespace(peer_id=B_ID, local=LOCAL_B)}
    links: dict[int, object] = {B_ID: object()}
    node = SimpleNamespace(
        tap=None, vnic=None, address=OURS, nat=nat, devices=devices, links=SimpleNamespace(links=links),
        device_of={B_ID: "bob@x/pc"}.get,
    )  # fmt: skip
    path = SocialPath(node)  # type: ignore[arg-type]
    assert path.source_of(B_ID) is None and path.flow(LOCAL_B) is None  # its places have not come: Python's
    nat.set_friend("bob@x/pc", FriendDevice(LOCAL_B, REMOTE_B, VIEW))
    assert path.flow(LOCAL_B) == (B_ID, DATA_HEADER, (VIEW, REMOTE_B))
    assert path.flow(ip("172.31.7.7")) is None
    assert path.source_of(B_ID) == LOCAL_B and path.source_of(C_ID) is None
    del links[B_ID]
    assert path.flow(LOCAL_B) is None  # no link: the Python path drops and counts it


def test_the_engine_keeps_working_after_any_bytes_from_a_friend_device(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b, _ = social
    kb = opener()

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=120))
    def junk(body: bytes) -> None:
        wire_b.send_to(a, kb.seal(0x83, 11, DATA_HEADER + body))
        wire_b.send_to(a, kb.seal(0x83, 11, DATA_HEADER + struct.pack("!BBH", 0x45, 0, 20 + len(body)) + body))

    junk()
    a.up_messages(0.1)
    a.kernel.settimeout(0.05)
    try:
        while True:
            a.kernel.recv(70000)
    except TimeoutError:
        pass
    a.kernel.settimeout(2.0)
    good = build("udp", LOCAL_B, OURS, b"still alive")
    wire_b.send_to(a, kb.seal(0x83, 11, DATA_HEADER + good))
    assert a.kernel.recv(70000) == DELIVERED4 + good
