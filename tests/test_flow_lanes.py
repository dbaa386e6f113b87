"""The lane of a UDP flow or ping a node sends (overlay/_lanes.h flow_lane, docs/datapath.md Lanes): it
takes the least busy lane at its first packet, in turn among lanes equally idle, and keeps it whichever Engine
reads its later packets; another flow of the same slot does not take a live flow's slot, and an echo reply, an
ICMP error or another protocol stays in the reading Engine's lane. Two Engines of one node, on socketpairs."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.tap.frames import ipv4_packet
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.wire import decode_transport_header
from tests.test_fastpath import (
    A_ID,
    A_IP,
    B_ID,
    B_IP,
    C_ID,
    C_IP,
    TAP_MAC,
    TIMEOUT,
    Node,
    Wire,
    frame,
    header,
    session_pair,
)
from tests.test_fastpath_ipv6 import A6, B6

CONN_BITS = 10  # overlay/_engine.h: the flow table's slots are 2^CONN_BITS
FLOW_LIVE_S = 240 * 2**24 / 1e9  # FLOW_LIVE stamps of 2^24 ns: how long a quiet flow keeps its slot (~4.03 s)
PLAIN = bytes(10)  # a frame's virtio_net_hdr without offload


def icmp(kind: int, ident: int, src: int = A_IP, dst: int = B_IP) -> bytes:
    message = struct.pack("!BBHHH", kind, 0, 0, ident, 1) + bytes(56)
    return PLAIN + DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00" + ipv4_packet(src, dst, 1, 64, message)


def udp(port: int, dst: int = B_IP) -> bytes:
    return frame(A_IP, dst, struct.pack("!HHHH", port, 53, 40, 0) + bytes(32), vnet=PLAIN)


def slot_of_udp(port: int, src: int = A_IP, dst: int = B_IP) -> int:
    """The flow table's slot of a UDP flow (flow_of: its addresses, protocol and ports through splitmix64's
    finaliser)."""
    m = (1 << 64) - 1
    key = ((src << 32 | dst) ^ ((17 << 48 | port << 16 | 53) * 0x9E3779B97F4A7C15 & m)) & m
    key = (key ^ key >> 30) * 0xBF58476D1CE4E5B9 & m
    key = (key ^ key >> 27) * 0x94D049BB133111EB & m
    return (key ^ key >> 31) >> (64 - CONN_BITS)


class Lanes:
    """Node A's two Engines (lanes 0 and 1, sharing their LaneShare) with links to B and C that take lanes."""

    def __init__(self) -> None:
        self.a0 = Node(A_ID, A_IP, vnet=True, lane=0, address6=A6)
        self.a1 = Node(A_ID, A_IP, vnet=True, lane=1, first=self.a0.engine, address6=A6)
        self.wire_b, self.wire_c = Wire(), Wire()
        kb, _ = session_pair()
        kc, _ = session_pair()
        for n in (self.a0, self.a1):
            n.engine.set_link(B_ID, kb, 11, 22, self.wire_b.endpoint, 0, True, -1, False, None, None, True)
            n.engine.set_link(C_ID, kc, 12, 33, self.wire_c.endpoint, 0, True, -1, False, None, None, True)
            n.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
            n.engine.set_flow(C_IP, C_ID, header(A_ID, C_ID), 30.0, 0)
            n.engine.set_flow(B6, B_ID, header(A_ID, B_ID), 30.0, 0)
            n.engine.start()

    def lanes_of(self, *sends: tuple[Node, bytes]) -> list[int]:
        """The lane each frame, read by that Engine, was sealed in for B."""
        out = []
        for node, f in sends:
            node.kernel.send(f)
            out.append(decode_transport_header(self.wire_b.recv())[1] >> 56)
        return out

    def counters(self, name: str) -> int:
        return sum(n.engine.counters()[f"UDP and pings: {name}"] for n in (self.a0, self.a1))

    def close(self) -> None:
        for n in (self.a0, self.a1):
            n.close()
        for w in (self.wire_b, self.wire_c):
            w.sock.close()


def colliding(port: int) -> int:
    """Another UDP port whose flow (A to B) has the same slot as `port`'s."""
    return next(p for p in range(port + 1, 65536) if slot_of_udp(p) == slot_of_udp(port))


def running_lanes() -> Iterator[Lanes]:
    node = Lanes()
    try:
        yield node
    finally:
        node.close()


lanes = pytest.fixture(running_lanes, name="lanes")  # fresh for each test: picks depend on the turn so far
shared_lanes = pytest.fixture(running_lanes, name="shared_lanes", scope="module")  # for the property test


def test_each_ping_and_udp_flow_keeps_the_lane_its_first_packet_took_whichever_engine_reads_it(lanes: Lanes) -> None:
    a0, a1 = lanes.a0, lanes.a1
    # Two pings (identifiers 7 and 8) and two UDP flows, all first read by lane 0 while both lanes are idle:
    # they take the lanes in turn.
    first = lanes.lanes_of((a0, icmp(8, 7)), (a0, icmp(8, 8)), (a0, udp(5000)), (a0, udp(5001)))
    assert first in ([0, 1, 0, 1], [1, 0, 1, 0]), first
    for ident, lane in zip((7, 8), first[:2], strict=True):
        assert lanes.lanes_of((a0, icmp(8, ident)), (a1, icmp(8, ident))) == [lane, lane]
    for port, lane in zip((5000, 5001), first[2:], strict=True):
        assert lanes.lanes_of((a1, udp(port)), (a0, udp(port)), (a1, udp(port))) == [lane] * 3
    assert lanes.counters("flows started in another lane") == 2
    assert lanes.counters("packets sent in their flow's lane, read by another") == 5  # 2 pings, 3 UDP
    # An echo reply (this node answers: its lane follows the request's), an ICMP error, another protocol: the
    # reading Engine's lane, each time.
    for other in (icmp(0, 7), icmp(3, 7), frame(A_IP, B_IP, vnet=PLAIN, protocol=47)):
        assert lanes.lanes_of((a0, other), (a1, other)) == [0, 1]


