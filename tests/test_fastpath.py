"""The compiled data path (overlay/_fast.c Engine) on its own, in one process: loopback UDP sockets, and
SOCK_SEQPACKET socketpairs standing in for TAP devices (one message per frame, as a TAP reads and writes).

Each Engine's link points at a test socket, not at the other Engine, so the test sits on the wire: it sees
every datagram, and can replay, corrupt, reorder or forge them. What the Engine does not handle must come up
to Python unchanged; what it handles must be exactly what the Python path would send and accept.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay._fast import GCM_IMPLS, UP_HEADER, Engine, Keys
from overlay.fastpath import FastPath, LinkState
from overlay.link import SEND_LANE, TUNNEL_OFFSET, Link
from overlay.tap.frames import internet_checksum, ipv4_packet
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.chunks import CHUNK_HEADER, Reassembly, split
from overlay.transport.paths import UdpPath
from overlay.transport.session import Session
from overlay.wire import (
    RELAY_HEAD,
    ROUTED_HEADER,
    TUNNEL_LINK_PART,
    Kind,
    LinkMsg,
    PacketType,
    decode_transport_header,
    encode_relay,
    relay_head,
)

A_ID, B_ID, C_ID = 0xA1A1A1A1A1A1A1A1, 0xB2B2B2B2B2B2B2B2, 0xC3C3C3C3C3C3C3C3
A_IP, B_IP, C_IP = 0x0A090001, 0x0A090002, 0x0A090003  # 10.9.0.1-3/24
TAP_MAC = b"\x02\x00\x00\x00\x00\x07"
TIMEOUT = 2.0
CHUNK = 1472


GRE = 47  # a protocol whose flows keep the reading Engine's lane (overlay/_lanes.h, lane_for)


def frame(src: int, dst: int, payload: bytes = b"x" * 32, vnet: bytes | None = None, protocol: int = 17) -> bytes:
    eth = DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00"
    return (vnet or b"") + eth + ipv4_packet(src, dst, protocol, 64, payload)


def header(src: int, dst: int, kind: int = Kind.DATA, ttl: int = 63) -> bytes:
    return ROUTED_HEADER.pack(LinkMsg.ROUTED, ttl, 0x01, src, dst, 7, kind)


class Node:
    """One Engine with its TAP (a socketpair: `kernel` is the kernel's end), its UDP socket, its up channel."""

    def __init__(
        self,
        node_id: int,
        address: int,
        *,
        vnet: bool = False,
        check: bool = False,
        hold_limit: float = 0.05,
        lane: int = 0,
        first: Engine | None = None,
        prefix_len: int = 24,
        address6: int | None = None,
        social: bool = False,
        express: bool = False,
    ) -> None:
        """`express`: with an express socket too (its port `xport`), which the Engine reads first."""
        self.id, self.address = node_id, address
        self.kernel, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.up, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.xudp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.xudp.bind(("127.0.0.1", 0))
        self.xudp.setblocking(False)
        self.xport = self.xudp.getsockname()[1]
        for s in (self.kernel, self.up):
            s.settimeout(TIMEOUT)
        tap.setblocking(False)
        engine_end.setblocking(False)
        self.udp.setblocking(False)
        self._keep = (tap, engine_end)
        self.engine = Engine(
            tap_fd=tap.fileno(),
            vnet_hdr=vnet,
            udp_fd=self.udp.fileno(),
            up_fd=engine_end.fileno(),
            gso=True,
            chunk=CHUNK,
            node_id=node_id,
            address=address,
            prefix_len=prefix_len,
            check_sources=check,
            hold_limit=hold_limit,
            lane=lane,
            first=first,
            address6=None if address6 is None else address6.to_bytes(16, "big"),
            social=social,
            express_fd=self.xudp.fileno() if express else -1,
        )
        self.engine.set_macs(TAP_MAC, DEFAULT_GATEWAY_MAC)

    def up_messages(self, timeout: float = 0.3) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        self.up.settimeout(timeout)
        try:
            while True:
                msg = self.up.recv(70000)
                out.append((msg[0], msg[UP_HEADER:]))
        except TimeoutError:
            return out

    def close(self) -> None:
        self.engine.stop()
        for s in (self.kernel, self.up, self.udp, self.xudp, *self._keep):
            s.close()


class Wire:
    """A test socket a link points at: what the Engine sends arrives here, what we send comes from here."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.endpoint = (4, socket.inet_aton("127.0.0.1"), self.sock.getsockname()[1])

    def recv(self) -> bytes:
        return self.sock.recv(70000)

    def send_to(self, node: Node, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", node.port))


def session_pair(impl_a: str | None = None, impl_b: str | None = None) -> tuple[Keys, Keys]:
    k1, k2 = bytes(range(32)), bytes(range(100, 132))
    return Keys(k1, k2, impl=impl_a), Keys(k2, k1, impl=impl_b)


# Each end's AES-GCM (overlay/_gcm.h): the module's choice at both, and where a second implementation can run, one
# on each end: the bytes on the wire are the same, so the Engines must not notice.
IMPL_PAIRS = [(None, None), *([("openssl", "ipsec-mb")] if len(GCM_IMPLS) > 1 else [])]


@contextlib.contextmanager
def linked_pair(
    impls: tuple[str | None, str | None] = (None, None), address6: tuple[int, int] | None = None
) -> Iterator[tuple[Node, Node, Wire, Wire, Keys, Keys]]:
    """A and B linked (A's session index 11, B's 22); A's link points at wire_b, B's at wire_a; each with a flow
    to the other's address (with `address6`, the two nodes' IPv6 addresses and the flows to those)."""
    a6, b6 = address6 or (None, None)
    a, b = Node(A_ID, A_IP, address6=a6), Node(B_ID, B_IP, address6=b6)
    wire_a, wire_b = Wire(), Wire()
    ka, kb = session_pair(*impls)
    try:
        a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)
        a.engine.set_flow(B_IP if b6 is None else b6, B_ID, header(A_ID, B_ID), 30.0, 0)
        b.engine.set_flow(A_IP if a6 is None else a6, A_ID, header(B_ID, A_ID), 30.0, 0)
        a.engine.start()
        b.engine.start()
        yield a, b, wire_a, wire_b, ka, kb
    finally:
        for x in (a, b):
            x.close()
        for w in (wire_a, wire_b):
            w.sock.close()


@pytest.fixture(params=IMPL_PAIRS, ids=lambda p: "-".join(x or "default" for x in p))
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Node, Node, Wire, Wire, Keys, Keys]]:
    with linked_pair(request.param) as nodes:
        yield nodes


def test_a_frame_crosses_sealed_as_the_python_path_would_and_arrives_as_a_frame(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, wire_a, wire_b, _ka, kb = pair
    f = frame(A_IP, B_IP)
    a.kernel.send(f)
    datagram = wire_b.recv()
    index, counter = decode_transport_header(datagram)
    assert (datagram[0], index, counter) == (0x83, 22, 0)
    # B's Python side (the same Keys) reads exactly the routed message the Python path sends.
    opened = Keys(bytes(range(100, 132)), bytes(range(32))).open(datagram, counter)
    assert opened == header(A_ID, B_ID) + f[14:]
    wire_a.send_to(b, datagram)
    delivered = b.kernel.recv(70000)
    assert delivered == TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00" + f[14:]
    assert a.up_messages() in ([], [(3, b"")])  # nothing but an activity note went up
    assert kb.top == 0
    # The Engine counted what it carried, for the links' bytes and maintenance's liveness.
    took = {t[0]: t for t in b.engine.take()}
    assert took[A_ID][2] == len(datagram) and took[A_ID][3] == 1 and took[A_ID][6] == 1


def test_activity_goes_up_as_one_note_per_half_second_and_none_before_python_took_the_last() -> None:
    """Python hears about a link's activity from a note (type 3), at most one per NOTE_NS (0.5 s) and none again
    before Python took the last one (Engine.take): not one per packet."""
    with linked_pair((None, None)) as (a, _b, _wire_a, wire_b, _ka, _kb):
        a.up_messages(0.05)  # whatever the start sent
        f = frame(A_IP, B_IP)
        notes = []
        for _ in range(3):
            a.kernel.send(f)
            assert wire_b.recv()
            notes += [m for m in a.up_messages(0.05) if m[0] == 3]
        assert notes == [(3, b"")]
        a.engine.take()  # Python's answer to a note (overlay/fastpath.py sync): the next may come, but not yet
        a.kernel.send(f)
        assert wire_b.recv()
        assert [m for m in a.up_messages(0.05) if m[0] == 3] == []  # within NOTE_NS of the last
        time.sleep(0.5)
        a.kernel.send(f)
        assert wire_b.recv()
        assert [m for m in a.up_messages(0.3) if m[0] == 3] == [(3, b"")]


def test_what_the_engine_does_not_handle_goes_up_unchanged(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, wire_a, _wire_b, ka, kb = pair
    arp = DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x06" + bytes(28)
    no_flow = frame(A_IP, 0x0A090009)
    off_subnet = frame(A_IP, 0x0B000001)
    for f in (arp, no_flow, off_subnet):
        a.kernel.send(f)
    ups = [m for m in a.up_messages() if m[0] == 2]
    assert ups == [(2, arp), (2, no_flow), (2, off_subnet)]
    # Datagrams: STUN, a handshake, an unknown session, a link message that is not data, data from elsewhere.
    stun = b"\x00\x01\x00\x00" + bytes(16)
    handshake = b"\x81" + bytes(150)
    unknown = kb_seal(ka, 99, header(A_ID, B_ID) + frame(A_IP, B_IP)[14:])
    ping = ka.seal(0x83, 22, b"\x01" + bytes(8))
    for d in (stun, handshake, unknown, ping):
        wire_a.send_to(b, d)
    ups = [m for m in b.up_messages() if m[0] == 1]
    assert [u[1] for u in ups] == [stun, handshake, unknown, ping]
    assert kb.top == -1  # the ping went up unopened by the window: Python opens it as if the Engine did not exist
    # The same data from a socket the link does not point at (a roaming peer): up, for Python to move the link.
    stray = Wire()
    data = ka.seal(0x83, 22, header(A_ID, B_ID) + frame(A_IP, B_IP)[14:])
    stray.send_to(b, data)
    assert [m[1] for m in b.up_messages() if m[0] == 1] == [data]
    stray.sock.close()


def kb_seal(keys: Keys, remote: int, plain: bytes) -> bytes:
    return keys.seal(0x83, remote, plain)


def test_a_replayed_or_forged_datagram_is_not_delivered_and_goes_up_for_python_to_count(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, wire_a, wire_b, _ka, _kb = pair
    a.kernel.send(frame(A_IP, B_IP))
    datagram = wire_b.recv()
    wire_a.send_to(b, datagram)
    assert b.kernel.recv(70000)
    wire_a.send_to(b, datagram)  # a replay
    forged = bytearray(datagram)
    forged[30] ^= 1
    wire_a.send_to(b, bytes(forged))
    ups = [m[1] for m in b.up_messages() if m[0] == 1]
    assert ups == [datagram, bytes(forged)]
    b.kernel.settimeout(0.2)
    with pytest.raises(TimeoutError):
        b.kernel.recv(70000)


def test_data_not_for_this_node_or_from_another_source_goes_up(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b, wire_a, _wire_b, ka, kb = pair
    body = frame(A_IP, B_IP)[14:]
    cases = [
        header(A_ID, C_ID) + body,  # routed on to another node
        header(C_ID, B_ID) + body,  # from another origin than the link's peer
        header(A_ID, B_ID) + frame(A_IP, C_IP)[14:],  # an inner packet for another address
        header(A_ID, B_ID, kind=Kind.FIND) + body,  # not data
        ROUTED_HEADER.pack(LinkMsg.ROUTED, 63, 0x08, A_ID, B_ID, 7, Kind.DATA) + body,  # a joiner's FIND flag
    ]
    sent = [ka.seal(0x83, 22, c) for c in cases]
    for d in sent:
        wire_a.send_to(b, d)
    assert [m[1] for m in b.up_messages() if m[0] == 1] == sent
    assert kb.top == -1


def test_after_a_rekey_what_the_peer_sent_on_the_previous_session_is_still_delivered(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b, wire_a, _wire_b, ka, kb = pair
    old_a, old_b = (
        Keys(bytes(range(40, 72)), bytes(range(140, 172))),
        Keys(bytes(range(140, 172)), bytes(range(40, 72))),
    )
    new_a, new_b = (
        Keys(bytes(range(50, 82)), bytes(range(150, 182))),
        Keys(bytes(range(150, 182)), bytes(range(50, 82))),
    )
    body = header(A_ID, B_ID) + frame(A_IP, B_IP)[14:]
    # B rekeyed: its new session is index 23, the one before (index 22, the pair's) stays open.
    b.engine.set_link(A_ID, new_b, 23, 11, wire_a.endpoint, 0, True, -1, False, (kb, 22))
    for keys, index in ((ka, 22), (new_a, 23), (ka, 22)):  # late, new, and late again
        wire_a.send_to(b, keys.seal(0x83, index, body))
        assert b.kernel.recv(70000)[14:] == body[ROUTED_HEADER.size :]
    assert kb.top == 1 and new_b.top == 0  # each session's replay window marked
    # The next rekey: the previous one is now the pair's second session; the first is closed.
    b.engine.set_link(A_ID, old_b, 24, 11, wire_a.endpoint, 0, True, -1, False, (new_b, 23))
    late = ka.seal(0x83, 22, body)
    wire_a.send_to(b, late)
    wire_a.send_to(b, old_a.seal(0x83, 24, body))
    assert b.kernel.recv(70000)[14:] == body[ROUTED_HEADER.size :]
    assert [m[1] for m in b.up_messages() if m[0] == 1] == [late]  # for Python to count
    with pytest.raises(ValueError):
        b.engine.set_link(A_ID, old_b, 24, 11, wire_a.endpoint, 0, True, -1, False, (new_b, 24))
    with pytest.raises(TypeError):
        b.engine.set_link(A_ID, old_b, 24, 11, wire_a.endpoint, 0, True, -1, False, (b"not keys", 23))


def test_cryptokey_routing_delivers_only_the_certified_source() -> None:
    b = Node(B_ID, B_IP, check=True)
    wire_a = Wire()
    ka, kb = session_pair()
    b.engine.start()
    try:
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)  # no certificate seen yet
        first = ka.seal(0x83, 22, header(A_ID, B_ID) + frame(A_IP, B_IP)[14:])
        wire_a.send_to(b, first)
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [first]
        b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, A_IP)
        spoofed = ka.seal(0x83, 22, header(A_ID, B_ID) + frame(C_IP, B_IP)[14:])
        wire_a.send_to(b, spoofed)
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [spoofed]
        good = ka.seal(0x83, 22, header(A_ID, B_ID) + frame(A_IP, B_IP)[14:])
        wire_a.send_to(b, good)
        assert b.kernel.recv(70000)[14:] == frame(A_IP, B_IP)[14:]
    finally:
        b.close()
        wire_a.sock.close()


def tunnel_through_b(
    a_to_b: bool, b_to_c: bool, *, lanes: bool = False
) -> tuple[tuple[Node, Node, Node], tuple[Wire, Wire, Wire, Wire], Keys, Keys]:
    """A -> B -> C, started: A's link to C a tunnel through B, A with a flow to C; (a, b, c), the wires (w_xy: where
    x's link to y points: ab, ba, bc, cb) and C's keys of its links to A and to B. `lanes`: every link's peer takes
    lanes, and every Engine has an express socket."""
    a, b, c = (Node(i, ip, express=lanes) for i, ip in ((A_ID, A_IP), (B_ID, B_IP), (C_ID, C_IP)))
    w_ab, w_ba, w_bc, w_cb = Wire(), Wire(), Wire(), Wire()
    ab, ba = session_pair()
    bc, cb = Keys(bytes(32), bytes([1]) * 32), Keys(bytes([1]) * 32, bytes(32))
    ac, ca = Keys(bytes([2]) * 32, bytes([3]) * 32), Keys(bytes([3]) * 32, bytes([2]) * 32)
    more = (None, None, lanes)  # previous and next session, lanes_ok
    a.engine.set_link(B_ID, ab, 1, 2, w_ab.endpoint, 0, True, -1, a_to_b, *more)
    a.engine.set_link(C_ID, ac, 5, 6, None, B_ID, True, -1, False, *more)
    b.engine.set_link(A_ID, ba, 2, 1, w_ba.endpoint, 0, True, -1, False, *more)
    b.engine.set_link(C_ID, bc, 3, 4, w_bc.endpoint, 0, True, -1, b_to_c, *more)
    c.engine.set_link(B_ID, cb, 4, 3, w_cb.endpoint, 0, True, -1, False, *more)
    c.engine.set_link(A_ID, ca, 6, 5, None, B_ID, True, -1, False, *more)
    a.engine.set_flow(C_IP, C_ID, header(A_ID, C_ID), 30.0, 0)
    for n in (a, b, c):
        n.engine.start()
    return (a, b, c), (w_ab, w_ba, w_bc, w_cb), ca, cb


@pytest.mark.parametrize(
    ("a_to_b", "b_to_c"),
    [(False, False), (True, True), (True, False), (False, True)],
    ids=["relay-messages", "tunnel-packets", "tunnel-then-relay", "relay-then-tunnel"],
)
def test_a_tunnel_through_a_relay_engine_delivers_in_either_form(a_to_b: bool, b_to_c: bool) -> None:
    """A -> B -> C: A's link to C is a tunnel through B. Each hop whose receiver takes TUNNEL packets carries
    one (only the relay head sealed for the hop; the tunnel's own packet crosses untouched); any other hop a
    relay message sealed whole. B's Engine passes the packet on in the form C takes; C's Engine opens both
    layers and delivers. The wire sees only outer packets."""
    (a, b, c), (w_ab, w_ba, w_bc, w_cb), ca, cb = tunnel_through_b(a_to_b, b_to_c)
    reader_bc = Keys(bytes([1]) * 32, bytes(32))  # C's receive key of the B-C link, for the test to look
    try:
        f = frame(A_IP, C_IP, b"through the tunnel" * 10)
        a.kernel.send(f)
        outer = w_ab.recv()
        assert outer[0] == (PacketType.TUNNEL if a_to_b else PacketType.TRANSPORT)
        assert decode_transport_header(outer)[0] == 2
        w_ba.send_to(b, outer)
        onward = w_bc.recv()
        assert onward[0] == (PacketType.TUNNEL if b_to_c else PacketType.TRANSPORT)
        index, counter = decode_transport_header(onward)
        assert index == 4
        if b_to_c:
            assert reader_bc.open_header(onward, counter, TUNNEL_LINK_PART) == relay_head(LinkMsg.RELAYED, A_ID)
            inner = onward[TUNNEL_OFFSET:]
        else:
            opened = reader_bc.open(onward, counter)
            assert opened[:RELAY_HEAD] == relay_head(LinkMsg.RELAYED, A_ID)
            inner = opened[RELAY_HEAD:]
        if a_to_b:
            assert inner == outer[TUNNEL_OFFSET:]  # B ran no cipher over the tunnel's packet
        assert inner[0] == PacketType.TRANSPORT and decode_transport_header(inner)[0] == 6
        w_cb.send_to(c, onward)
        assert c.kernel.recv(70000)[14:] == f[14:]
        assert ca.top == 0 and cb.top == 0
        assert b.engine.counters()["relayed"] == 1
    finally:
        for n in (a, b, c):
            n.close()
        for w in (w_ab, w_ba, w_bc, w_cb):
            w.sock.close()


def spaced_through(f: bytes, src: Node, relay: Node, dst: Node, legs: tuple[tuple[Wire, Wire], ...], n: int) -> None:
    """`n` frames `f` from `src`'s TAP through `relay` to `dst`'s, 2 ms apart (longer than any poll window), each
    leg's datagram read at its sending wire and handed in at its receiving one; no answer goes back."""
    (out1, in1), (out2, in2) = legs
    for _ in range(n):
        src.kernel.send(f)
        in1.send_to(relay, out1.recv())
        in2.send_to(dst, out2.recv())
        assert dst.kernel.recv(70000)[14:] == f[14:]
        time.sleep(0.002)


def test_the_ends_poll_after_their_own_data_until_the_waits_prove_long_and_a_relay_does_not_poll() -> None:
    """After data of its own an Engine polls a while before it sleeps (the answer usually comes within it); data it
    only relays for others does not make it poll: a relay's poll took a CPU the two ends needed (overlay/_thread.h,
    SPIN_NS). Packets 2 ms apart with no answer: each wait is longer than SPIN_NS, so each end's window halves
    (300, 150, 75, 37 us, then none) and the rest of the packets go without a poll."""
    (a, b, c), (w_ab, w_ba, w_bc, w_cb), _, _ = tunnel_through_b(True, True)
    try:
        f = frame(A_IP, C_IP, b"ping" * 16)
        spaced_through(f, a, b, c, ((w_ab, w_ba), (w_bc, w_cb)), 20)
        counts = {n: n.engine.counters() for n in (a, b, c)}
        assert counts[b]["relayed"] == 20
        assert counts[b]["polls after our own data"] == counts[b]["polls skipped (the waits were long)"] == 0
        for n in (a, c):
            polls, skipped = (counts[n][k] for k in ("polls after our own data", "polls skipped (the waits were long)"))
            assert (polls, skipped) == (4, 16), (n, polls, skipped)
    finally:
        for n in (a, b, c):
            n.close()
        for w in (w_ab, w_ba, w_bc, w_cb):
            w.sock.close()


def test_the_window_after_sending_and_the_one_after_delivering_adapt_apart() -> None:
    """Two windows (overlay/_thread.h, POLL_SENT and POLL_DELIVERED): A's 20 unanswered sends 2 ms apart take its window
    after sending to nothing (as in the test above), and the packets C then sends it, 2 ms apart, still find its
    window after delivering at 300 us: A polls after the first four of them and skips the other four. Every wait
    here is 2 ms or more, so the counts do not hang on how fast the test's thread runs."""
    (a, b, c), (w_ab, w_ba, w_bc, w_cb), _, _ = tunnel_through_b(True, True)
    try:
        c.engine.set_flow(A_IP, A_ID, header(C_ID, A_ID), 30.0, 0)
        f, answer = frame(A_IP, C_IP, b"ping" * 16), frame(C_IP, A_IP, b"pong" * 16)
        spaced_through(f, a, b, c, ((w_ab, w_ba), (w_bc, w_cb)), 20)
        before = a.engine.counters()
        spaced_through(answer, c, b, a, ((w_cb, w_bc), (w_ba, w_ab)), 8)
        after = a.engine.counters()
        polls, skipped = (
            after[k] - before[k] for k in ("polls after our own data", "polls skipped (the waits were long)")
        )
        assert (polls, skipped) == (4, 4), (polls, skipped)
    finally:
        for n in (a, b, c):
            n.close()
        for w in (w_ab, w_ba, w_bc, w_cb):
            w.sock.close()


def test_a_tunnel_packet_whose_inner_packet_or_head_was_changed_is_not_delivered_and_goes_up(pair) -> None:  # type: ignore[no-untyped-def]
    """The relay head is bound to the inner packet's tag: a changed tag fails the head; a changed body passes
    the head (the tag is intact) but fails the tunnel's own key. Either way nothing reaches the TAP, and the
    packet goes up for Python to count."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    kc = Keys(bytes([4]) * 32, bytes([5]) * 32)
    b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, None, A_ID, True, -1)
    inner = kc.seal(0x83, 33, header(C_ID, B_ID) + ipv4_packet(C_IP, B_IP, 17, 64, b"x" * 40))
    for changed in (inner[:-1] + bytes([inner[-1] ^ 1]), inner[:20] + bytes([inner[20] ^ 1]) + inner[21:]):
        d = ka.seal_header(22, relay_head(LinkMsg.RELAYED, C_ID), changed, PacketType.TUNNEL)
        wire_a.send_to(b, d)
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [d]
    good = ka.seal_header(22, relay_head(LinkMsg.RELAYED, C_ID), inner, PacketType.TUNNEL)
    wire_a.send_to(b, good)
    assert b.kernel.recv(70000)[14:] == ipv4_packet(C_IP, B_IP, 17, 64, b"x" * 40)
    assert all(m[0] != 1 for m in b.up_messages())  # delivered by the Engine, not passed up


def test_a_tunnel_packet_around_anything_but_a_transport_packet_is_not_passed_on(pair) -> None:  # type: ignore[no-untyped-def]
    """As decode_transport_header refuses it: the Engine passes it up for Python to count, and C hears nothing."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    wire_c = Wire()
    try:
        b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, wire_c.endpoint, 0, True, -1, True)
        inner = Keys(bytes([4]) * 32, bytes([5]) * 32).seal(0x83, 44, b"for c" * 10)
        good = ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), inner, PacketType.TUNNEL)
        wire_a.send_to(b, good)
        assert wire_c.recv()[TUNNEL_OFFSET:] == inner
        odd = ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), bytes([0x84]) + inner[1:], PacketType.TUNNEL)
        wire_a.send_to(b, odd)
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [odd]
        wire_c.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            wire_c.recv()
    finally:
        wire_c.sock.close()


