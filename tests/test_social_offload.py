"""SocialVPN data with TAP offload (overlay/social/offload.py, the social Engine's DATA_GSO in overlay/_fast.c).

A social node's TAP with offload hands it TCP super-frames and packets whose checksum is left to complete. The
Engine rewrites them whole into the friend device's view; the reference is what the Python path does to the
packets a NIC would have cut from them (translate() of each segment): the friend's kernel, cutting or completing
the rewritten frame, must get exactly those bytes. A friend's DATA_GSO reaches our kernel only with the offload
work a rewrite carries. Engines between test sockets and SOCK_SEQPACKET pairs standing in for TAPs, as in
tests/test_fastpath.py; SocialNode's own handling with an in-memory TAP.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.probes import FragmentProbes
from overlay.social import offload
from overlay.social.datapath import DATA_HEADER, SocialPath
from overlay.social.node import SocialNode
from overlay.social.translate import FriendDevice, FriendNat, ToFriend, translate
from overlay.tap.device import MemoryTap
from overlay.tap.frames import (
    ZERO_VNET_HDR,
    FrameError,
    complete_checksum,
    parse_vnet_header,
    segment_tcp,
)
from overlay.tap.vnic import VirtualNic
from overlay.wire import LinkMsg, encode_ping, encode_probe
from tests.test_fastpath import A_ID, B_ID, TAP_MAC, Node, Wire, session_pair
from tests.test_fastpath_ipv6 import nothing_on, opener
from tests.test_fastpath_social import (
    DELIVERED4,
    ETH4,
    LOCAL_B,
    OURS,
    REMOTE_B,
    UP_DATAGRAM,
    UP_FRAME,
    VIEW,
    sent_plain,
)
from tests.test_social_translate import ICMP, TCP, UDP, ip, ipv4_packet, pseudo_header
from tests.test_tap_frames import reference_checksum

DATA_GSO = bytes([LinkMsg.DATA_GSO])
NEEDS_CSUM, DATA_VALID, GSO_TCPV4 = 1, 2, 1


def vnet(flags: int, gso_type: int, gso_size: int, start: int, offset: int, hdr_len: int = 14 + 40) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, start, offset)


def partial(src: int, dst: int, protocol: int, payload: bytes, mss: int = 0) -> tuple[bytes, bytes]:
    """(virtio header, IPv4 packet) as a kernel with offload hands them to the TAP: the transport checksum holds
    the pseudo-header's sum (not inverted) over the whole length; with `mss`, a TCP super-frame (TSO)."""
    if protocol == TCP:
        segment = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0) + payload
        at = 16
    else:
        segment = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
        at = 6
    field = 0xFFFF - reference_checksum(pseudo_header(src, dst, protocol, len(segment)))
    segment = segment[:at] + field.to_bytes(2, "big") + segment[at + 2 :]
    packet = ipv4_packet(src, dst, protocol, segment, flags_frag=0x4000)
    return vnet(NEEDS_CSUM, GSO_TCPV4 if mss else 0, mss, 14 + 20, at, 14 + len(packet) - len(payload)), packet


def cut(head: bytes, packet: bytes) -> list[bytes]:
    """What the receiving kernel makes of a frame with offload work: its segments, or the completed packet."""
    offload_header = parse_vnet_header(head, 14 + len(packet))
    return segment_tcp(packet, offload_header) if offload_header.is_gso else [complete_checksum(packet, offload_header)]


@pytest.fixture
def social() -> Iterator[tuple[Node, Wire]]:
    """Our social Engine with an offload TAP, linked to B's device (far end at wire_b; our index 11, B's 22; 60 KB
    datagrams cross: big_ok), the address we gave it as the link's source, and the flow to it."""
    a = Node(A_ID, OURS, vnet=True, check=True, social=True, prefix_len=16)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, LOCAL_B)
    a.engine.set_flow(LOCAL_B, B_ID, DATA_HEADER, 30.0, 0, VIEW, REMOTE_B)
    a.engine.start()
    yield a, wire_b
    a.close()
    wire_b.sock.close()