def test_a_ping_started_while_a_lane_floods_takes_the_other_lane(lanes: Lanes) -> None:
    """What docs/datapath.md (Under load) measured: a ping that shares a bulk flow's lane waits behind it."""
    a1 = lanes.a1
    flooding = threading.Event()

    def flood() -> None:  # lane 1 carries tens of thousands of packets a second, to C, while this thread runs
        while flooding.is_set():
            for _ in range(16):
                a1.kernel.send(frame(A_IP, C_IP, vnet=PLAIN, protocol=47))
            for _ in range(16):
                lanes.wire_c.recv()

    flooding.set()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        # Pings read by the flooding lane's Engine (the TAP's hash gave them its queue) go in lane 0: two in a row
        # there, which taking turns never gives. On a busy host the flood thread may stall for longer than the
        # quiet that makes a lane idle (QUIET_NS), so it tries for a while.
        picks: list[int] = []
        deadline = time.monotonic() + 5.0
        while picks[-2:] != [0, 0] and time.monotonic() < deadline:
            picks += lanes.lanes_of((a1, icmp(8, 100 + len(picks))))
            time.sleep(0.002)
        assert picks[-2:] == [0, 0], picks
        ident = 100 + len(picks) - 1
        assert lanes.lanes_of((a1, icmp(8, ident)), (a1, icmp(8, ident))) == [0, 0]  # and it keeps it
    finally:
        flooding.clear()
        flooder.join()


def test_a_flow_whose_slot_a_live_flow_holds_keeps_the_reading_lane_and_evicts_nothing(lanes: Lanes) -> None:
    a0, a1 = lanes.a0, lanes.a1
    port = 6000
    other = colliding(port)
    [lane] = lanes.lanes_of((a0, udp(port)))
    # The slot's flow is live: the other flow of its slot goes by whichever Engine reads it, each time, and the
    # first keeps its lane throughout (it is not evicted and moved, packet by packet).
    for _ in range(3):
        assert lanes.lanes_of((a0, udp(other)), (a1, udp(other))) == [0, 1]
        assert lanes.lanes_of((a0, udp(port)), (a1, udp(port))) == [lane, lane]
    assert lanes.counters("flows started in another lane") == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from([0, 1]),
    st.sampled_from([1, 6, 17, 47, 58]),
    st.binary(max_size=24),
    st.integers(0, 0xFFFF),
    st.booleans(),
)
def test_any_packet_read_by_either_lane_is_sent_in_a_lane_of_the_node(
    shared_lanes: Lanes, reader: int, protocol: int, l4: bytes, fragment: int, v6: bool
) -> None:
    """lane_for reads the transport header of what the TAP gives (TCP, UDP, echo requests: any length, any
    fragment field): whatever it is, it leaves in one of the node's two lanes, and the Engines keep working."""
    lanes = shared_lanes
    node = (lanes.a0, lanes.a1)[reader]
    if v6:
        head = struct.pack("!IHBB", 6 << 28, len(l4), protocol, 64) + A6.to_bytes(16, "big") + B6.to_bytes(16, "big")
        packet = PLAIN + DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x86\xdd" + head + l4
    else:
        ip = bytearray(ipv4_packet(A_IP, B_IP, protocol, 64, l4))
        ip[6:8] = (fragment & 0x3FFF).to_bytes(2, "big")  # flags (DF, MF) and offset; the checksum is not read
        packet = PLAIN + DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00" + bytes(ip)
    node.kernel.send(packet)
    lanes.wire_b.sock.settimeout(0.2)
    try:
        datagram = lanes.wire_b.recv()  # sent to B, or (an IPv6 or malformed packet) passed up: nothing here
        assert decode_transport_header(datagram)[1] >> 56 in (0, 1)
    except TimeoutError:
        pass
    finally:
        lanes.wire_b.sock.settimeout(TIMEOUT)
    gre = frame(A_IP, B_IP, vnet=PLAIN, protocol=47)
    assert lanes.lanes_of((lanes.a0, gre), (lanes.a1, gre)) == [0, 1]


def test_a_flow_quiet_for_seconds_picks_again_and_a_flow_of_its_slot_may_take_the_slot(lanes: Lanes) -> None:
    """After FLOW_LIVE without a packet nothing of a flow is in flight: its next packet picks a lane again (by
    load, in turn among idle lanes), and another flow of its slot takes the slot."""
    a0, a1 = lanes.a0, lanes.a1
    p, q = 7000, 7001
    q2 = colliding(q)
    assert slot_of_udp(p) != slot_of_udp(q)
    [lane_p, lane_q] = lanes.lanes_of((a0, udp(p)), (a0, udp(q)))
    assert lane_q == 1 - lane_p  # in turn
    assert lanes.lanes_of((a0, udp(q2)), (a1, udp(q2))) == [0, 1]  # q is live: q2 keeps the reading lane
    time.sleep(FLOW_LIVE_S + 0.2)
    [lane_q2] = lanes.lanes_of((a1, udp(q2)))  # q went quiet: q2 takes its slot, the next turn's lane
    assert lane_q2 == lane_p
    assert lanes.lanes_of((a1, udp(p))) == [1 - lane_p]  # p picks again: the turn after
    assert lanes.lanes_of((a0, udp(q2)), (a1, udp(q2))) == [lane_q2] * 2
    assert lanes.lanes_of((a0, udp(q)), (a1, udp(q))) == [0, 1]  # now q is the other flow of a live slot