def test_a_relay_to_a_peer_without_a_direct_link_goes_up(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b, wire_a, _wire_b, ka, _kb = pair
    msg = encode_relay(LinkMsg.RELAY, C_ID, ka.seal(0x83, 9, b"inner"))
    d = ka.seal(0x83, 22, msg)
    wire_a.send_to(b, d)
    assert [m[1] for m in b.up_messages() if m[0] == 1] == [d]


@pytest.mark.parametrize("path_chunk", [None, 1000], ids=["1500-byte path", "1000-byte path"])
def test_a_super_frame_leaves_in_chunks_and_the_receiving_engine_joins_them(path_chunk: int | None) -> None:
    """A TSO super-frame (virtio_net_hdr) crosses as DATA_GSO; bigger than a chunk, it leaves as chunks in one
    UDP GSO send, each at most the path's chunk size (a link's endpoint may carry it: overlay/transport/underlay.py
    asks the route's MTU; without it, a 1,500-byte path's). Read one by one, the chunks rebuild the datagram the
    Python path would send."""
    a = Node(A_ID, A_IP, vnet=True)
    wire_b = Wire()
    ka, _kb = session_pair()
    endpoint = wire_b.endpoint if path_chunk is None else (*wire_b.endpoint, path_chunk)
    a.engine.set_link(B_ID, ka, 11, 22, endpoint, 0, True, -1)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        vnet = struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 16)
        f = frame(A_IP, B_IP, bytes(range(256)) * 200, vnet=vnet)
        a.kernel.send(f)
        reassembly = Reassembly({})
        whole, sizes = None, []
        while whole is None:
            chunk = wire_b.recv()
            sizes.append(len(chunk))
            whole = reassembly.add(chunk, ("127.0.0.1", 1), 0.0)
        size = path_chunk or CHUNK
        assert max(sizes) == size and len(sizes) == -(-len(whole) // (size - CHUNK_HEADER.size))
        _, counter = decode_transport_header(whole)
        plain = Keys(bytes(range(100, 132)), bytes(range(32))).open(whole, counter)
        assert plain == header(A_ID, B_ID, kind=Kind.DATA_GSO) + vnet + f[10 + 14 :]
        # Until the link's fragment probe is answered (big_ok false), a super-frame goes up for Python to cut.
        a.engine.set_link(B_ID, ka, 11, 22, endpoint, 0, False, -1)
        a.kernel.send(f)
        assert [m[1] for m in a.up_messages() if m[0] == 2] == [f]
    finally:
        a.close()
        wire_b.sock.close()


def test_an_engine_sends_in_its_lane_to_a_peer_that_takes_lanes_and_in_lane_0_to_one_that_does_not() -> None:
    """A counter's top byte is its lane (overlay/_keys.h, LANES): Engine 3 seals in lane 3 for a peer whose HELLO
    said it takes lanes, and its chunk trains carry the lane in their message IDs' top byte (what the receiver's
    steering reads, steer_lanes); a peer from before lanes gets lane 0 only, whose window it has. (GRE: TCP, UDP
    and pings may go in a lane of their own, LaneShare.)"""
    a = Node(A_ID, A_IP, vnet=True, lane=3)
    wire_b = Wire()
    ka, _kb = session_pair()
    opener = Keys(bytes(range(100, 132)), bytes(range(32)))
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        f = frame(A_IP, B_IP, vnet=bytes(10), protocol=GRE)
        counters = []
        for lanes_ok in (True, True, False, False):
            a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, lanes_ok)
            a.kernel.send(f)
            datagram = wire_b.recv()
            _, counter = decode_transport_header(datagram)
            assert opener.open(datagram, counter) == header(A_ID, B_ID) + f[10 + 14 :]
            counters.append(counter)
        assert counters == [3 << 56, (3 << 56) + 1, 0, 1]
        assert (ka.highest, ka.counter) == (2, 2)
        # A super-frame leaves as chunks; each chunk's message ID starts with 0x80 | lane.
        a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
        vnet = struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 16)
        a.kernel.send(frame(A_IP, B_IP, bytes(range(256)) * 40, vnet=vnet, protocol=GRE))
        chunk = wire_b.recv()
        assert chunk[0] == PacketType.CHUNK and chunk[1] == 0x83
    finally:
        a.close()
        wire_b.sock.close()