# -- from our kernel to a friend -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=9000), st.integers(48, 1460))
def test_a_tcp_super_frame_leaves_whole_and_cuts_into_the_python_paths_translated_segments(
    social,  # type: ignore[no-untyped-def]
    payload: bytes,
    mss: int,
) -> None:
    a, wire_b = social
    head, packet = partial(OURS, LOCAL_B, TCP, payload, mss)
    a.kernel.send(head + ETH4 + packet)
    out = sent_plain(wire_b)
    assert out[:1] == DATA_GSO and out[1:11] == head
    rewritten = out[11:]
    # What the friend's own kernel would have written in the field, for the addresses it sees.
    tcp_len = len(rewritten) - 20
    assert int.from_bytes(rewritten[36:38], "big") == 0xFFFF - reference_checksum(
        pseudo_header(VIEW, REMOTE_B, TCP, tcp_len)
    )
    assert cut(head, rewritten) == [translate(s, VIEW, REMOTE_B) for s in cut(head, packet)]


@pytest.mark.parametrize("protocol", [TCP, UDP], ids=["tcp", "udp"])
def test_a_checksum_left_to_complete_is_rewritten_so_that_completing_it_gives_the_translated_packet(
    social,  # type: ignore[no-untyped-def]
    protocol: int,
) -> None:
    a, wire_b = social
    for payload in (b"", b"x", b"hello world" * 50):
        head, packet = partial(OURS, LOCAL_B, protocol, payload)
        a.kernel.send(head + ETH4 + packet)
        out = sent_plain(wire_b)
        assert out[:11] == DATA_GSO + head
        assert cut(head, out[11:]) == [translate(complete_checksum(packet, parse_vnet_header(head, 14 + len(packet))),
                                                 VIEW, REMOTE_B)]  # fmt: skip


def test_a_frame_whose_checksum_is_only_marked_verified_leaves_as_data(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b = social
    packet = ipv4_packet(OURS, LOCAL_B, UDP, struct.pack("!HHHH", 1, 2, 8, 0))
    a.kernel.send(vnet(DATA_VALID, 0, 0, 0, 0, 0) + ETH4 + packet)
    assert sent_plain(wire_b) == DATA_HEADER + translate(packet, VIEW, REMOTE_B)


def test_offload_work_a_rewrite_does_not_carry_goes_up_unchanged(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b = social
    head, packet = partial(OURS, LOCAL_B, TCP, b"y" * 3000, 1000)
    _, upacket = partial(OURS, LOCAL_B, UDP, b"u" * 100)
    icmp = ipv4_packet(OURS, LOCAL_B, ICMP, bytes([8, 0, 0, 0, 0, 1, 0, 1]))
    frames = [
        vnet(NEEDS_CSUM, GSO_TCPV4, 1000, 14 + 20, 18) + ETH4 + packet,  # the checksum somewhere else
        vnet(NEEDS_CSUM, GSO_TCPV4, 100, 14 + 20, 6) + ETH4 + upacket,  # TCP segmentation of UDP
        vnet(NEEDS_CSUM, 0, 0, 14 + 20, 2) + ETH4 + icmp,  # ICMP's checksum has no pseudo-header
        vnet(NEEDS_CSUM | DATA_VALID, 0, 0, 14 + 20, 6) + ETH4 + upacket,  # flags a rewrite does not keep
    ]
    for f in frames:
        a.kernel.send(f)
    assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == frames
    assert nothing_on(wire_b)
    # A link the fragment probe has not proven gets no super-frame: it goes up, for Python to cut.
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, False, LOCAL_B)
    a.kernel.send(head + ETH4 + packet)
    assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == [head + ETH4 + packet]


# -- from a friend to our kernel -------------------------------------------------------------------------------


def test_a_friends_super_frame_is_delivered_whole_with_its_header_and_bad_ones_go_up(social) -> None:  # type: ignore[no-untyped-def]
    a, wire_b = social
    kb = opener()

    def from_b(message: bytes) -> bytes:
        datagram = kb.seal(0x83, 11, message)
        wire_b.send_to(a, datagram)
        return datagram

    head, packet = partial(LOCAL_B, OURS, TCP, b"z" * 4000, 1200)
    _, udp_packet = partial(LOCAL_B, OURS, UDP, b"u" * 80)
    _, spoofed = partial(ip("172.31.7.7"), OURS, TCP, b"s" * 3000, 1200)
    _, elsewhere = partial(LOCAL_B, ip("172.31.0.2"), TCP, b"e" * 3000, 1200)
    refused = [
        from_b(DATA_GSO + head + spoofed),  # not from the device's address
        from_b(DATA_GSO + head + elsewhere),  # not to ours
        from_b(DATA_GSO + vnet(NEEDS_CSUM, GSO_TCPV4, 1200, 14 + 20, 10) + packet),  # checksum elsewhere
        from_b(DATA_GSO + vnet(NEEDS_CSUM, GSO_TCPV4, 60, 14 + 20, 6) + udp_packet),  # UDP cut as TCP
        from_b(DATA_GSO + vnet(0, GSO_TCPV4, 1200, 14 + 20, 16) + packet),  # segmentation without a checksum
        from_b(DATA_GSO + vnet(NEEDS_CSUM, 3, 1200, 14 + 20, 16) + packet),  # UFO
        from_b(DATA_GSO + head + packet[:30]),  # cut short
    ]
    assert [m[1] for m in a.up_messages() if m[0] == UP_DATAGRAM] == refused
    from_b(DATA_GSO + head + packet)
    assert a.kernel.recv(70000) == head + DELIVERED4 + packet


def test_an_engine_whose_tap_has_no_offload_passes_a_friends_super_frame_up() -> None:
    a = Node(A_ID, OURS, check=True, social=True, prefix_len=16)
    wire_b = Wire()
    try:
        ka, _ = session_pair()
        a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, LOCAL_B)
        a.engine.start()
        head, packet = partial(LOCAL_B, OURS, TCP, b"z" * 4000, 1200)
        datagram = opener().seal(0x83, 11, DATA_GSO + head + packet)
        wire_b.send_to(a, datagram)
        assert [m[1] for m in a.up_messages() if m[0] == UP_DATAGRAM] == [datagram]
    finally:
        a.close()
        wire_b.sock.close()


