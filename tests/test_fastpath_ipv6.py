"""IPv6 inside the VPN on the compiled data path (overlay/_fast.c): an Engine given the node's IPv6 address sends
IPv6 frames to members on their flows and delivers their IPv6 data, with the checks the Python path makes
(VirtualNic for what leaves, DataPath.deliver_from and VirtualNic.to_tap for what arrives), and passes up the
rest unchanged: neighbour discovery, multicast, its own and off-prefix addresses, sources it cannot vouch for.
Flows are keyed by the whole address, an IPv4 one mapped, so both families share one table. Engines between test
sockets on loopback and SOCK_SEQPACKET pairs standing in for TAPs, as in tests/test_fastpath.py."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay._fast import UP_HEADER, Engine, Keys
from overlay.fastpath import FastPath
from overlay.tap.frames import internet_checksum
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.chunks import CHUNK_HEADER
from overlay.wire import ROUTED_HEADER, decode_transport_header
from tests.test_fastpath import (
    A_ID,
    A_IP,
    ACK,
    B_ID,
    B_IP,
    C_ID,
    CHUNK,
    SYN,
    TAP_MAC,
    TIMEOUT,
    Node,
    PythonSide,
    Wire,
    deliver_queued,
    header,
    linked_pair,
    offload_pair,
    segments,
    session_pair,
    udp_datagram,
    without_id,
)

PREFIX = int(ipaddress.IPv6Address("fd00:1:2:3::"))
A6, B6, C6 = PREFIX | A_ID, PREFIX | B_ID, PREFIX | C_ID  # derived from the node IDs (overlay/ids.py)
ETH6 = DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x86\xdd"
DELIVERED6 = TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x86\xdd"  # what an Engine writes in front of an IPv6 packet
UP_FRAME, UP_DATAGRAM, UP_FLOW = 2, 1, 4


def ipv6(src: int, dst: int, payload: bytes, next_header: int = 17, length: int | None = None) -> bytes:
    plen = len(payload) if length is None else length
    fixed = struct.pack("!IHBB", 6 << 28, plen, next_header, 64)
    return fixed + src.to_bytes(16, "big") + dst.to_bytes(16, "big") + payload


def frame6(src: int, dst: int, payload: bytes = b"y" * 32, next_header: int = 17, vnet: bytes = b"") -> bytes:
    return vnet + ETH6 + ipv6(src, dst, payload, next_header)


def tcp6(src: int, dst: int, flags: int, port: int, payload: bytes = b"") -> bytes:
    return ETH6 + ipv6(src, dst, struct.pack("!HHIIBBHHH", port, 5201, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload, 6)


def opener() -> Keys:
    """The far end's Keys of session_pair(): what B's Python side would open A's datagrams with."""
    return Keys(bytes(range(100, 132)), bytes(range(32)))


@pytest.fixture
def pair6() -> Iterator[tuple[Node, Node, Wire, Wire, Keys, Keys]]:
    """A and B with IPv6 addresses, linked (A's index 11, B's 22), each with a flow to the other's IPv6 address."""
    with linked_pair(address6=(A6, B6)) as nodes:
        yield nodes


def nothing_on(wire: Wire, timeout: float = 0.1) -> bool:
    wire.sock.settimeout(timeout)
    try:
        wire.recv()
        return False
    except TimeoutError:
        return True
    finally:
        wire.sock.settimeout(TIMEOUT)


def test_an_ipv6_frame_crosses_sealed_as_the_python_path_would_and_arrives_as_an_ipv6_frame(pair6) -> None:  # type: ignore[no-untyped-def]
    a, b, wire_a, wire_b, _ka, _kb = pair6
    f = frame6(A6, B6)
    a.kernel.send(f)
    datagram = wire_b.recv()
    _, counter = decode_transport_header(datagram)
    assert opener().open(datagram, counter) == header(A_ID, B_ID) + f[14:]
    wire_a.send_to(b, datagram)
    assert b.kernel.recv(70000) == DELIVERED6 + f[14:]
    assert [m for m in a.up_messages() if m[0] != 3] == []  # nothing but activity notes went up
    assert [m for m in b.up_messages() if m[0] != 3] == []