def tcp_frame(src: int, dst: int, flags: int, port: int = 40000, payload: bytes = b"") -> bytes:
    """An Ethernet frame with an IPv4 TCP segment (no options) with these flags."""
    tcp = struct.pack("!HHIIBBHHH", port, 5201, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00" + ipv4_packet(src, dst, 6, 64, tcp)


SYN, ACK = 0x02, 0x10


def test_a_tcp_connection_this_node_opens_keeps_to_the_least_busy_lane_whichever_engine_reads_it() -> None:
    """The lanes of one node share their load and the lanes of the connections it opened (Engine's `first`): a SYN
    is sealed in the least busy lane, in turn among lanes equally idle, and so is every later segment of its
    connection, whichever Engine reads it (a super-frame's chunks carry that lane too), so that the peer writes
    them all by that lane's queue and the connection moves there at both ends (docs/datapath.md, Lanes). Other
    connections, protocols but TCP, UDP and pings, and anything for a peer without lanes stay in the reading
    Engine's lane; a lane that carries a flood is passed over."""
    a0 = Node(A_ID, A_IP, vnet=True, lane=0)
    a1 = Node(A_ID, A_IP, vnet=True, lane=1, first=a0.engine)
    wire_b, wire_c = Wire(), Wire()
    ka, _kb = session_pair()
    kc, _kc = session_pair()
    nodes = (a0, a1)
    for n in nodes:
        n.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
        n.engine.set_link(C_ID, kc, 12, 33, wire_c.endpoint, 0, True, -1, False, None, None, True)
        n.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
        n.engine.set_flow(C_IP, C_ID, header(A_ID, C_ID), 30.0, 0)
        n.engine.start()
    plain = bytes(10)  # a frame's virtio_net_hdr without offload

    def lanes_of(*sends: tuple[Node, bytes]) -> list[int]:
        out = []
        for node, f in sends:
            node.kernel.send(f)
            out.append(decode_transport_header(wire_b.recv())[1] >> 56)
        return out

    def tcp(flags: int, port: int) -> bytes:
        return plain + tcp_frame(A_IP, B_IP, flags, port)

    flooding = threading.Event()

    def flood() -> None:  # lane 1 carries tens of thousands of packets a second, to C, while this thread runs
        while flooding.is_set():
            for _ in range(16):
                a1.kernel.send(frame(A_IP, C_IP, vnet=plain))
            for _ in range(16):
                wire_c.recv()

    try:
        opened = lanes_of(*((a0, tcp(SYN, port)) for port in range(40000, 40004)))
        assert opened in ([0, 1, 0, 1], [1, 0, 1, 0])
        for port, lane in zip(range(40000, 40004), opened, strict=True):
            assert lanes_of((a0, tcp(ACK, port)), (a1, tcp(ACK, port)), (a1, tcp(ACK | 0x08, port))) == [lane] * 3
        assert lanes_of((a0, tcp(ACK, 41000)), (a1, tcp(ACK, 41000)), (a1, tcp(SYN | ACK, 41001))) == [0, 1, 1]
        gre = frame(A_IP, B_IP, vnet=plain, protocol=GRE)
        assert lanes_of((a0, gre), (a1, gre)) == [0, 1]
        counts = [n.engine.counters() for n in nodes]
        assert sum(c["TCP: connections opened in another lane"] for c in counts) == 2
        assert sum(c["TCP: segments sent in their connection's lane, read by another"] for c in counts) == 6
        # A super-frame of a connection in lane 0, read by lane 1: its chunks' message IDs say lane 0 as well.
        port = 40000 + opened.index(0)
        vnet = struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 16)
        a1.kernel.send(vnet + tcp_frame(A_IP, B_IP, ACK, port, bytes(range(256)) * 40))
        chunk = wire_b.recv()
        assert chunk[0] == PacketType.CHUNK and chunk[1] == 0x80
        while len(chunk) == CHUNK:  # the rest of its train
            chunk = wire_b.recv()
        flooding.set()
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        # While lane 1 floods, connections go to lane 0: two in a row there, which taking turns never gives. On a
        # busy host the flood thread may stall for longer than QUIET_NS (lane 1 then counts as idle, and the turn
        # goes on), so it tries for a while.
        picks: list[int] = []
        deadline = time.monotonic() + 5.0
        while picks[-2:] != [0, 0] and time.monotonic() < deadline:
            picks += lanes_of((a0, tcp(SYN, 42000 + len(picks) % 1000)))
            time.sleep(0.002)
        assert picks[-2:] == [0, 0], picks
        flooding.clear()
        flooder.join()
        # A peer that did not say it takes lanes gets lane 0 only, whatever is idle or remembered.
        for n in nodes:
            n.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, False)
        remembered_in_1 = 40000 + opened.index(1)
        assert lanes_of((a0, tcp(SYN, 43000)), (a1, tcp(SYN, 43001)), (a1, tcp(ACK, remembered_in_1))) == [0] * 3
    finally:
        flooding.clear()
        for n in nodes:
            n.close()
        for w in (wire_b, wire_c):
            w.sock.close()