# -- the Python path: overlay/social/offload.py, SocialPath, SocialNode ----------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=80))
def test_check_refuses_any_header_a_friend_may_not_send_with_a_frame_error(head: bytes, tail: bytes) -> None:
    _, packet = partial(LOCAL_B, OURS, TCP, tail, 0)
    try:
        checked = offload.check(head, packet)
    except FrameError:
        return
    assert checked.flags == NEEDS_CSUM and checked.csum_start == 14 + 20 and checked.csum_offset == 16


def social_path(vnet_hdr: bool) -> tuple[SocialPath, MemoryTap, dict[str, int], list[tuple[ToFriend, int]]]:
    """A social node's data path without its XMPP or links: B's device placed and known (FriendNat); what it
    would send to B collected, and its counters."""
    tap = MemoryTap(mac=TAP_MAC, vnet_hdr=vnet_hdr)
    counters: dict[str, int] = {}
    nat = FriendNat(OURS)
    nat.set_friend("bob@x/pc", FriendDevice(LOCAL_B, REMOTE_B, VIEW))
    node = SimpleNamespace(
        tap=tap, vnic=VirtualNic(OURS, 16, TAP_MAC), address=OURS, nat=nat, dns=ip("172.31.255.254"),
        count=lambda what: counters.__setitem__(what, counters.get(what, 0) + 1),
    )  # fmt: skip
    path = SocialPath(node)  # type: ignore[arg-type]
    sent: list[tuple[ToFriend, int]] = []
    path.send_data = lambda out, local: sent.append((out, local))  # type: ignore[method-assign]
    return path, tap, counters, sent


def test_the_python_path_cuts_what_comes_up_and_translates_each_packet() -> None:
    path, _, counters, sent = social_path(vnet_hdr=True)
    head, packet = partial(OURS, LOCAL_B, TCP, b"q" * 2500, 1000)
    path.from_tap([head + ETH4 + packet])
    assert [out.packet for out, _ in sent] == [translate(s, VIEW, REMOTE_B) for s in cut(head, packet)]
    path.from_tap([vnet(NEEDS_CSUM, GSO_TCPV4, 10, 14 + 20, 16) + ETH4 + packet])  # a segment size no one cuts
    assert counters == {"drop: offload work that cannot be done": 1} and len(sent) == 3


