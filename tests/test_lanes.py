"""Lanes (docs/datapath.md): a counter's top byte is its lane, each lane of a session has its own counter and
replay window (overlay/_keys.h), and the node's sockets on its one port each take their lane's datagrams
(SO_REUSEPORT and the steering program, steer_lanes), so each of the node's Engines has a thread, a TAP queue
and a socket of its own. On loopback: what the kernel steers where, and the windows against a reference."""

from __future__ import annotations

import select
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay._fast import EXPRESS_LANES, LANES, REPLAY_WINDOW, Exhausted, Keys, Replayed, steer_lanes
from overlay.link import SEND_LANE, Link
from overlay.transport.session import REJECT_AFTER_MESSAGES, Session
from overlay.transport.underlay import UdpUnderlay, UnderlayError
from overlay.wire import LinkMsg, PacketType

LANE = 1 << 56


@given(st.lists(st.tuples(st.integers(0, LANES - 1), st.integers(0, 3 * REPLAY_WINDOW)), max_size=150))
def test_each_lane_accepts_each_counter_at_most_once_against_its_own_window(packets: list[tuple[int, int]]) -> None:
    key = bytes(range(32))
    sender, receiver = Keys(key, key), Keys(key, key)
    seen: set[tuple[int, int]] = set()
    top = dict.fromkeys(range(LANES), -1)
    nexts = dict.fromkeys(range(LANES), 0)  # the sender's next counter within each lane
    for lane, n in packets:
        if n < nexts[lane]:  # a lane's counter only goes up: a fresh sender (the same key) for a lower one
            sender, nexts = Keys(key, key), dict.fromkeys(range(LANES), 0)
        if lane == 0:
            sender.counter = n
        while lane and nexts[lane] < n:  # another lane's counter moves only by sealing in it
            sender.seal(0x83, 7, b"", lane)
            nexts[lane] += 1
        packet = sender.seal(0x83, 7, n.to_bytes(4, "big"), lane)
        nexts[lane] = n + 1
        counter = lane * LANE + n
        assert int.from_bytes(packet[5:13], "big") == counter
        if (lane, n) not in seen and n > top[lane] - REPLAY_WINDOW:
            assert receiver.open(packet, counter) == n.to_bytes(4, "big")
            seen.add((lane, n))
            top[lane] = max(top[lane], n)
            assert receiver.newest(counter) == (n == top[lane])  # the newest of its lane, whatever the others'
        else:
            with pytest.raises(Replayed):
                receiver.open(packet, counter)
        assert receiver.top == top[0]


def test_lane_limits_a_lane_beyond_the_table_and_a_counter_past_the_lanes_space() -> None:
    key = bytes(range(32))
    keys = Keys(key, key)
    with pytest.raises(ValueError, match="lane is 0 to"):
        keys.seal(0x83, 7, b"x", LANES)
    with pytest.raises(ValueError, match="below 2\\*\\*56"):
        keys.counter = LANE
    # Lane 0 ends REJECT_AFTER_MESSAGES in, as WireGuard's one counter ends at its limit; the next lane starts
    # where lane 0 could never reach.
    keys.counter = REJECT_AFTER_MESSAGES - 1
    last = keys.seal(0x83, 7, b"x")
    with pytest.raises(Exhausted):
        keys.seal(0x83, 7, b"x")
    assert int.from_bytes(last[5:13], "big") == REJECT_AFTER_MESSAGES - 1 < LANE
    # A packet of a lane no node sends in (the top byte at LANES or above) is refused as too old, not opened.
    forged = last[:5] + (LANES * LANE).to_bytes(8, "big") + last[13:]
    with pytest.raises(Replayed):
        Keys(key, key).open(forged, LANES * LANE)
    for _ in range(3):
        keys.seal(0x83, 7, b"x", 2)
    assert keys.highest == REJECT_AFTER_MESSAGES  # the busiest lane: what rekeying by message count watches


def datagram(first: int, byte1: int = 0, byte5: int = 0, size: int = 40) -> bytes:
    head = bytes([first, byte1, 0, 0, 0, byte5])
    return (head + bytes(size))[:size]


STEERED = [
    # (what, datagram, lane of 3 sockets)
    ("transport, lane 0", datagram(PacketType.TRANSPORT), 0),
    ("transport, lane 1", datagram(PacketType.TRANSPORT, byte5=1), 1),
    ("transport, lane 2", datagram(PacketType.TRANSPORT, byte5=2), 2),
    ("transport, lane 4 of 3 sockets", datagram(PacketType.TRANSPORT, byte5=4), 1),
    ("SEALED, lane 2", datagram(PacketType.SEALED, byte5=2), 2),
    ("TUNNEL, lane 1", datagram(PacketType.TUNNEL, byte5=1), 1),
    ("chunk of Engine 2", datagram(PacketType.CHUNK, byte1=0x82, byte5=1), 2),
    ("chunk of Python's", datagram(PacketType.CHUNK, byte1=0x05, byte5=0), 2),
    ("handshake", datagram(PacketType.HANDSHAKE_INIT, byte5=1), 0),
    ("STUN", bytes([0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42]) + bytes(12), 0),
    ("TURN channel data", bytes([0x40, 0x01, 0x00, 0x04, 0x83, 0, 0, 0]), 0),
    ("too short to hold a lane", bytes([PacketType.TRANSPORT, 1, 1]), 0),
]