def test_a_connection_whose_syn_went_up_still_keeps_to_the_lane_chosen_for_it() -> None:
    """A SYN read while its destination has no flow goes up to Python (sent in the reading Engine's lane), but its
    connection's lane is chosen all the same: once the flow is there, its segments go in that lane."""
    a0 = Node(A_ID, A_IP, lane=0)
    a1 = Node(A_ID, A_IP, lane=1, first=a0.engine)
    wire_b = Wire()
    ka, _kb = session_pair()
    try:
        for n in (a0, a1):
            n.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
            n.engine.start()
        for port in (40000, 40001):
            a0.kernel.send(tcp_frame(A_IP, B_IP, SYN, port))
        assert [m[0] for m in a0.up_messages() if m[0] == 2] == [2, 2]  # no flow: both went up
        for n in (a0, a1):
            n.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 2)
        lanes = []
        for port in (40000, 40001):
            a0.kernel.send(tcp_frame(A_IP, B_IP, ACK, port))
            lanes.append(decode_transport_header(wire_b.recv())[1] >> 56)
        assert lanes in ([0, 1], [1, 0])  # lane 0's Engine read both: one went in the other lane
        assert a0.engine.counters()["TCP: connections opened in another lane"] == 0  # Python sent the SYNs
    finally:
        for n in (a0, a1):
            n.close()
        wire_b.sock.close()


def test_an_engine_shares_lanes_only_with_the_first_engine_of_another_lane() -> None:
    a0 = Node(A_ID, A_IP, lane=0)
    try:
        for bad in (a0.engine, object()):
            with pytest.raises((ValueError, TypeError)):
                Node(A_ID, A_IP, lane=0 if bad is a0.engine else 1, first=bad)  # type: ignore[arg-type]
        a1 = Node(A_ID, A_IP, lane=1, first=a0.engine)
        with pytest.raises(ValueError):
            Node(A_ID, A_IP, lane=2, first=a1.engine)  # not the first: it shares another's
        a1.close()
    finally:
        a0.close()


def test_an_engine_takes_every_lane_of_a_session_each_against_its_own_window(pair) -> None:  # type: ignore[no-untyped-def]
    """Packets of two lanes with the same counter within their lanes are both new; a lane far ahead does not
    make another lane's packets too old; a replay within a lane is refused (it goes up, where Python counts it)."""
    _a, b, wire_a, _wire_b, _ka, kb = pair
    sender = Keys(bytes(range(32)), bytes(range(100, 132)))
    sent, next_in = [], {lane: 0 for lane in range(8)}
    for lane, counter in ((0, 5), (1, 5), (1, 5000), (0, 6), (7, 0)):
        sender.counter = counter if lane == 0 else 0
        for _ in range(counter - next_in[lane] if lane else 0):  # another lane's counter moves only by sealing
            sender.seal(0x83, 22, b"", lane)
        next_in[lane] = counter + 1
        f = frame(A_IP, B_IP, bytes([lane]) * 8 + counter.to_bytes(8, "big"))
        d = sender.seal(0x83, 22, header(A_ID, B_ID) + f[14:], lane)
        assert decode_transport_header(d)[1] == lane << 56 | counter
        sent.append(d)
        wire_a.send_to(b, d)
        assert b.kernel.recv(70000)[14:] == f[14:]
    wire_a.send_to(b, sent[1])
    assert [m[1] for m in b.up_messages() if m[0] == 1] == [sent[1]]
    assert kb.newest(1 << 56 | 5000) and not kb.newest(1 << 56 | 5) and kb.top == 6


def test_a_paths_chunk_size_above_a_1500_byte_paths_or_too_small_for_the_header_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, _b, _wire_a, wire_b, ka, _kb = pair
    for bad in (CHUNK + 1, CHUNK_HEADER.size):
        with pytest.raises(ValueError, match="chunk size"):
            a.engine.set_link(B_ID, ka, 11, 22, (*wire_b.endpoint, bad), 0, True, -1)


def test_small_datagrams_to_one_peer_leave_in_order(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, wire_a, wire_b, _ka, _kb = pair
    frames = [frame(A_IP, B_IP, i.to_bytes(2, "big") * 16) for i in range(50)]
    for f in frames:
        a.kernel.send(f)
    counters = []
    for _ in frames:
        d = wire_b.recv()
        counters.append(decode_transport_header(d)[1])
        wire_a.send_to(b, d)
    assert counters == list(range(50))
    assert [b.kernel.recv(70000)[14:] for _ in frames] == [f[14:] for f in frames]


def test_a_dropped_link_or_flow_sends_nothing_more(pair) -> None:  # type: ignore[no-untyped-def]
    a, _b, _wire_a, wire_b, ka, _kb = pair
    assert a.engine.drop_link(B_ID) and not a.engine.drop_link(B_ID)
    f = frame(A_IP, B_IP)
    a.kernel.send(f)
    assert [m[1] for m in a.up_messages() if m[0] == 2] == [f]
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.drop_flow(B_IP)
    a.kernel.send(f)
    assert [m[1] for m in a.up_messages() if m[0] == 2] == [f]


def test_an_old_flow_is_used_while_python_is_asked_to_check_it() -> None:
    a = Node(A_ID, A_IP)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 0.5, 0)  # checked after 0.5 s, used without an answer to 1 s
    a.engine.start()
    try:
        time.sleep(0.6)
        a.kernel.send(frame(A_IP, B_IP))
        assert wire_b.recv()  # sent on the old flow
        assert (4, B_IP.to_bytes(4, "big")) in a.up_messages(0.1)  # and Python asked
        a.kernel.send(frame(A_IP, B_IP))
        assert wire_b.recv()
        assert not [m for m in a.up_messages(0.05) if m[0] == 4]  # once
        time.sleep(0.4)  # past twice the TTL: no longer used without Python's answer
        a.kernel.send(frame(A_IP, B_IP))
        assert [m[0] for m in a.up_messages()].count(2) == 1
    finally:
        a.close()
        wire_b.sock.close()


def test_routes_that_change_leave_every_flow_in_use_while_python_checks_it() -> None:
    a = Node(A_ID, A_IP)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        a.engine.recheck_flows()
        for _ in range(3):
            a.kernel.send(frame(A_IP, B_IP))
            assert wire_b.recv()  # on the flow, not up
        ups = a.up_messages(0.1)
        assert [m for m in ups if m[0] == 2] == []
        assert [m for m in ups if m[0] == 4] == [(4, B_IP.to_bytes(4, "big"))]  # Python asked, once
    finally:
        a.close()
        wire_b.sock.close()


def test_frames_to_an_address_without_a_flow_wait_for_python_to_take_the_first_then_leave_on_its_flow() -> None:
    """Only the first frame to an address without a flow goes up: the Engine holds the next ones until Python
    has taken it, and sends them on the flow Python set meanwhile, in order and after it."""
    a = Node(A_ID, A_IP, hold_limit=30.0)  # the test's pauses must not reach it
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    opener = Keys(bytes(range(100, 132)), bytes(range(32)))
    a.engine.start()
    try:
        a.kernel.send(frame(A_IP, B_IP, b"\x00" * 32))
        ((first, _),) = frames_up(a)
        for i in range(1, 4):
            a.kernel.send(frame(A_IP, B_IP, bytes([i]) * 32))
        assert frames_up(a, 0.1) == []
        wire_b.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            wire_b.recv()
        assert a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, first) is True  # it took the first
        wire_b.sock.settimeout(TIMEOUT)
        got = [wire_b.recv() for _ in range(3)]
        assert [opener.open(d, decode_transport_header(d)[1])[ROUTED_HEADER.size + 20 :] for d in got] == [
            bytes([i]) * 32 for i in range(1, 4)
        ]
        counters = a.engine.counters()
        assert counters["flows asked of Python"] == 1 and counters["frames held for order"] == 3
        assert counters["frames passed up"] == 1 and counters["flows waiting for Python"] == 0
    finally:
        a.close()
        wire_b.sock.close()


def test_frames_to_two_addresses_of_one_flow_slot_stay_in_order_while_one_is_asked_for() -> None:
    """Held frames are kept per flow slot (4,096 of them, direct-mapped): a frame to another address of the
    slot goes behind them, so that its own ask cannot make the slot's next frame to the first address overtake
    the held ones."""
    a = Node(A_ID, A_IP, hold_limit=30.0, prefix_len=16)  # the test's pauses must not reach it
    d_ip = B_IP + 4096  # 10.9.16.2: B's slot
    a.engine.start()
    try:
        b1, b2, d1, b3 = (frame(A_IP, ip, bytes([i]) * 32) for i, ip in enumerate((B_IP, B_IP, d_ip, B_IP)))
        a.kernel.send(b1)
        ((first, _),) = frames_up(a)  # it asks
        for f in (b2, d1, b3):
            a.kernel.send(f)
        assert frames_up(a, 0.1) == []  # all held behind b2, D's frame too
        a.engine.sent(first)  # Python took b1 and set no flow
        assert [f for _, f in frames_up(a)] == [b2, d1, b3]
    finally:
        a.close()


def frames_up(node: Node, timeout: float = 0.3) -> list[tuple[int, bytes]]:
    """The frames the Engine passed up since the last call: (number, frame)."""
    out: list[tuple[int, bytes]] = []
    node.up.settimeout(timeout)
    try:
        while True:
            msg = node.up.recv(70000)
            if msg[0] == 2:
                out.append((int.from_bytes(msg[4:8], "big"), msg[UP_HEADER:]))
    except TimeoutError:
        return out


