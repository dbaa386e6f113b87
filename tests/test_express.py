"""Express lanes (overlay/_fast.c, docs/datapath.md): a small packet of a flow that sent nothing bigger lately is
sealed in its lane's express lane, which the receiver steers to a socket its Engine reads first and a relay passes
on in its own express lane; a flow that sends big packets keeps every packet in its lane, in order. And the
Engines' threads: named by lane, with a short scheduler slice where the kernel offers one."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest

from overlay._fast import EXPRESS_LANES, Keys
from overlay.tap.frames import ipv4_packet
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.wire import decode_transport_header
from tests.test_fastpath import (
    A_ID,
    A_IP,
    B_ID,
    B_IP,
    C_IP,
    TAP_MAC,
    Node,
    Wire,
    frame,
    header,
    session_pair,
    tunnel_through_b,
)

EXPRESS_MAX = 256  # IP bytes (overlay/_engine.h)
SPARSE_S = 0.1  # SPARSE_NS
LANE_SHIFT = 56
IP_RECVERR = 11  # linux/in.h


def udp(port: int, size: int = 64) -> bytes:
    """A frame of one UDP flow (source port `port`) whose IP packet is `size` bytes."""
    return frame(A_IP, B_IP, struct.pack("!HHHH", port, 9, size - 20, 0) + bytes(size - 28))


def ping() -> bytes:
    echo = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + bytes(56)
    return DEFAULT_GATEWAY_MAC + TAP_MAC + b"\x08\x00" + ipv4_packet(A_IP, B_IP, 1, 64, echo)


def lane_of(datagram: bytes) -> int:
    return decode_transport_header(datagram)[1] >> LANE_SHIFT


def test_small_packets_of_quiet_flows_go_express_and_a_flow_that_sends_big_ones_keeps_its_lane() -> None:
    a = Node(A_ID, A_IP, express=True)
    wire_b = Wire()
    ka, _ = session_pair()
    opener = Keys(bytes(range(100, 132)), bytes(range(32)))
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()

    def sent(f: bytes) -> int:
        a.kernel.send(f)
        datagram = wire_b.recv()
        _, counter = decode_transport_header(datagram)
        assert opener.open(datagram, counter) == header(A_ID, B_ID) + f[14:]  # each lane's window takes it
        return lane_of(datagram)

    try:
        assert sent(ping()) == EXPRESS_LANES
        assert sent(udp(1000)) == EXPRESS_LANES
        assert sent(udp(1000, EXPRESS_MAX)) == EXPRESS_LANES
        assert sent(udp(1000, EXPRESS_MAX + 1)) == 0  # big: its flow leaves the express lane ...
        assert sent(udp(1000)) == 0  # ... its small packets too, never ahead of its big ones
        assert sent(udp(2000)) == EXPRESS_LANES  # another flow is not held back
        time.sleep(SPARSE_S * 1.5)
        assert sent(udp(1000)) == EXPRESS_LANES  # quiet long enough: express again
        a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, False)
        assert sent(udp(3000)) == 0  # a peer without lanes has no window for it
        assert a.engine.counters()["express: datagrams sent"] == 5
    finally:
        a.close()
        wire_b.sock.close()


def test_an_engine_without_an_express_socket_sends_nothing_express() -> None:
    a = Node(A_ID, A_IP)
    wire_b = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, wire_b.endpoint, 0, True, -1, False, None, None, True)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        a.kernel.send(ping())
        assert lane_of(wire_b.recv()) == 0
    finally:
        a.close()
        wire_b.sock.close()


def test_the_engine_reads_its_express_socket_before_what_waits_in_its_socket() -> None:
    """Thirty datagrams wait in B's socket and one in its express socket when its thread starts: the express one
    is written to the TAP first."""
    b = Node(B_ID, B_IP, express=True)
    wire_a = Wire()
    ka, kb = session_pair()
    b.engine.set_link(A_ID, kb, 22, 11, wire_a.endpoint, 0, True, -1, False, None, None, True)
    try:
        bulk = [ipv4_packet(A_IP, B_IP, 17, 64, struct.pack("!HHHH", 1, 9, 1008, 0) + bytes(1000))] * 30
        for packet in bulk:
            wire_a.send_to(b, ka.seal(0x83, 22, header(A_ID, B_ID) + packet))
        small = ipv4_packet(A_IP, B_IP, 17, 64, struct.pack("!HHHH", 2, 9, 8, 0))
        wire_a.sock.sendto(ka.seal(0x83, 22, header(A_ID, B_ID) + small, EXPRESS_LANES), ("127.0.0.1", b.xport))
        time.sleep(0.1)
        b.engine.start()
        written = [b.kernel.recv(70000)[14:] for _ in range(31)]
        assert written[0] == small
        assert written[1:] == bulk
        assert b.engine.counters()["express: datagrams read"] == 1
    finally:
        b.close()
        wire_a.sock.close()


def test_a_relay_passes_what_came_express_on_in_its_express_lane_and_the_rest_in_its_lane() -> None:
    (a, b, c), (w_ab, w_ba, w_bc, w_cb), _, _ = tunnel_through_b(True, True, lanes=True)
    try:
        for size, lane in ((64, EXPRESS_LANES), (1000, 0)):
            f = frame(A_IP, C_IP, bytes(size - 20))
            a.kernel.send(f)
            outer = w_ab.recv()
            assert lane_of(outer) == lane
            w_ba.sock.sendto(outer, ("127.0.0.1", b.xport if lane else b.port))  # as B's steering would
            onward = w_bc.recv()
            assert lane_of(onward) == lane
            w_cb.sock.sendto(onward, ("127.0.0.1", c.xport if lane else c.port))
            assert c.kernel.recv(70000)[14:] == f[14:]
        assert b.engine.counters()["express: datagrams sent"] == 1
        assert c.engine.counters()["express: datagrams read"] == 1
    finally:
        for n in (a, b, c):
            n.close()
        for w in (w_ab, w_ba, w_bc, w_cb):
            w.sock.close()


def engine_thread(name: str) -> Path:
    for _ in range(100):
        for task in Path("/proc/self/task").iterdir():
            if (task / "comm").read_text().strip() == name:
                return task
        time.sleep(0.01)
    raise AssertionError(f"no thread {name}")


def test_an_engines_thread_is_named_by_its_lane_and_asks_for_a_short_slice_keeping_its_nice_value() -> None:
    """EEVDF's custom slices came with Linux 6.12: there the thread runs with a 100 us slice (the kernel's own
    view, /proc/.../sched); before, it reports none. Its nice value stays the one it was started with."""
    a = Node(A_ID, A_IP, lane=2)
    try:
        before = os.nice(0)
        os.nice(3)  # the Engine's thread starts with it, as under `nice -n 3 ipop-overlay join`
        try:
            a.engine.start()
            task = engine_thread("ipop-lane2")
            deadline = time.monotonic() + 2
            while not a.engine.slice_ns and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.setpriority(os.PRIO_PROCESS, os.getpid(), before)  # the test's own thread back (root may lower it)
        nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == before + 3
        lines = (line.partition(":") for line in (task / "sched").read_text().splitlines())
        sched = {k.strip(): v.strip() for k, _, v in lines}
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        if (major, minor) >= (6, 12):
            assert a.engine.slice_ns == 100_000
            assert int(sched["se.slice"]) == 100_000
        else:
            assert a.engine.slice_ns == 0
    finally:
        a.close()


def test_an_icmp_error_queued_on_the_express_socket_is_read_and_the_thread_sleeps() -> None:
    """The kernel gives an ICMP error to any socket of the port's reuseport group (by hash: it has no payload to
    steer by), the express socket too. Its error queue is read like the other socket's: a queue left full keeps
    epoll waking the thread, which then spins (a 60-node lab's idle nodes took both cores)."""
    a = Node(A_ID, A_IP, express=True)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    try:
        a.xudp.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        a.engine.start()
        task = engine_thread("ipop-lane0")
        a.xudp.sendto(b"x", ("127.0.0.1", port))  # port unreachable, queued on the express socket
        deadline = time.monotonic() + 2
        while a.engine.counters()["ICMP: unreachable"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.engine.counters()["ICMP: unreachable"] == 1
        before = cpu_ticks(task)
        time.sleep(0.5)
        assert cpu_ticks(task) - before <= 5  # clock ticks of 10 ms: a spinning thread takes ~50
        with pytest.raises(BlockingIOError):
            a.xudp.recvmsg(1, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    finally:
        a.close()


def cpu_ticks(task: Path) -> int:
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
