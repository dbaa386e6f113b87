"""Lanes between real processes (docs/datapath.md, Lanes): members with `[vnic] lanes = 2` run two Engines, each
with its own thread, queue of a multi-queue TAP and socket on the node's port. TCP streams spread over both
lanes at the sender and at the receiver, direct and through a relay (two connections opened together take a lane
each), and a member on the Python data path (one reader, every lane's window in its sessions) exchanges traffic
with them both ways (in lane 0: its answers all come in by the TAP's first queue, where the TAP then sends those
flows out)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.group import OVERLAY_PORT, TAP_NAME, Group, missing_prerequisites

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=str(missing_prerequisites())),
    pytest.mark.timeout(300),
]

SIZE = 3
BLOCKED = (0, 2)  # their traffic crosses the relay, member 1 (the three members are the peers' lab, bench/peers.py)
IPERF_S = 2
# Each stream the sender opens takes the lane least busy at its SYN, in turn among idle ones (by the TAP's flow
# hash alone, as before, all 16 on one of two lanes had odds 2 in 65,536).
STREAMS = 16


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    with Group(SIZE, prefix="iln", lanes=2) as g:
        g.block_udp(*BLOCKED)
        g.join_all()
        # The blocked pair's link is a tunnel through member 1 once its direct attempts have failed. A flow that
        # starts before (routed, and written to the TAP by Python, through its first queue) stays in lane 0
        # while it lasts: a TAP sends a flow out by the queue its last packet came in by (docs/datapath.md).
        a, b = BLOCKED
        deadline = time.monotonic() + 30
        while not any(
            row["peer_address"] == g.members[b].ip and row["kind"] == "tunnel" for row in g.status(a)["links"]
        ):
            assert time.monotonic() < deadline, g.status(a)["links"]
            time.sleep(0.5)
        yield g


@pytest.fixture(scope="module")
def mixed() -> Iterator[Group]:
    """Member 0 with two lanes, member 1 on the Python data path ([vnic] fast_path = false: no lanes)."""
    with Group(2, prefix="ilm", lanes=2, python_path=[1]) as g:
        g.join_all()
        yield g


def lanes_carried(group: Group, i: int, what: str) -> list[int]:
    st = group.status(i)
    assert st["lanes"] == 2, st
    counters = st["counters"]
    return [counters.get(f"fast path: lane {k}: {what}", 0) for k in range(2)]


def test_each_member_has_a_tap_queue_and_a_socket_per_lane(group: Group) -> None:
    m = group.members[0]
    queues = group.lab.run(m.host, "ls", f"/sys/class/net/{TAP_NAME}/queues").stdout.split()
    assert sorted(q for q in queues if q.startswith("tx-")) == ["tx-0", "tx-1"]
    sockets = group.lab.run(m.host, "ss", "-Huan", "sport", "=", f":{OVERLAY_PORT}").stdout
    assert len(sockets.splitlines()) == 4, sockets  # each lane's, and each lane's express socket
    # Each Engine's thread with a 100 us slice, where the kernel has custom slices (EEVDF, Linux 6.12).
    slice_us = group.status(0)["counters"].get("fast path: scheduler slice, us")
    assert slice_us == (100 if tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 12) else None)


@pytest.mark.parametrize("a, b", [(0, 1), BLOCKED], ids=["direct", "relayed"])
def test_pings_go_express_and_are_read_from_the_express_sockets(group: Group, a: int, b: int) -> None:
    """A ping is a small packet of a quiet flow: sealed in an express lane, steered to the receiver's (and a
    relay's) express socket, answered the same way (docs/datapath.md, Express lanes)."""
    assert group.ping(a, b, count=2)  # the flows are in the Engines (a frame without one goes to Python first)
    counters = [group.status(i)["counters"] for i in range(SIZE)]
    assert group.ping(a, b, count=5)
    after = [group.status(i)["counters"] for i in range(SIZE)]

    def grew(i: int, what: str) -> int:
        key = f"fast path: express: datagrams {what}"
        return int(after[i].get(key, 0)) - int(counters[i].get(key, 0))

    for end in (a, b):
        assert grew(end, "sent") >= 5 and grew(end, "read") >= 5, (end, counters[end], after[end])
    if (a, b) == BLOCKED:
        assert grew(1, "sent") >= 10 and grew(1, "read") >= 10  # the relay, both ways