def test_a_flow_set_while_its_frames_are_on_their_way_up_holds_the_next_ones_until_python_sent_those() -> None:
    """Python sets a flow after sending a frame that went up; frames to that address that went up after it are
    still on their way through Python: the Engine holds the next ones, in order, until Python says it has sent
    those. Another member's flow is not held up by it."""
    a = Node(A_ID, A_IP, hold_limit=30.0)  # the test's pauses must not reach it
    wire_b, wire_c = Wire(), Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.set_link(C_ID, Keys(bytes(32), bytes(32)), 12, 23, wire_c.endpoint, 0, True, -1)
    a.engine.set_flow(C_IP, C_ID, header(A_ID, C_ID), 30.0, 0)
    a.engine.start()
    opener = Keys(bytes(range(100, 132)), bytes(range(32)))

    def payload(datagram: bytes) -> bytes:
        """The IPv4 packet's payload in a datagram the Engine sent to B."""
        return opener.open(datagram, decode_transport_header(datagram)[1])[ROUTED_HEADER.size + 20 :]

    try:
        a.kernel.send(frame(A_IP, B_IP, bytes([0]) * 32))
        up = frames_up(a)  # the first frame without a flow asks Python
        for i in range(1, 3):
            a.kernel.send(frame(A_IP, B_IP, bytes([i]) * 32))
        assert frames_up(a, 0.05) == []  # the next ones wait for its answer
        a.engine.sent(up[0][0])  # Python took it and set no flow (its address was being looked up, say)
        up += frames_up(a)  # so they go up behind it
        assert [f for _, f in up] == [frame(A_IP, B_IP, bytes([i]) * 32) for i in range(3)]
        seqs = [q for q, _ in up]
        assert seqs == sorted(set(seqs))
        # Python has sent the first only: the flow waits.
        assert a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, seqs[0]) is False
        for i in range(3, 6):
            a.kernel.send(frame(A_IP, B_IP, bytes([i]) * 32))
        a.kernel.send(frame(A_IP, C_IP))  # another member's flow, in use: it passes B's held frames
        assert wire_c.recv()
        a.engine.sent(seqs[1])  # not yet far enough
        wire_b.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            wire_b.recv()
        assert frames_up(a, 0.05) == []
        a.engine.sent(seqs[2])  # Python sent what went up: the held frames leave, in order
        wire_b.sock.settimeout(TIMEOUT)
        assert [payload(wire_b.recv()) for _ in range(3)] == [bytes([i]) * 32 for i in range(3, 6)]
        a.kernel.send(frame(A_IP, B_IP, b"\x06" * 32))  # and the flow is in use
        assert payload(wire_b.recv()) == b"\x06" * 32
        assert frames_up(a, 0.1) == []
        counters = a.engine.counters()
        assert counters["flows asked of Python"] == 1 and counters["flows waiting for Python"] == 1
        assert counters["frames held for order"] == 2 + 3  # B's; C's frame was not held behind them
        # Nothing on its way up: a flow set now is in use at once.
        assert a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, seqs[2]) is True
    finally:
        a.close()
        wire_b.sock.close()
        wire_c.sock.close()


def test_frames_held_for_a_flow_that_is_dropped_or_never_caught_up_with_go_up_in_order() -> None:
    a = Node(A_ID, A_IP)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1)
    a.engine.start()
    try:
        for n, drop in enumerate((True, False), 1):
            a.kernel.send(frame(A_IP, B_IP, b"\x00" * 32))
            ((first, _),) = frames_up(a)
            assert a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, first - 1) is False
            held = [frame(A_IP, B_IP, bytes([i]) * 32) for i in range(1, 4)]
            for f in held:
                a.kernel.send(f)
            deadline = time.monotonic() + TIMEOUT
            while a.engine.counters()["frames held for order"] < 3 * n and time.monotonic() < deadline:
                time.sleep(0.001)
            assert a.engine.counters()["frames held for order"] == 3 * n
            if drop:
                a.engine.drop_flow(B_IP)  # as a route change would: back to Python, behind the first
            # else: Python never says it sent `first`; after the hold limit (50 ms) they go up all the same
            assert [f for _, f in frames_up(a)] == held
            a.engine.drop_flow(B_IP)
        wire_b.sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            wire_b.recv()
    finally:
        a.close()
        wire_b.sock.close()


class PythonSide:
    """What overlay/fastpath.py drives, reduced to the data path's outbound half: each frame passed up is
    "sent" (plain, marked) through an underlay that holds what it sends until flush(), as the real one does
    with GSO, and the flow to its address is handed to the Engine as DataPath._send does."""

    def __init__(self, tap: socket.socket, udp: socket.socket, to: tuple[str, int]) -> None:
        self.tap = SimpleNamespace(fileno=tap.fileno, vnet_hdr=False)
        self.udp, self.to = udp, to
        self.source_of, self.address_int = None, A_IP
        self.vnic = SimpleNamespace(tap_mac=TAP_MAC, gateway_mac=DEFAULT_GATEWAY_MAC, address6=None, prefix6_len=64)
        self.hops = [0, 0]
        self.gso, self.chunk = True, CHUNK
        self.lane_socks: list[socket.socket] = []  # one Engine
        self.express_socks: list[socket.socket] = []  # none
        self.held: list[bytes] | None = None
        self.no_flow_until = 0.0  # until then the frames are sent here without a flow (an address looked up)
        self.fast: FastPath | None = None

    def fileno(self) -> int:
        return self.udp.fileno()

    def chunk_for(self, endpoint: tuple[str, int]) -> int:
        return CHUNK

    def forget_paths(self) -> None:
        pass

    def hold(self) -> None:
        self.held = []

    def flush(self) -> None:
        for d in self.held or []:
            self.udp.sendto(d, self.to)
        self.held = None

    def from_tap(self, frames: list[bytes]) -> None:
        assert self.fast is not None and self.held is not None
        for f in frames:
            self.held.append(b"PY" + f[14:])
            if time.monotonic() >= self.no_flow_until:
                self.fast.set_flow(B_IP, B_ID, header(A_ID, B_ID))
        time.sleep(0.001)  # the Python path is slower than the Engine: more frames go up meanwhile


def test_what_an_engine_passes_up_is_handled_in_its_lane_and_written_by_its_queue() -> None:
    """With two lanes, a frame read from the TAP's second queue goes up through Engine 1, and the Python path
    handles it with SEND_LANE at 1 and the TAP writing through queue 1 (what it sends is sealed in lane 1, what it
    delivers enters by that queue), then both go back to lane 0: a flow keeps the lane the TAP gave it."""
    taps = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    udps = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for (_, tap), udp in zip(taps, udps, strict=True):
        udp.bind(("127.0.0.1", 0))
        tap.setblocking(False)
        udp.setblocking(False)
    side = PythonSide(taps[0][1], udps[0], ("127.0.0.1", 9))
    queues: list[int] = []
    side.tap = SimpleNamespace(
        fileno=taps[0][1].fileno, vnet_hdr=False, queues=(taps[1][1].fileno(),), use_queue=queues.append
    )
    side.lane_socks = [udps[1]]
    seen: list[tuple[int, list[int]]] = []
    side.from_tap = lambda frames: seen.append((SEND_LANE.get(), list(queues)))  # type: ignore[method-assign]
    fast = side.fast = FastPath(SimpleNamespace(links={}), side, None, side, lambda link: 0.0, A_ID, 24)  # type: ignore[arg-type]
    lane = fast._lanes[1]
    lane.engine.start()
    try:
        taps[1][0].send(frame(A_IP, B_IP))  # no flow: it goes up
        assert select.select([lane.up], [], [], TIMEOUT)[0]
        fast._drain(lane)
        assert seen == [(1, [1])] and queues == [1, 0] and SEND_LANE.get() == 0
    finally:
        for each in fast._lanes:
            each.engine.stop()
            each.up.close()
            each.engine_end.close()
        for pair in taps:
            for s in pair:
                s.close()
        for udp in udps:
            udp.close()


def test_packets_the_python_path_sent_are_not_overtaken_when_the_engine_takes_their_flow_over() -> None:
    """Frames stream into the TAP while the driver hands a new flow to the Engine: every packet must leave in
    the order it was written, whichever side sent it."""
    kernel, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tap.setblocking(False)
    udp.setblocking(False)
    wire_b = Wire()
    wire_b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    side = PythonSide(tap, udp, wire_b.sock.getsockname())
    fast = side.fast = FastPath(SimpleNamespace(links={}), side, None, side, lambda link: 0.0, A_ID, 24)  # type: ignore[arg-type]
    fast._sync_macs()
    ka, _ = session_pair()
    state = fast._pushed[B_ID] = LinkState(ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, False)
    fast._lanes[0].engine.set_link(B_ID, *state)
    fast._lanes[0].engine.start()
    opener = Keys(bytes(range(100, 132)), bytes(range(32)))
    count = 3000

    def write() -> None:
        for i in range(count):
            kernel.send(frame(A_IP, B_IP, i.to_bytes(4, "big") * 8))
            if i % 10 == 9:
                time.sleep(0.001)

    kernel.settimeout(5.0)
    writer = threading.Thread(target=write)
    writer.start()
    order, by_python = [], 0
    try:
        deadline, next_drop, drops = time.monotonic() + 20, time.monotonic(), 0
        while len(order) < count and time.monotonic() < deadline:
            if select.select([fast._lanes[0].up], [], [], 0.01)[0]:
                fast._drain(fast._lanes[0])
            if time.monotonic() > next_drop:
                # The flow goes (its link did, say): the next frame asks Python; every other time Python sends
                # without a flow for 5 ms, so frames go up meanwhile and are on their way when it sets one.
                fast._lanes[0].engine.drop_flow(B_IP)
                if drops % 2:
                    side.no_flow_until = time.monotonic() + 0.005
                drops += 1
                next_drop += 0.02
            wire_b.sock.settimeout(0)
            try:
                while True:
                    d = wire_b.sock.recv(70000)
                    if d.startswith(b"PY"):
                        by_python += 1
                        packet = d[2:]
                    else:
                        packet = opener.open(d, decode_transport_header(d)[1])[len(header(A_ID, B_ID)) :]
                    order.append(int.from_bytes(packet[28:32], "big"))
            except BlockingIOError:
                pass
    finally:
        writer.join()
        held = fast._lanes[0].engine.counters()
        fast._lanes[0].engine.stop()
        for s in (kernel, tap, udp, wire_b.sock, fast._lanes[0].up, fast._lanes[0].engine_end):
            s.close()
    assert order == list(range(count))
    assert 0 < by_python < count  # both sides sent: the flow was handed over while frames kept coming
    assert held["flows asked of Python"] > 0  # the flow was asked for, its next frames held for the answer,
    assert held["flows waiting for Python"] > 0  # and set at times while frames to it were on their way up