def test_ipv6_frames_the_engine_must_not_send_go_up_unchanged(pair6) -> None:  # type: ignore[no-untyped-def]
    a, _b, _wire_a, wire_b, _ka, _kb = pair6
    solicitation = bytes([135, 0, 0, 0, 0, 0, 0, 0]) + B6.to_bytes(16, "big")  # a unicast reachability probe
    cases = [
        frame6(A6, B6, solicitation, next_header=58),  # neighbour discovery: the node answers it
        frame6(A6, int(ipaddress.IPv6Address("ff02::1"))),  # multicast
        frame6(A6, A6),  # our own address
        frame6(A6, int(ipaddress.IPv6Address("fd00:9::b2"))),  # off our prefix
        frame6(A6, PREFIX),  # the prefix's subnet-router anycast address: no member's
        ETH6 + ipv6(A6, B6, b"z" * 40, length=0),  # a jumbogram's zero payload length
        ETH6 + ipv6(A6, B6, b"z" * 40, length=41),  # longer than what is there
        ETH6 + ipv6(A6, B6, b"z" * 40)[:39],  # shorter than the fixed header
    ]
    for f in cases:
        a.kernel.send(f)
    assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == cases
    assert nothing_on(wire_b)


def test_an_engine_without_an_ipv6_address_passes_ipv6_up_and_does_not_deliver_it() -> None:
    a, b = Node(A_ID, A_IP), Node(B_ID, B_IP)
    wire_a, wire_b = Wire(), Wire()
    ka, kb = session_pair()
    try:
        a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)
        a.engine.set_flow(B6, B_ID, header(A_ID, B_ID), 30.0, 0)
        a.engine.start()
        b.engine.start()
        f = frame6(A6, B6)
        a.kernel.send(f)
        assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == [f]
        data = ka.seal(0x83, 22, header(A_ID, B_ID) + f[14:])
        wire_a.send_to(b, data)
        assert [m[1] for m in b.up_messages() if m[0] == UP_DATAGRAM] == [data]
        assert nothing_on(wire_b)
    finally:
        for x in (a, b):
            x.close()
        for w in (wire_a, wire_b):
            w.sock.close()


def test_ipv6_data_for_another_address_or_from_a_source_the_engine_cannot_vouch_for_goes_up() -> None:
    """With certificates an IPv6 source must be our prefix and the sender's node ID, from a sender whose
    certificate the node holds (DataPath.deliver_from); anything else goes up for Python to decide and count."""
    b = Node(B_ID, B_IP, check=True, address6=B6)
    wire_a = Wire()
    ka, kb = session_pair()
    b.engine.start()
    try:
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)  # no certificate seen yet
        honest = header(A_ID, B_ID) + frame6(A6, B6)[14:]
        first = ka.seal(0x83, 22, honest)
        wire_a.send_to(b, first)
        assert [m[1] for m in b.up_messages() if m[0] == UP_DATAGRAM] == [first]
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, A_IP)
        other_prefix = int(ipaddress.IPv6Address("fd00:9:9:9::")) | A_ID
        refused = [
            ka.seal(0x83, 22, header(A_ID, B_ID) + frame6(C6, B6)[14:]),  # another member's address
            ka.seal(0x83, 22, header(A_ID, B_ID) + frame6(other_prefix, B6)[14:]),  # A's ID, another prefix
            ka.seal(0x83, 22, header(A_ID, B_ID) + frame6(A6, C6)[14:]),  # for another address
        ]
        for d in refused:
            wire_a.send_to(b, d)
        assert [m[1] for m in b.up_messages() if m[0] == UP_DATAGRAM] == refused
        wire_a.send_to(b, ka.seal(0x83, 22, honest))
        assert b.kernel.recv(70000) == DELIVERED6 + honest[ROUTED_HEADER.size :]
    finally:
        b.close()
        wire_a.sock.close()