@pytest.mark.parametrize("vnet_hdr", [True, False], ids=["offload-tap", "plain-tap"])
def test_a_friends_super_frame_reaches_our_kernel_whole_or_cut_as_the_tap_takes_it(vnet_hdr: bool) -> None:
    path, tap, counters, _ = social_path(vnet_hdr)
    bob = SimpleNamespace(jid="bob@x/pc")
    head, packet = partial(LOCAL_B, OURS, TCP, b"w" * 3000, 1400)
    path.on_data(bob, DATA_GSO + head + packet)  # type: ignore[arg-type]
    path.on_data(bob, DATA_GSO + vnet(NEEDS_CSUM, GSO_TCPV4, 1400, 14 + 20, 6) + packet)  # type: ignore[arg-type]
    path.on_data(bob, DATA_HEADER + cut(head, packet)[0])  # type: ignore[arg-type]
    eth = DELIVERED4
    if vnet_hdr:
        assert tap.written == [head + eth + packet, ZERO_VNET_HDR + eth + cut(head, packet)[0]]
    else:
        assert tap.written == [eth + s for s in cut(head, packet)] + [eth + cut(head, packet)[0]]
    assert counters == {"drop: data with an offload header a friend may not send": 1}


def test_social_links_answer_probes_and_a_probed_link_is_marked_to_take_super_frames() -> None:
    node = object.__new__(SocialNode)
    node.counters = {}
    sent: list[bytes] = []
    changed: list[int] = []
    link = SimpleNamespace(peer_id=B_ID, send=sent.append, fragments_ok=False, describe_endpoint=lambda: "udp 1")
    node._by_peer = {B_ID: "bob@x/pc"}
    node.devices = {"bob@x/pc": SimpleNamespace(jid="bob@x/pc", last_heard=0.0)}
    node.clock = lambda: 5.0
    links = SimpleNamespace(links={B_ID: link}, on_change=changed.append)
    node.probes = FragmentProbes(links, random.Random(1), node.count)  # type: ignore[arg-type]
    node._on_message(link, encode_probe(77))  # type: ignore[arg-type]
    assert sent == [encode_ping(LinkMsg.PROBE_ACK, 77)]
    node.probes.probe(link, 5.0)  # type: ignore[arg-type]
    token = int.from_bytes(sent[-1][1:9], "big")
    node._on_message(link, encode_ping(LinkMsg.PROBE_ACK, token))  # type: ignore[arg-type]
    assert link.fragments_ok and changed == [B_ID]


def test_the_engine_keeps_working_after_any_data_gso_bytes_from_a_friend(social) -> None:  # type: ignore[no-untyped-def]
    """Hostile DATA_GSO: any virtio header in front of any packet (addressed right, so the header is what is
    judged) reaches our kernel only as a rewrite's offload work would, or goes up; the Engine keeps working."""
    a, wire_b = social
    kb = opener()
    written: list[bytes] = []

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=10, max_size=10), st.sampled_from([TCP, UDP, ICMP]), st.binary(max_size=200))
    def junk(head: bytes, protocol: int, body: bytes) -> None:
        packet = ipv4_packet(LOCAL_B, OURS, protocol, body)
        wire_b.send_to(a, kb.seal(0x83, 11, DATA_GSO + head + packet))
        wire_b.send_to(a, kb.seal(0x83, 11, DATA_GSO + head + body))

    junk()
    a.up_messages(0.1)
    a.kernel.settimeout(0.05)
    try:
        while True:
            written.append(a.kernel.recv(70000))
    except TimeoutError:
        pass
    for w in written:  # what crossed carried a header a rewrite could have made
        offload.check(w[:10], w[10 + 14 :])
    a.kernel.settimeout(2.0)
    head, packet = partial(LOCAL_B, OURS, TCP, b"still alive" * 300, 1000)
    wire_b.send_to(a, kb.seal(0x83, 11, DATA_GSO + head + packet))
    assert a.kernel.recv(70000) == head + DELIVERED4 + packet