class Driven:
    """B's Engine under its driver (overlay/fastpath.py), with one link: to A, at the test socket `wire_a`, in a
    group with certificates (`certified`: the address each peer's certificate gives it, as learnt)."""

    def __init__(self) -> None:
        self.kernel, self.tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        for s in (self.tap, self.udp):
            s.setblocking(False)
        self.kernel.settimeout(TIMEOUT)
        self.wire_a = Wire()
        side = PythonSide(self.tap, self.udp, self.wire_a.sock.getsockname())
        side.address_int = B_IP
        self.certified: dict[int, int] = {}
        side.source_of = self.certified.get  # type: ignore[assignment]
        self.ka, kb = session_pair()
        session = Session(22, 11, b"a" * 32, False, kb)
        path = UdpPath(side, self.wire_a.sock.getsockname())  # type: ignore[arg-type]
        self.link = Link(A_ID, b"a" * 32, session, path, 0.0)
        self.switched: list[int] = []
        links = SimpleNamespace(links={A_ID: self.link}, next_used=self.switched.append)
        router = SimpleNamespace(on_sent=lambda link, busy: None)
        self.fast = FastPath(links, side, router, side, lambda link: 0.0, B_ID, 24)  # type: ignore[arg-type]
        self.fast._sync_macs()
        self.fast.link_changed(A_ID)
        self.fast._lanes[0].engine.start()
        self.up = self.fast._lanes[0].up
        self.up.setblocking(True)
        self.up.settimeout(TIMEOUT)

    def send_from_a(self, keys: Keys, index: int, body: bytes) -> None:
        self.wire_a.sock.sendto(keys.seal(0x83, index, body), self.udp.getsockname())

    def close(self) -> None:
        self.fast._lanes[0].engine.stop()
        for s in (
            self.kernel,
            self.tap,
            self.udp,
            self.wire_a.sock,
            self.fast._lanes[0].up,
            self.fast._lanes[0].engine_end,
        ):
            s.close()


@pytest.fixture
def driven() -> Iterator[Driven]:
    d = Driven()
    yield d
    d.close()


BODY_A_TO_B = header(A_ID, B_ID) + frame(A_IP, B_IP)[14:]


def test_a_link_whose_senders_certificate_is_learnt_later_moves_to_the_engine_at_the_next_sync(
    driven: Driven,
) -> None:
    """In a group with certificates the Engine delivers a peer's data only once it knows the address the peer's
    certificate gives it; until then the data goes up. The driver pushes the link again when it learns it."""
    driven.send_from_a(driven.ka, 22, BODY_A_TO_B)
    assert driven.up.recv(70000)[0] == 1  # up: the Engine cannot check the source yet
    driven.certified[A_ID] = A_IP
    driven.fast.sync()
    driven.send_from_a(driven.ka, 22, BODY_A_TO_B)
    assert driven.kernel.recv(70000)[14:] == BODY_A_TO_B[ROUTED_HEADER.size :]


def test_the_peers_first_packet_on_the_session_we_answered_its_rekey_with_moves_the_link_over(
    driven: Driven,
) -> None:
    """The responder's Engine opens the next session itself (its packets are not passed up to be overtaken by
    the ones after them), and tells the driver, which moves the link to it as the Python path would."""
    driven.certified[A_ID] = A_IP
    new_a = Keys(bytes(range(50, 82)), bytes(range(150, 182)))
    new_b = Keys(bytes(range(150, 182)), bytes(range(50, 82)))
    driven.link.next_session = Session(23, 12, b"a" * 32, False, new_b)
    driven.fast.link_changed(A_ID)
    assert driven.fast._pushed[A_ID].next == (new_b, 23)
    driven.fast.sync()
    assert driven.switched == []  # nothing on it yet
    for keys, index in ((driven.ka, 22), (new_a, 23)):
        driven.send_from_a(keys, index, BODY_A_TO_B)
        assert driven.kernel.recv(70000)[14:] == BODY_A_TO_B[ROUTED_HEADER.size :]
    driven.fast.sync()
    assert driven.switched == [A_ID]
    driven.fast.sync()
    assert driven.switched == [A_ID]  # said once


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=1600), min_size=1, max_size=8), st.binary(max_size=300))
def test_any_bytes_from_a_peer_or_the_tap_go_up_or_are_dropped_and_the_engine_keeps_working(
    pair,  # type: ignore[no-untyped-def]
    datagrams: list[bytes],
    junk_frame: bytes,
) -> None:
    a, b, wire_a, wire_b, ka, _kb = pair
    for d in datagrams:
        # Raw bytes, and the same bytes sealed as a message of the link and as a TUNNEL packet's head and inner
        # packet (past the authentication).
        wire_a.send_to(b, d)
        wire_a.send_to(b, ka.seal(0x83, 22, d))
        if len(d) >= 16:
            wire_a.send_to(b, ka.seal_header(22, d[:RELAY_HEAD], d[RELAY_HEAD:] + d, PacketType.TUNNEL))
            kind = LinkMsg.RELAY if d[0] & 1 else LinkMsg.RELAYED
            wire_a.send_to(b, ka.seal_header(22, relay_head(kind, A_ID), b"\x83" + d, PacketType.TUNNEL))
    if junk_frame:
        b.kernel.send(junk_frame)
    b.kernel.settimeout(0.05)
    try:
        while True:
            b.kernel.recv(70000)  # whatever random bytes happened to be valid data for B
    except TimeoutError:
        pass
    b.kernel.settimeout(TIMEOUT)
    a.kernel.send(frame(A_IP, B_IP, b"still alive"))
    wire_a.send_to(b, wire_b.recv())
    assert b.kernel.recv(70000)[14:] == frame(A_IP, B_IP, b"still alive")[14:]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(min_size=32, max_size=20_000),
    st.integers(min_value=CHUNK_HEADER.size + 1, max_value=CHUNK),
    st.sampled_from(["raw", "chunks", "tunnel", "tunnel, any head"]),
    st.booleans(),
)
def test_any_gso_train_from_a_peer_goes_up_is_passed_on_or_is_dropped_and_the_engine_keeps_working(
    pair,  # type: ignore[no-untyped-def]
    body: bytes,
    segment: int,
    form: str,
    same_chunk_onward: bool,
) -> None:
    """What UDP GRO hands the Engine in one read: raw bytes, chunks of anything, chunks of a TUNNEL packet to
    relay (to C, on a path that takes chunks of the size they came in, or smaller ones). Whatever it makes of
    them, a good train is relayed whole afterwards and data still reaches the TAP."""
    a, b, wire_a, wire_b, ka, _kb = pair
    b.udp.setsockopt(17, 104, 1)  # UDP_GRO (linux/udp.h)
    wire_c = Wire()
    try:
        onward = (*wire_c.endpoint, segment if same_chunk_onward else max(CHUNK_HEADER.size + 1, segment - 1))
        b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, onward, 0, True, -1, True)

        def train(d: bytes, size: int) -> None:
            gso = [(17, 103, struct.pack("=H", size))]  # UDP_SEGMENT
            wire_a.sock.sendmsg([d], gso, 0, ("127.0.0.1", b.port))

        if form == "raw":
            if len(body) > segment and -(-len(body) // segment) <= 64:
                train(body, segment)
        else:
            packet = body
            if form == "tunnel":
                packet = ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), b"\x83" + body, PacketType.TUNNEL)
            elif form == "tunnel, any head" and len(body) > RELAY_HEAD:
                packet = ka.seal_header(22, body[:RELAY_HEAD], body[RELAY_HEAD:], PacketType.TUNNEL)
            if 1 < -(-len(packet) // (segment - CHUNK_HEADER.size)) <= 64:
                train(split(packet, len(body), segment), segment)
        b.up_messages(0.02)
        wire_c.sock.settimeout(0.02)
        with contextlib.suppress(TimeoutError):
            while True:
                wire_c.recv()
        wire_c.sock.settimeout(TIMEOUT)
        inner = Keys(bytes([4]) * 32, bytes([5]) * 32).seal(0x83, 44, bytes(range(256)) * 20)
        good = ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), inner, PacketType.TUNNEL)
        b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, wire_c.endpoint, 0, True, -1, True)
        train(split(good, 9, CHUNK), CHUNK)
        reassembly, whole = Reassembly({}), None
        while whole is None:
            whole = reassembly.add(wire_c.recv(), ("127.0.0.1", 1), 0.0)
        assert whole[TUNNEL_OFFSET:] == inner
        a.kernel.send(frame(A_IP, B_IP, b"still alive"))
        wire_a.send_to(b, wire_b.recv())
        assert b.kernel.recv(70000)[14:] == frame(A_IP, B_IP, b"still alive")[14:]
    finally:
        wire_c.sock.close()


def chunks_of(datagram: bytes, message_id: int, size: int = CHUNK) -> list[bytes]:
    """`datagram` as the chunks a GSO send of it puts on the wire, each its own datagram."""
    train = split(datagram, message_id, size)
    return [train[o : o + size] for o in range(0, len(train), size)]


def big_data(keys: Keys, payload_size: int = 10_000, counter_note: bytes = b"") -> tuple[bytes, bytes]:
    """A link packet of data from A for B bigger than a chunk, and the frame B writes for it."""
    f = frame(A_IP, B_IP, counter_note + bytes(i % 251 for i in range(payload_size)))
    return keys.seal(0x83, 22, header(A_ID, B_ID) + f[14:]), TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00" + f[14:]


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled, some twice", "on a 1,000-byte path"])
def test_chunks_that_arrive_one_by_one_are_rebuilt_by_the_engine_and_delivered(pair, order: str) -> None:  # type: ignore[no-untyped-def]
    """Where no GRO coalesces a message's chunks (the path's NIC or kernel, a NAPI poll ending inside one), each
    arrives alone: the Engine rebuilds the message itself and delivers it; nothing goes up to Python."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    datagram, expected = big_data(ka)
    chunks = chunks_of(datagram, 7, 1000 if order == "on a 1,000-byte path" else CHUNK)
    if order == "reversed":
        chunks.reverse()
    elif order == "shuffled, some twice":
        chunks = [chunks[i] for i in (3, 0, 5, 0, 1, 6, 2, 4, 6)] + chunks[7:]
    for c in chunks:
        wire_a.send_to(b, c)
    assert b.kernel.recv(70000) == expected
    assert not [m for m in b.up_messages(0.1) if m[0] == 1]
    counters = b.engine.counters()
    assert counters["chunks: messages rebuilt"] == 1
    assert counters["chunks: messages dropped (incomplete or inconsistent)"] == 0


def test_a_tunnel_packet_whose_chunks_arrive_one_by_one_is_passed_on(pair) -> None:  # type: ignore[no-untyped-def]
    """A relay rebuilds a TUNNEL packet whose chunks came one by one and passes it on to the link its head names,
    in chunks for that path, with only the head sealed anew."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    wire_c = Wire()
    try:
        b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, wire_c.endpoint, 0, True, -1, True)
        inner = Keys(bytes([4]) * 32, bytes([5]) * 32).seal(0x83, 44, bytes(range(256)) * 20)
        for c in reversed(chunks_of(ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), inner, PacketType.TUNNEL), 3)):
            wire_a.send_to(b, c)
        reassembly, whole = Reassembly({}), None
        while whole is None:
            whole = reassembly.add(wire_c.recv(), ("127.0.0.1", 1), 0.0)
        assert whole[0] == PacketType.TUNNEL and whole[TUNNEL_OFFSET:] == inner
        counters = b.engine.counters()
        assert (counters["relayed"], counters["chunks: messages rebuilt"]) == (1, 1)
        assert not [m for m in b.up_messages(0.1) if m[0] == 1]
    finally:
        wire_c.sock.close()