def test_without_certificates_any_ipv6_source_is_delivered_as_the_python_path_does(pair6) -> None:  # type: ignore[no-untyped-def]
    _a, b, wire_a, _wire_b, ka, _kb = pair6
    body = frame6(int(ipaddress.IPv6Address("fd00:1:2:3::77")), B6)[14:]
    wire_a.send_to(b, ka.seal(0x83, 22, header(A_ID, B_ID) + body))
    assert b.kernel.recv(70000) == DELIVERED6 + body


def test_an_ipv6_flow_is_checked_and_dropped_by_its_whole_address_and_shares_no_flow_with_ipv4() -> None:
    a = Node(A_ID, A_IP, address6=A6)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.set_flow(B6, B_ID, header(A_ID, B_ID), 0.5, 0)
    # An IPv6 address whose last 32 bits are B's IPv4 address: the same flow slot, another destination.
    twin = PREFIX | 0x77 << 32 | B_IP
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        time.sleep(0.6)
        a.kernel.send(frame6(A6, B6))
        assert wire_b.recv()  # sent on the old flow
        assert (UP_FLOW, B6.to_bytes(16, "big")) in a.up_messages(0.1)  # and Python asked, with all 16 bytes
        twin_frame = frame6(A6, twin)
        a.kernel.send(twin_frame)
        assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == [twin_frame]  # asks: no flow of its own
        a.engine.drop_flow(B6)
        f = frame6(A6, B6)
        a.kernel.send(f)
        assert [m[1] for m in a.up_messages() if m[0] == UP_FRAME] == [f]
        assert nothing_on(wire_b, 0.05)
    finally:
        a.close()
        wire_b.sock.close()


def test_flow_addresses_and_ipv6_settings_out_of_range_are_refused() -> None:
    a = Node(A_ID, A_IP, address6=A6)
    try:
        for bad, error in (("fd00::1", TypeError), (-1, OverflowError), (1 << 128, OverflowError)):
            with pytest.raises(error):
                a.engine.set_flow(bad, B_ID, header(A_ID, B_ID), 1.0, 0)  # type: ignore[arg-type]
            with pytest.raises(error):
                a.engine.drop_flow(bad)  # type: ignore[arg-type]
    finally:
        a.close()
    up, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for address6, prefix6 in ((b"\xfd" * 15, 64), (A6.to_bytes(16, "big"), 8), (A6.to_bytes(16, "big"), 128)):
            with pytest.raises(ValueError):
                Engine(
                    tap_fd=up.fileno(), vnet_hdr=False, udp_fd=up.fileno(), up_fd=engine_end.fileno(), gso=True,
                    chunk=CHUNK, node_id=A_ID, address=A_IP, prefix_len=24, check_sources=False,
                    address6=address6, prefix6_len=prefix6,
                )  # fmt: skip
    finally:
        up.close()
        engine_end.close()


def test_an_ipv6_tcp_super_frame_crosses_two_engines_whole_with_its_virtio_header() -> None:
    # TSO for TCPv6 (type 4): headers 14 + 40 + 20 bytes, the checksum at 54 + 16
    vnet = struct.pack("<BBHHHH", 1, 4, 74, 1400, 54, 16)
    part = CHUNK - CHUNK_HEADER.size
    with offload_pair(address6=(A6, B6)) as (a, b, _ka):
        for size in (1000, 20_000, 59_000, part * 30):
            f = vnet + tcp6(A6, B6, ACK, 40000, bytes(i % 251 for i in range(size)))
            a.kernel.send(f)
            assert b.kernel.recv(70000) == vnet + DELIVERED6 + f[10 + 14 :]
        assert not [m for m in a.up_messages(0.1) if m[0] == UP_FRAME]
        assert not [m for m in b.up_messages(0.1) if m[0] == UP_DATAGRAM]