@pytest.mark.parametrize("a, b", [(0, 1), BLOCKED], ids=["direct", "relayed"])
def test_streams_spread_over_both_lanes_at_each_end(group: Group, a: int, b: int) -> None:
    sent, handled = lanes_carried(group, a, "frames sent"), lanes_carried(group, b, "datagrams handled")
    received = group.iperf3(a, b, IPERF_S, streams=STREAMS)["end"]["sum_received"]
    assert received["bytes"] > 10_000_000
    print(f"TCP node{a} -> node{b}, {STREAMS} streams, 2 lanes: {received['bits_per_second'] / 1e6:.0f} Mbit/s")
    sent_now, handled_now = lanes_carried(group, a, "frames sent"), lanes_carried(group, b, "datagrams handled")
    assert all(now - before > 100 for now, before in zip(sent_now, sent, strict=True)), (sent, sent_now)
    assert all(now - before > 100 for now, before in zip(handled_now, handled, strict=True)), (handled, handled_now)


@pytest.mark.parametrize("a, b", [(0, 1), BLOCKED], ids=["direct", "relayed"])
def test_two_connections_opened_together_take_a_lane_each_at_both_ends(group: Group, a: int, b: int) -> None:
    """A node seals each TCP connection it opens in the lane least busy at its SYN, taking turns among idle ones
    (overlay/_lanes.h, LaneShare): two streams opened together carry data in both lanes at both ends, every time.
    By the TAP's flow hash alone, each run would put both in one lane half the time (all four: 1 in 16)."""
    for _ in range(4):
        before = [lanes_carried(group, i, w) for i, w in ((a, "frames sent"), (b, "datagrams handled"))]
        received = group.iperf3(a, b, 1, streams=2)["end"]["sum_received"]
        assert received["bytes"] > 1_000_000
        after = [lanes_carried(group, i, w) for i, w in ((a, "frames sent"), (b, "datagrams handled"))]
        for then, now in zip(before, after, strict=True):
            assert all(y - x > 100 for x, y in zip(then, now, strict=True)), (before, after)


Counters = dict[str, Any]


@pytest.mark.parametrize("a, b", [(0, 1), BLOCKED], ids=["direct", "relayed"])
def test_a_ping_started_under_a_stream_goes_in_the_other_lane_at_both_ends(group: Group, a: int, b: int) -> None:
    """A ping (an echo request) the node sends takes the lane least busy at its first packet, as a TCP connection
    does at its SYN (overlay/_lanes.h, LaneShare): under a stream, the other lane, at the sender and the receiver,
    where it does not wait behind the stream (docs/datapath.md, Under load). By the TAP's hash alone it would
    share the stream's lane half the time, or every time for a ping whose hash gives the stream's lane: the turns
    put the stream in each lane in turn."""
    lab, target = group.lab, group.members[b].ip
    for turn in range(3):
        if turn % 2:  # a connection refused (a SYN, answered by a reset) moves the turn among lanes on by one
            lab.run(group.members[a].host, "bash", "-c", f"exec 3<>/dev/tcp/{target}/9", check=False)
        server = lab.popen(group.members[b].host, "iperf3", "-s", "-1", "-p", "5202",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        stream = lab.popen(group.members[a].host, "iperf3", "-c", target, "-p", "5202", "-t", "4",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(1.0)
            before = [group.status(i)["counters"] for i in (a, b)]
            out = lab.run(group.members[a].host, "ping", "-n", "-q", "-c", "20", "-i", "0.05", target, check=False)
            after = [group.status(i)["counters"] for i in (a, b)]
        finally:
            assert stream.wait(timeout=30) == 0
            server.wait(timeout=10)
        assert " 0% packet loss" in out.stdout, out.stdout

        def grew(end: int, lane: int, what: str, turn: tuple[list[Counters], list[Counters]] = (before, after)) -> int:
            key = f"fast path: lane {lane}: {what}"
            return int(turn[1][end].get(key, 0)) - int(turn[0][end].get(key, 0))

        # The stream's lane carried its data at both ends; the ping's lane is the other one.
        stream_lane = max((0, 1), key=lambda k: grew(0, k, "frames sent"))
        assert grew(1, stream_lane, "datagrams handled") > 1000, (before, after)
        ping_lane = 1 - stream_lane
        assert grew(0, ping_lane, "express: datagrams sent") >= 18, (before, after)
        assert grew(1, ping_lane, "express: datagrams read") >= 18, (before, after)
        assert grew(0, stream_lane, "express: datagrams sent") <= 2, (before, after)  # its first one, at most


@pytest.mark.parametrize("a, b", [(0, 1), (1, 0)], ids=["lanes-python", "python-lanes"])
def test_a_member_on_the_python_path_takes_every_lane_and_is_answered(mixed: Group, a: int, b: int) -> None:
    assert [mixed.status(i)["lanes"] for i in (0, 1)] == [2, 0]
    received = mixed.iperf3(a, b, IPERF_S, streams=STREAMS)["end"]["sum_received"]
    assert received["bytes"] > 1_000_000
    failed = [p for p, t in mixed.wait_for_pings([(0, 1), (1, 0)], timeout=30.0).items() if t is None]
    assert failed == [], f"no reply: {failed}"