def test_chunks_of_two_sources_with_one_message_id_are_not_mixed(pair) -> None:  # type: ignore[no-untyped-def]
    """A message is its source's and its ID's: a stranger's chunks with the same ID, interleaved, rebuild the
    stranger's own message (which goes up whole, as anything from an address no link points at) and A's data
    is delivered."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    datagram, expected = big_data(ka)
    stranger_datagram = b"\x83" + bytes(range(256)) * 40
    ours, theirs = chunks_of(datagram, 9), chunks_of(stranger_datagram, 9)
    stray = Wire()
    try:
        for i in range(max(len(ours), len(theirs))):
            if i < len(theirs):
                stray.send_to(b, theirs[i])
            if i < len(ours):
                wire_a.send_to(b, ours[i])
        assert b.kernel.recv(70000) == expected
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [stranger_datagram]
        assert b.engine.counters()["chunks: messages rebuilt"] == 2
    finally:
        stray.sock.close()


def test_chunks_that_disagree_or_never_complete_cost_their_message_and_the_state_stays_bounded(pair) -> None:  # type: ignore[no-untyped-def]
    """A chunk that names another count than its message's first drops the message (an ID reused after a
    loss) and begins its own; more unfinished messages than the Engine keeps (16) push the oldest out. Each is
    counted, and a whole message afterwards is still delivered."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    datagram, expected = big_data(ka)
    chunks = chunks_of(datagram, 5)

    def dropped(expected_count: int) -> bool:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if b.engine.counters()["chunks: messages dropped (incomplete or inconsistent)"] == expected_count:
                return True
            time.sleep(0.01)
        return False

    wire_a.send_to(b, chunks[0])
    wrong_count = bytearray(chunks[1])
    wrong_count[6] += 1
    wire_a.send_to(b, bytes(wrong_count))
    assert dropped(1)
    for message_id in range(100, 117):  # 17 more that never complete: with the one above, 18 for 16 places
        wire_a.send_to(b, chunks_of(datagram, message_id)[0])
    assert dropped(3)
    for c in chunks_of(datagram, 200):  # its first chunk pushes out one more
        wire_a.send_to(b, c)
    assert b.kernel.recv(70000) == expected
    assert dropped(4)
    assert b.engine.counters()["chunks: messages rebuilt"] == 1
    assert not [m for m in b.up_messages(0.1) if m[0] == 1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3),  # message ID
            st.integers(min_value=0, max_value=70),  # index
            st.integers(min_value=0, max_value=70),  # count
            st.integers(min_value=0, max_value=CHUNK),  # payload bytes
        ),
        max_size=60,
    )
)
def test_any_chunks_from_a_peer_are_rebuilt_dropped_or_go_up_and_the_engine_keeps_working(
    pair,  # type: ignore[no-untyped-def]
    chunks: list[tuple[int, int, int, int]],
) -> None:
    _a, b, wire_a, _wire_b, ka, _kb = pair
    for message_id, index, count, size in chunks:
        wire_a.send_to(b, CHUNK_HEADER.pack(PacketType.CHUNK, message_id, index, count) + bytes([index]) * size)
    b.up_messages(0.02)
    datagram, expected = big_data(ka)
    for c in chunks_of(datagram, 1000):
        wire_a.send_to(b, c)
    assert b.kernel.recv(70000) == expected


# A TCPv4 segmentation header as the kernel writes one: NEEDS_CSUM, TCPV4, headers 54 bytes, MSS 1400, the TCP
# checksum at 34 + 16 (after the Ethernet and IPv4 headers).
VNET_TSO = struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 16)


@contextlib.contextmanager
def offload_pair(address6: tuple[int, int] | None = None) -> Iterator[tuple[Node, Node, Keys]]:
    """A and B with offload (virtio headers), linked to each other's UDP sockets, B's with UDP GRO, and A's flow
    to B's address (IPv6 with `address6`, the two nodes' IPv6 addresses): super-frames from A to B."""
    a6, b6 = address6 or (None, None)
    a, b = Node(A_ID, A_IP, vnet=True, address6=a6), Node(B_ID, B_IP, vnet=True, address6=b6)
    try:
        b.udp.setsockopt(17, 104, 1)  # UDP_GRO (linux/udp.h)
        ka, kb = session_pair()
        a.engine.set_link(B_ID, ka, 11, 22, (4, socket.inet_aton("127.0.0.1"), b.port), 0, True, -1)
        b.engine.set_link(A_ID, kb, 22, 11, (4, socket.inet_aton("127.0.0.1"), a.port), 0, True, -1)
        a.engine.set_flow(B_IP if b6 is None else b6, B_ID, header(A_ID, B_ID), 30.0, 0)
        a.engine.start()
        b.engine.start()
        yield a, b, ka
    finally:
        a.close()
        b.close()


def test_a_super_frame_crosses_two_engines_whole_and_is_written_with_its_virtio_header() -> None:
    """Sender and receiver both Engines, the receiver's socket with UDP GRO: the chunks of one GSO send arrive
    coalesced, are opened where they lie and written to the TAP as one frame with the sender's virtio_net_hdr,
    whatever the last chunk holds: the tag in one chunk, split across two, or a chunk filled exactly."""
    with offload_pair() as (a, b, ka):
        crosses_whole(a, b, ka)


def crosses_whole(a: Node, b: Node, ka: Keys) -> None:
    part = CHUNK - CHUNK_HEADER.size
    fixed = len(ka.seal(0x83, 0, b"")) + ROUTED_HEADER.size + len(VNET_TSO) + 20
    sizes = [1000, 20_000, 59_000, *(part * k + rest - fixed for k, rest in ((14, 5), (30, 0), (40, 16), (40, 17)))]
    for size in sizes:
        payload = bytes(i % 251 for i in range(size))
        vnet = VNET_TSO
        f = frame(A_IP, B_IP, payload, vnet=vnet)
        a.kernel.send(f)
        got = b.kernel.recv(70000)
        assert got[:10] == vnet and got[10:] == TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00" + f[10 + 14 :]
    assert not [m for m in b.up_messages(0.1) if m[0] == 1]  # nothing needed the Python path


@pytest.mark.parametrize("onward_chunk", [CHUNK, 1000], ids=["same chunk size onward", "smaller chunks onward"])
def test_a_relay_engine_passes_a_tunnelled_super_frame_on_and_the_far_engine_delivers_it_whole(
    onward_chunk: int,
) -> None:
    """A -> B -> C over real sockets with UDP GRO, A's link to C a tunnel through B. Where B's path to C takes
    chunks of the size that came in, B passes the chunk train on as it came (only the relay head sealed anew and
    the message ID its own); else it joins the packet and chunks it again for that path. Either way C gets
    every super-frame whole, whatever its last chunk holds: the tunnel packet's tag in one chunk, split across
    two, or a chunk filled exactly. A train whose inner packet was changed on the way is not passed on."""
    a, b, c = Node(A_ID, A_IP, vnet=True), Node(B_ID, B_IP, vnet=True), Node(C_ID, C_IP, vnet=True)
    for n in (b, c):
        n.udp.setsockopt(17, 104, 1)  # UDP_GRO (linux/udp.h)
    ab, ba = session_pair()
    bc, cb = Keys(bytes(32), bytes([1]) * 32), Keys(bytes([1]) * 32, bytes(32))
    ac, ca = Keys(bytes([2]) * 32, bytes([3]) * 32), Keys(bytes([3]) * 32, bytes([2]) * 32)

    def at(n: Node, chunk: int = CHUNK) -> tuple[int, bytes, int, int]:
        return (4, socket.inet_aton("127.0.0.1"), n.port, chunk)

    a.engine.set_link(B_ID, ab, 1, 2, at(b), 0, True, -1, True)
    a.engine.set_link(C_ID, ac, 5, 6, None, B_ID, True, -1)
    b.engine.set_link(A_ID, ba, 2, 1, at(a), 0, True, -1, True)
    b.engine.set_link(C_ID, bc, 3, 4, at(c, onward_chunk), 0, True, -1, True)
    c.engine.set_link(B_ID, cb, 4, 3, at(b), 0, True, -1, True)
    c.engine.set_link(A_ID, ca, 6, 5, None, B_ID, True, -1)
    a.engine.set_flow(C_IP, C_ID, header(A_ID, C_ID), 30.0, 0)
    for n in (a, b, c):
        n.engine.start()
    # The tunnel packet B gets: its relay head, then A's sealed link packet to C of the routed header, the
    # virtio header and the IPv4 packet. Sizes chosen for what the last of the 1,465-byte chunk payloads holds.
    part = CHUNK - CHUNK_HEADER.size
    fixed = TUNNEL_OFFSET + len(ac.seal(0x83, 0, b"")) + ROUTED_HEADER.size + len(VNET_TSO) + 20
    sizes = [20_000, *(part * k + rest - fixed for k, rest in ((14, 5), (30, 0), (40, 16), (40, 17)))]
    try:
        for size in sizes:
            f = frame(A_IP, C_IP, bytes(i % 251 for i in range(size)), vnet=VNET_TSO)
            a.kernel.send(f)
            got = c.kernel.recv(70000)
            assert got[:10] == VNET_TSO and got[10:] == TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00" + f[10 + 14 :]
        counters = b.engine.counters()
        assert counters["relayed"] == len(sizes)
        passed_whole = counters["relayed: chunk trains passed on as they came"]
        assert passed_whole == (len(sizes) if onward_chunk == CHUNK else 0)
        assert not [m for n in (b, c) for m in n.up_messages(0.1) if m[0] == 1]  # nothing needed Python
    finally:
        for n in (a, b, c):
            n.close()


def test_a_relayed_chunk_train_whose_head_does_not_open_goes_up_joined_and_is_not_passed_on(pair) -> None:  # type: ignore[no-untyped-def]
    """The relay head is bound to the inner packet's tag, which is in the train's last chunk: a train with a
    changed tag goes up (joined, as the Python path reads chunks) for Python to count, and C hears nothing;
    the same train unchanged is passed on, its inner packet untouched."""
    _a, b, wire_a, _wire_b, ka, _kb = pair
    b.udp.setsockopt(17, 104, 1)  # UDP_GRO (linux/udp.h)
    wire_c = Wire()
    try:
        b.engine.set_link(C_ID, Keys(bytes([5]) * 32, bytes([4]) * 32), 33, 44, wire_c.endpoint, 0, True, -1, True)
        inner = Keys(bytes([4]) * 32, bytes([5]) * 32).seal(0x83, 44, bytes(range(256)) * 80)
        good = ka.seal_header(22, relay_head(LinkMsg.RELAY, C_ID), inner, PacketType.TUNNEL)
        for d in (good[:-1] + bytes([good[-1] ^ 1]), good):
            gso = [(17, 103, struct.pack("=H", CHUNK))]  # UDP_SEGMENT
            wire_a.sock.sendmsg([split(d, 77, CHUNK)], gso, 0, ("127.0.0.1", b.port))
            if d is not good:
                assert [m[1] for m in b.up_messages() if m[0] == 1] == [d]
                continue
            reassembly, whole = Reassembly({}), None
            while whole is None:
                whole = reassembly.add(wire_c.recv(), ("127.0.0.1", 1), 0.0)
            reader = Keys(bytes([4]) * 32, bytes([5]) * 32)
            index, counter = decode_transport_header(whole)
            assert index == 44 and whole[TUNNEL_OFFSET:] == inner
            assert reader.open_header(whole, counter, TUNNEL_LINK_PART) == relay_head(LinkMsg.RELAYED, A_ID)
        assert b.engine.counters()["relayed: chunk trains passed on as they came"] == 1
        wire_c.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            wire_c.recv()
    finally:
        wire_c.sock.close()