def test_an_ipv6_tcp_connection_this_node_opens_keeps_to_the_lane_chosen_at_its_syn() -> None:
    a0 = Node(A_ID, A_IP, lane=0, address6=A6)
    a1 = Node(A_ID, A_IP, lane=1, first=a0.engine, address6=A6)
    wire_b = Wire()
    ka, _kb = session_pair()
    nodes = (a0, a1)
    for n in nodes:
        n.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
        n.engine.set_flow(B6, B_ID, header(A_ID, B_ID), 30.0, 0)
        n.engine.start()

    def lanes_of(*sends: tuple[Node, bytes]) -> list[int]:
        out = []
        for node, f in sends:
            node.kernel.send(f)
            out.append(decode_transport_header(wire_b.recv())[1] >> 56)
        return out

    try:
        opened = lanes_of(*((a0, tcp6(A6, B6, SYN, port)) for port in range(40000, 40004)))
        assert opened in ([0, 1, 0, 1], [1, 0, 1, 0])
        for port, lane in zip(range(40000, 40004), opened, strict=True):
            assert lanes_of((a0, tcp6(A6, B6, ACK, port)), (a1, tcp6(A6, B6, ACK, port))) == [lane] * 2
        # UDP keeps to the lane its first datagram took, whichever Engine reads it; GRE the reading Engine's.
        udp = lanes_of((a0, frame6(A6, B6)), (a1, frame6(A6, B6)), (a0, frame6(A6, B6)))
        assert udp in ([0] * 3, [1] * 3)
        gre = frame6(A6, B6, next_header=47)
        assert lanes_of((a0, gre), (a1, gre)) == [0, 1]
    finally:
        for n in nodes:
            n.close()
        wire_b.sock.close()


def test_the_driver_asks_the_python_path_about_an_ipv6_flow_by_its_whole_address() -> None:
    """UP_FLOW carries 16 bytes for an IPv6 address; the driver (overlay/fastpath.py) reads the address whole and
    keeps or drops the flow by what DataPath.flow answers."""
    tap, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    side = PythonSide(tap, udp, ("127.0.0.1", 9))
    side.vnic = SimpleNamespace(tap_mac=TAP_MAC, gateway_mac=DEFAULT_GATEWAY_MAC, address6=A6, prefix6_len=64)
    asked: list[int] = []
    side.flow = lambda address: asked.append(address)  # type: ignore[attr-defined]
    fast = FastPath(SimpleNamespace(links={}), side, None, side, lambda link: 0.0, A_ID, 24)  # type: ignore[arg-type]
    lane = fast._lanes[0]
    try:
        for address, width in ((B6, 16), (B_IP, 4)):
            lane.engine_end.send(bytes([UP_FLOW]) + bytes(UP_HEADER - 1) + address.to_bytes(width, "big"))
        fast._drain(lane)
        assert asked == [B6, B_IP]
    finally:
        for s in (tap, kernel, udp, lane.up, lane.engine_end):
            s.close()


# -- small IPv6 UDP datagrams joined into one TAP write (USO), as IPv4's in tests/test_fastpath.py ----------------


def udp6(
    src: int, dst: int, payload: bytes, *, dport: int = 5000, hops: int = 64, good: bool = True, zero: bool = False
) -> bytes:
    """An IPv6 UDP datagram with a right (or, good=False, wrong; zero=True, no) UDP checksum."""
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", 4000, dport, ulen, 0) + payload
    pseudo = src.to_bytes(16, "big") + dst.to_bytes(16, "big") + struct.pack("!IxxxB", ulen, 17)
    check = 0 if zero else (internet_checksum(pseudo + udp) or 0xFFFF) ^ (0 if good else 0x0101)
    fixed = struct.pack("!IHBB", 6 << 28 | 0x12345, ulen, 17, hops)
    return fixed + pseudo[:32] + udp[:6] + struct.pack("!H", check) + udp[8:]


def test_small_ipv6_udp_datagrams_of_one_flow_are_written_to_the_tap_as_one_uso_frame() -> None:
    """Ten IPv6 datagrams of one flow (the last shorter) leave in one TAP write, an IPv6 USO super-frame the
    kernel cuts back into the same ten, byte for byte (IPv6 has no ID to renumber)."""
    sent = [udp6(A6, B6, bytes([i]) * 41) for i in range(9)] + [udp6(A6, B6, b"end")]
    writes, counters = deliver_queued(sent, address6=B6)
    assert len(writes) == 1
    assert writes[0][10:24] == DELIVERED6
    assert struct.unpack("<H", writes[0][4:6])[0] == 41  # gso_size: the first datagram's payload
    assert segments(writes[0]) == sent
    assert counters["TAP: datagrams written joined"] == 10 and counters["TAP errors"] == 0


