"""ICMP "unreachable" as a hint that a link's peer is gone (overlay/transport/underlay.py, overlay/_fast.c,
overlay/routing/maintenance.py `unreachable`): the socket queues ICMP errors, both readers of it pass each one
up with the address it was about, no datagram is lost to an error the kernel reports on the next send, and a
node whose peer crashed on a host that stays up gives the link up in seconds, not after its keepalives.

The sockets are on 127.0.0.1 (a closed port there answers with a real ICMP port unreachable); the whole-node
test runs on the in-memory network told to answer as such a host does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay._fast import UP_HEADER
from overlay.routing.maintenance import DEAD_AFTER, UNREACHABLE_DEAD, UNREACHABLE_REASON
from overlay.tap.frames import ETH_P_IP, ethernet_frame
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.memory import MemoryNetwork
from overlay.transport.underlay import IP_RECVERR, IPV6_RECVERR, UdpUnderlay, icmp_unreachable
from tests.support.memgroup import linked_pair, udp_packet, vaddr
from tests.test_fastpath import A_ID, A_IP, B_ID, B_IP, Node, Wire, frame, header, session_pair

UP_UNREACHABLE = 5
UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
_ERR = struct.Struct("=IBBBBII")


def closed_endpoint() -> tuple[str, int]:
    """A loopback port nobody listens on any more: the kernel answers it with ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def test_the_underlay_reports_a_closed_port_and_the_send_the_kernel_fails_for_it_is_made_again() -> None:
    async def scenario() -> None:
        u = UdpUnderlay(("127.0.0.1", 0))
        gone: list[tuple[str, int]] = []
        u.on_unreachable = gone.append
        received: list[bytes] = []
        u.start(lambda data, source: received.append(data))
        live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        live.bind(("127.0.0.1", 0))
        live.settimeout(2.0)
        try:
            dead = closed_endpoint()
            u.send(b"\x83 to the dead", dead)
            time.sleep(0.05)  # the ICMP error is queued, and pending on the socket's next call
            u.send(b"\x83 to the living", live.getsockname())
            assert live.recv(100) == b"\x83 to the living"
            assert u.counters["send_failed"] == 0
            for _ in range(100):
                if gone:
                    break
                await asyncio.sleep(0.01)
            assert gone == [dead] and u.counters["ICMP: unreachable"] == 1
            assert u.counters["recv_errors"] == 0 and received == []
            # The socket still reads after its error queue was drained.
            live.sendto(b"\x83 back", u.local_endpoint)
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [b"\x83 back"]
        finally:
            u.close()
            live.close()

    asyncio.run(scenario())


def test_the_engine_passes_an_unreachable_up_with_its_address_and_still_sends() -> None:
    a = Node(A_ID, A_IP)
    a.udp.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    dead = closed_endpoint()
    live = Wire()
    ka, _ = session_pair()
    a.engine.set_link(B_ID, ka, 11, 22, (4, socket.inet_aton(dead[0]), dead[1]), 0, True, -1)
    a.engine.set_flow(B_IP, B_ID, header(A_ID, B_ID), 30.0, 0)
    a.engine.start()
    try:
        a.kernel.send(frame(A_IP, B_IP))
        a.up.settimeout(1.0)
        while (msg := a.up.recv(70000))[0] != UP_UNREACHABLE:
            pass
        # The header names the address the failed datagram went to: family, port, address.
        assert len(msg) == UP_HEADER and msg[1] == 4
        assert struct.unpack_from("!H", msg, 2)[0] == dead[1] and socket.inet_ntoa(msg[4:8]) == dead[0]
        assert a.engine.counters()["ICMP: unreachable"] >= 1
        # The link moves to a live endpoint: frames go on leaving (the error queue was drained).
        a.engine.set_link(B_ID, ka, 11, 22, live.endpoint, 0, True, -1)
        a.kernel.send(frame(A_IP, B_IP))
        assert live.recv()[0] == 0x83
        assert a.engine.counters().get("send failed", 0) == 0
    finally:
        a.close()
        live.sock.close()


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([socket.IPPROTO_IP, socket.IPPROTO_IPV6, 17, 1]),
            st.sampled_from([IP_RECVERR, IPV6_RECVERR, 1, 104]),
            st.one_of(
                st.binary(max_size=40),
                st.builds(
                    lambda err, origin, tail: _ERR.pack(err, origin, 3, 3, 0, 0, 0) + tail,
                    st.sampled_from([*UNREACHABLE, errno.EMSGSIZE, errno.EPROTO, 0]),
                    st.integers(0, 5),
                    st.binary(max_size=16),
                ),
            ),
        ),
        max_size=3,
    )
)
def test_any_error_queue_record_is_read_as_unreachable_or_not_and_never_raises(
    ancillary: list[tuple[int, int, bytes]],
) -> None:
    ours = {(socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)}
    whole = [v for level, kind, v in ancillary if (level, kind) in ours and len(v) >= _ERR.size]
    # True exactly when a whole record of ours came from ICMP (origin 2 or 3) with an "unreachable" error.
    expected = any(_ERR.unpack_from(v)[1] in (2, 3) and _ERR.unpack_from(v)[0] in UNREACHABLE for v in whole)
    assert icmp_unreachable(ancillary) is expected


def test_only_icmp_unreachables_count() -> None:
    v4 = (socket.IPPROTO_IP, IP_RECVERR)
    refused = _ERR.pack(111, 2, 3, 3, 0, 0, 0)  # ECONNREFUSED from ICMP: port unreachable
    assert icmp_unreachable([(*v4, refused)])
    assert icmp_unreachable([(socket.IPPROTO_IPV6, IPV6_RECVERR, _ERR.pack(113, 3, 1, 4, 0, 0, 0))])
    assert not icmp_unreachable([(*v4, _ERR.pack(90, 2, 3, 4, 0, 1400, 0))])  # EMSGSIZE: a path MTU
    assert not icmp_unreachable([(*v4, _ERR.pack(111, 1, 0, 0, 0, 0, 0))])  # not from ICMP (a local error)
    assert not icmp_unreachable([(*v4, refused[:10])])  # cut short
    assert not icmp_unreachable([(17, 104, refused)])  # another option's record


def test_a_node_gives_up_a_link_to_a_crashed_peer_on_a_host_that_stays_up_within_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """b's process dies without a goodbye; its host answers a's next datagram with port unreachable. Without the
    hint a's link would live on until its keepalives ran out (DEAD_AFTER after b was last heard)."""

    async def scenario() -> None:
        net = MemoryNetwork(unreachable=True)
        a, b, tap_a, _ = await linked_pair(False, False, net)
        try:
            b.underlay.close()  # the process is gone: nothing listens on its endpoint any more
            await b.stop()
            start = time.monotonic()
            tap_a.inject(ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, udp_packet(vaddr(0), vaddr(1), b"x")))
            while b.id in a.links.links and time.monotonic() - start < DEAD_AFTER:
                await asyncio.sleep(0.05)
            took = time.monotonic() - start
            assert b.id not in a.links.links
            assert took < UNREACHABLE_DEAD + 1.5, took
            assert a.underlay.counters["ICMP: unreachable"] >= 1
            assert a.counters.get("links: ICMP unreachable", 0) >= 1
        finally:
            await a.stop()

    with caplog.at_level(logging.INFO, logger="overlay.links"):
        asyncio.run(scenario())
    assert f"({UNREACHABLE_REASON})" in caplog.text