@pytest.mark.parametrize(
    "tap_offload, vnet",
    [
        (False, VNET_TSO),  # a TAP without offload: Python cuts the segments
        (True, struct.pack("<BBHHHH", 4, 1, 54, 1400, 34, 16)),  # a flag that is not NEEDS_CSUM/DATA_VALID
        (True, struct.pack("<BBHHHH", 1, 3, 54, 1400, 34, 16)),  # UDP fragmentation offload: not ours to accept
        (True, struct.pack("<BBHHHH", 0, 1, 54, 1400, 0, 0)),  # segmentation without a checksum to complete
        (True, struct.pack("<BBHHHH", 1, 1, 54, 1400, 34, 60_000)),  # checksum offset outside the frame
    ],
    ids=["tap-without-offload", "flags", "gso-type", "no-checksum", "offset"],
)
def test_a_super_frame_the_engine_cannot_write_whole_goes_up_for_python(tap_offload: bool, vnet: bytes) -> None:
    """For a TAP without offload (Python segments it) or with a virtio_net_hdr the kernel would refuse (Python
    counts the drop), the datagram goes up as it came."""
    b = Node(B_ID, B_IP, vnet=tap_offload)
    wire_a = Wire()
    ka, kb = session_pair()
    b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)
    b.engine.start()
    try:
        body = ipv4_packet(A_IP, B_IP, 6, 64, bytes(3000))
        sent = ka.seal(0x83, 22, header(A_ID, B_ID, kind=Kind.DATA_GSO) + vnet + body)
        wire_a.send_to(b, sent)
        assert [m[1] for m in b.up_messages() if m[0] == 1] == [sent]
    finally:
        b.close()
        wire_a.sock.close()


# -- small UDP datagrams joined into one TAP write (USO) ------------------------------------------------------


def udp_datagram(
    src: int, dst: int, payload: bytes, *, sport: int = 4000, dport: int = 5000, df: bool = True, good: bool = True
) -> bytes:
    """An IPv4 UDP datagram with a right (or, good=False, wrong) UDP checksum."""
    ulen = 8 + len(payload)
    pseudo = struct.pack("!IIBBH", src, dst, 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    check = internet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check if good else check ^ 0x0101) + udp[8:]
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + ulen, 77, 0x4000 if df else 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return ip + udp


def segments(written: bytes) -> list[bytes]:
    """What the kernel makes of a TAP write: one datagram (after its virtio header and frame header), or the
    datagrams of a USO super-frame, cut at gso_size, each with its own length and the checksum completed (what
    __udp_gso_segment and a checksum-completing device do). IPv4 here, IPv6 in segments6."""
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack("<BBHHHH", written[:10])
    packet = written[10 + 14 :]
    if gso_type == 0:
        return [packet]
    if written[10 + 12 : 10 + 14] == b"\x86\xdd":
        return segments6(written)
    assert (flags, gso_type, hdr_len, start, offset) == (1, 5, 14 + 28, 14 + 20, 6)
    ip, udp, body = packet[:20], packet[20:28], packet[28:]
    assert internet_checksum(ip) == 0 and struct.unpack("!H", ip[2:4])[0] == len(packet)
    src, dst = struct.unpack("!II", ip[12:20])
    # The check field holds the pseudo-header's sum (not inverted) for the whole length: the kernel swaps in each.
    pseudo = struct.pack("!IIBBH", src, dst, 0, 17, 8 + len(body))
    assert struct.unpack("!H", udp[6:8])[0] == 0xFFFF - internet_checksum(pseudo)
    out = []
    for ident, at in enumerate(range(0, len(body), gso_size)):
        part = body[at : at + gso_size]
        ulen = 8 + len(part)
        u = udp[:4] + struct.pack("!HH", ulen, 0) + part
        check = internet_checksum(struct.pack("!IIBBH", src, dst, 0, 17, ulen) + u) or 0xFFFF
        u = u[:6] + struct.pack("!H", check) + u[8:]
        h = ip[:2] + struct.pack("!HH", 20 + ulen, (struct.unpack("!H", ip[4:6])[0] + ident) & 0xFFFF) + ip[6:10]
        h += b"\0\0" + ip[12:]
        out.append(h[:10] + struct.pack("!H", internet_checksum(h)) + h[12:] + u)
    return out


def segments6(written: bytes) -> list[bytes]:
    """segments() for an IPv6 USO super-frame: no ID and no header checksum; each datagram's payload length and
    UDP length are its own, and the checksum is completed over the IPv6 pseudo-header (RFC 8200 section 8.1)."""
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack("<BBHHHH", written[:10])
    assert (flags, gso_type, hdr_len, start, offset) == (1, 5, 14 + 48, 14 + 40, 6)
    packet = written[10 + 14 :]
    ip, udp, body = packet[:40], packet[40:48], packet[48:]
    assert struct.unpack("!H", ip[4:6])[0] == len(packet) - 40 == struct.unpack("!H", udp[4:6])[0]
    pseudo = ip[8:40] + struct.pack("!IxxxB", 8 + len(body), 17)
    assert struct.unpack("!H", udp[6:8])[0] == 0xFFFF - internet_checksum(pseudo)
    out = []
    for at in range(0, len(body), gso_size):
        part = body[at : at + gso_size]
        ulen = 8 + len(part)
        u = udp[:4] + struct.pack("!HH", ulen, 0) + part
        check = internet_checksum(ip[8:40] + struct.pack("!IxxxB", ulen, 17) + u) or 0xFFFF
        out.append(ip[:4] + struct.pack("!H", ulen) + ip[6:] + u[:6] + struct.pack("!H", check) + u[8:])
    return out


def without_id(datagram: bytes) -> bytes:
    """The datagram with its IPv4 ID and header checksum zeroed: what joining may change (DF is set). IPv6 has
    neither: it stays as it is."""
    if datagram[0] >> 4 == 6:
        return datagram
    return datagram[:4] + b"\0\0" + datagram[6:10] + b"\0\0" + datagram[12:]


def deliver_queued(
    datagrams: list[bytes], *, vnet: bool = True, address6: int | None = None
) -> tuple[list[bytes], dict[str, int]]:
    """Seal each datagram for B as A's link would, queue them all at B's UDP socket, then start B's Engine so it
    takes them in one batch; return what B wrote to its TAP, one entry per write, and B's counters. `address6`:
    B's IPv6 address, for IPv6 datagrams to it."""
    b = Node(B_ID, B_IP, vnet=vnet, address6=address6)
    wire_a = Wire()
    ka, kb = session_pair()
    b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1)
    try:
        for d in datagrams:
            wire_a.send_to(b, ka.seal(0x83, 22, header(A_ID, B_ID) + d))
        time.sleep(0.05)
        b.engine.start()
        writes: list[bytes] = []
        count = 0
        try:
            while count < len(datagrams):
                writes.append(b.kernel.recv(70000))
                count += len(segments(writes[-1])) if vnet else 1
            b.kernel.settimeout(0.05)
            writes.append(b.kernel.recv(70000))  # nothing more may come
        except TimeoutError:
            pass
        return writes, b.engine.counters()
    finally:
        b.close()
        wire_a.sock.close()


def test_small_udp_datagrams_of_one_flow_are_written_to_the_tap_as_one_uso_frame() -> None:
    """Ten datagrams of one flow (the last shorter) that arrive together leave in one TAP write, a USO super-frame
    the kernel cuts back into the same ten: the same payloads, ports and boundaries; only the IPv4 ID may differ."""
    sent = [udp_datagram(A_IP, B_IP, bytes([i]) * 41) for i in range(9)] + [udp_datagram(A_IP, B_IP, b"end")]
    writes, counters = deliver_queued(sent)
    assert len(writes) == 1
    assert writes[0][10:24] == TAP_MAC + DEFAULT_GATEWAY_MAC + b"\x08\x00"
    assert struct.unpack("<H", writes[0][4:6])[0] == 41  # gso_size: the first datagram's payload
    assert [without_id(d) for d in segments(writes[0])] == [without_id(d) for d in sent]
    assert counters["TAP: datagrams written joined"] == 10 and counters["TAP errors"] == 0


def test_what_may_not_join_is_written_as_it_came_and_splits_the_run() -> None:
    """Runs break at another flow, a longer datagram, a datagram after a shorter one; a datagram without DF, with a
    wrong checksum or alone is written exactly as it came. Order is kept throughout."""
    d = lambda payload, **kw: udp_datagram(A_IP, B_IP, payload, **kw)  # noqa: E731
    sent = [
        d(b"a" * 30), d(b"b" * 30),  # a run of two
        d(b"c" * 30, dport=5001),  # another flow: alone
        d(b"d" * 30), d(b"e" * 20), d(b"f" * 20),  # a run ends at a shorter datagram: f starts the next
        d(b"g" * 40),  # longer than the run's first
        d(b"h" * 30, df=False), d(b"i" * 30, good=False), d(b"j" * 30),
    ]  # fmt: skip
    writes, counters = deliver_queued(sent)
    got = [segments(w) for w in writes]
    assert [len(g) for g in got] == [2, 1, 2, 1, 1, 1, 1, 1]
    assert [without_id(x) for g in got for x in g] == [without_id(x) for x in sent]
    alone = [w[10 + 14 :] for w, g in zip(writes, got, strict=True) if len(g) == 1]
    assert alone == [sent[i] for i in (2, 5, 6, 7, 8, 9)]  # byte for byte, IDs and checksums too
    assert counters["TAP: datagrams written joined"] == 4


def test_a_tap_without_a_virtio_header_gets_each_datagram_alone() -> None:
    sent = [udp_datagram(A_IP, B_IP, bytes([i]) * 40) for i in range(5)]
    writes, counters = deliver_queued(sent, vnet=False)
    assert [w[14:] for w in writes] == sent
    assert "TAP: datagrams written joined" not in {k for k, v in counters.items() if v}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 1400), st.booleans(), st.booleans()), min_size=1, max_size=70)
)
def test_any_mix_of_datagrams_arrives_whole_and_in_order(mix: list[tuple[int, int, bool, bool]]) -> None:
    """Flows, sizes, DF and checksums at random: whatever was joined, the kernel's cut gives back every datagram
    in order."""
    sent = [
        udp_datagram(A_IP, B_IP, bytes([n % 251]) * size, dport=5000 + flow, df=df, good=good)
        for n, (flow, size, df, good) in enumerate(mix)
    ]
    writes, _ = deliver_queued(sent)
    assert [without_id(x) for w in writes for x in segments(w)] == [without_id(x) for x in sent]