def test_ipv6_datagrams_that_may_not_join_are_written_as_they_came_and_families_never_mix() -> None:
    """A run breaks at the other family, at another hop limit, at a zero checksum (IPv6 requires one: the
    kernel drops it, alone) or a wrong one; those are written exactly as they came. Order is kept throughout."""
    sent = [
        udp6(A6, B6, b"a" * 30), udp6(A6, B6, b"b" * 30),  # a run of two
        udp_datagram(A_IP, B_IP, b"c" * 30), udp_datagram(A_IP, B_IP, b"d" * 30),  # IPv4: a run of its own
        udp6(A6, B6, b"e" * 30), udp6(A6, B6, b"f" * 30, zero=True),  # no checksum: neither joins
        udp6(A6, B6, b"g" * 30), udp6(A6, B6, b"h" * 30, hops=63),  # another hop limit
        udp6(A6, B6, b"i" * 30), udp6(A6, B6, b"j" * 30, good=False),
        udp6(A6, B6, b"k" * 30), udp6(A6, B6, b"l" * 30, dport=5001),
    ]  # fmt: skip
    writes, counters = deliver_queued(sent, address6=B6)
    got = [segments(w) for w in writes]
    assert [len(g) for g in got] == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [without_id(x) for g in got for x in g] == [without_id(x) for x in sent]
    alone = [w[10 + 14 :] for w, g in zip(writes, got, strict=True) if len(g) == 1]
    assert alone == sent[4:]  # byte for byte
    assert counters["TAP: datagrams written joined"] == 4


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 2), st.integers(1, 1400), st.sampled_from(["good", "bad", "zero"])),
        min_size=1,
        max_size=70,
    )
)
def test_any_mix_of_ipv4_and_ipv6_datagrams_arrives_whole_and_in_order(mix: list[tuple[bool, int, int, str]]) -> None:
    sent = [
        udp6(A6, B6, bytes([n % 251]) * size, dport=5000 + flow, good=check != "bad", zero=check == "zero")
        if six
        else udp_datagram(A_IP, B_IP, bytes([n % 251]) * size, dport=5000 + flow, good=check != "bad")
        for n, (six, flow, size, check) in enumerate(mix)
    ]
    writes, _ = deliver_queued(sent, address6=B6)
    assert [without_id(x) for w in writes for x in segments(w)] == [without_id(x) for x in sent]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.binary(max_size=200), min_size=1, max_size=6),
    st.sampled_from([A6, B6, C6, PREFIX, PREFIX | 1, int(ipaddress.IPv6Address("ff02::1"))]),
    st.integers(0, 255),
)
def test_any_ipv6_bytes_from_the_tap_or_a_peer_go_up_are_sent_or_dropped_and_the_engine_keeps_working(
    pair6,  # type: ignore[no-untyped-def]
    tails: list[bytes],
    address: int,
    next_header: int,
) -> None:
    a, b, wire_a, wire_b, ka, _kb = pair6
    for tail in tails:
        # Anything after an IPv6 Ethernet header; a fixed header to a chosen address with any payload length.
        a.kernel.send(ETH6 + tail)
        a.kernel.send(ETH6 + ipv6(A6, address, tail, next_header, length=len(tail) * 7 % 300))
        wire_a.send_to(b, ka.seal(0x83, 22, header(A_ID, B_ID) + ipv6(address, B6, tail, next_header)))
        wire_a.send_to(b, ka.seal(0x83, 22, header(A_ID, B_ID) + b"\x60" + tail))
    b.kernel.settimeout(0.05)
    wire_b.sock.settimeout(0.05)
    for sock in (b.kernel, wire_b.sock):
        try:
            while True:
                sock.recv(70000)  # whatever was valid enough to cross
        except TimeoutError:
            pass
    b.kernel.settimeout(TIMEOUT)
    wire_b.sock.settimeout(TIMEOUT)
    f = frame6(A6, B6, b"still alive")
    a.kernel.send(f)
    wire_a.send_to(b, wire_b.recv())
    assert b.kernel.recv(70000) == DELIVERED6 + f[14:]