def test_the_kernel_gives_each_datagram_to_its_lanes_socket_on_the_one_port() -> None:
    underlay = UdpUnderlay(("127.0.0.1", 0), lanes=3)
    socks = [underlay._sock, *underlay.lane_socks]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert {s.getsockname() for s in socks} == {underlay.local_endpoint}
        for what, data, lane in STEERED:
            sender.sendto(data, underlay.local_endpoint)
            ready, _, _ = select.select(socks, [], [], 2.0)
            assert [socks.index(s) for s in ready] == [lane], what
            assert ready[0].recv(100) == data
    finally:
        sender.close()
        underlay.close()
    assert all(s.fileno() == -1 for s in socks)


EXPRESS_STEERED = [
    # (what, datagram, socket of 2 lanes and their 2 express sockets)
    ("transport, lane 1", datagram(PacketType.TRANSPORT, byte5=1), 1),
    ("transport, lane 0's express lane", datagram(PacketType.TRANSPORT, byte5=EXPRESS_LANES), 2),
    ("TUNNEL, lane 1's express lane", datagram(PacketType.TUNNEL, byte5=EXPRESS_LANES + 1), 3),
    ("transport, lane 7 (a node of 8 lanes): an express socket", datagram(PacketType.TRANSPORT, byte5=7), 3),
    ("chunk of lane 1", datagram(PacketType.CHUNK, byte1=0x81), 1),
    ("handshake", datagram(PacketType.HANDSHAKE_INIT, byte5=EXPRESS_LANES), 0),
]


@pytest.mark.parametrize("lanes", [1, 2])
def test_with_express_sockets_each_lane_has_one_more_for_its_express_datagrams(lanes: int) -> None:
    underlay = UdpUnderlay(("127.0.0.1", 0), lanes=lanes, express=True)
    socks = [underlay._sock, *underlay.lane_socks, *underlay.express_socks]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert len(socks) == 2 * lanes
        for what, data, index in EXPRESS_STEERED:
            if lanes == 1:  # one lane: its socket (0 and 1 of two lanes), or its express socket (2 and 3)
                index = int(index >= 2)
            sender.sendto(data, underlay.local_endpoint)
            ready, _, _ = select.select(socks, [], [], 2.0)
            assert [socks.index(s) for s in ready] == [index], what
            assert ready[0].recv(100) == data
    finally:
        sender.close()
        underlay.close()
    assert all(s.fileno() == -1 for s in socks)


def test_a_node_of_more_lanes_than_express_lanes_has_no_express_sockets() -> None:
    underlay = UdpUnderlay(("127.0.0.1", 0), lanes=EXPRESS_LANES + 1, express=True)
    try:
        assert underlay.express_socks == [] and len(underlay.lane_socks) == EXPRESS_LANES
    finally:
        underlay.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(ValueError, match=f"lanes are 1 to {EXPRESS_LANES}"):
            steer_lanes(s.fileno(), EXPRESS_LANES + 1, True)


def test_one_lane_takes_its_port_alone_and_lanes_refuse_a_port_taken() -> None:
    """Without lanes the node's socket has no SO_REUSEPORT: no other socket can bind its port. With lanes only
    the node's own sockets can (another without SO_REUSEPORT is refused; one of another user would be too)."""
    alone = UdpUnderlay(("127.0.0.1", 0))
    with pytest.raises(UnderlayError, match=r"cannot open 2 sockets|cannot listen"):
        UdpUnderlay(alone.local_endpoint, lanes=2)
    alone.close()
    lanes = UdpUnderlay(("127.0.0.1", 0), lanes=2)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OSError):
        other.bind(lanes.local_endpoint)
    other.close()
    lanes.close()


def test_the_steering_program_takes_1_to_lanes_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for bad in (0, LANES + 1):
            with pytest.raises(ValueError, match="lanes are 1 to"):
                steer_lanes(s.fileno(), bad)


class Sent:
    """A path that keeps what a link sends on it."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def send(self, packet: bytes) -> None:
        self.packets.append(packet)


def test_python_seals_in_the_lane_it_handles_for_a_peer_that_takes_lanes() -> None:
    """overlay/fastpath.py sets SEND_LANE while it handles what Engine k passed up: what Python sends then is
    counted in lane k (transport packets, SEALED heads, TUNNEL heads), so the peer's Engine k takes it and the
    flow stays in the lane the TAP gave it; a peer without HELLO_LANES gets lane 0."""
    key = bytes(range(32))
    path = Sent()
    link = Link(7, b"k" * 32, Session(1, 2, b"h" * 32, True, Keys(key, key)), path, 0.0)  # type: ignore[arg-type]
    e2e = Keys(key, key).seal(0x83, 9, b"end to end")
    for lanes_ok, lane in ((True, 0), (True, 3), (False, 3)):
        link.lanes_ok = link.tunnels_ok = lanes_ok
        token = SEND_LANE.set(lane)
        try:
            link.send(b"data")
            link.send_sealed(bytes(28), e2e)
            link.send_relay(LinkMsg.RELAY, 9, e2e)
        finally:
            SEND_LANE.reset(token)
        expected = lane if lanes_ok else 0
        assert [p[5] for p in path.packets] == [expected] * 3, (lanes_ok, lane)
        path.packets.clear()
