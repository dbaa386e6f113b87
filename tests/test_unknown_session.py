"""A member that restarted holds none of its peers' link sessions: it answers their packets with UNKNOWN_SESSION
(overlay/wire.py), back the way each came, and a peer still sending on such a session handshakes again at once
instead of losing its packets until keepalives give the link up. Whole nodes in one process."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.node import Node, NodeSettings
from overlay.tap.device import MemoryTap
from overlay.tap.frames import ETH_P_IP, ethernet_frame
from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
from overlay.transport.memory import MemoryNetwork, MemoryUnderlay
from overlay.wire import DecodeError, PacketType, decode_unknown_session, encode_unknown_session
from tests.support.memgroup import ROOM, MemoryGroup, linked_pair, udp_packet, vaddr

REHANDSHAKES = "sessions the peer no longer holds"
NOTICES = "unknown-session notices sent"
STRAY = "drop: unknown-session notice for no session we send on"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def send_until_received(tap_a: MemoryTap, tap_b: MemoryTap, src: str, dst: str, timeout: float) -> float:
    """Send a UDP packet from src to dst every 50 ms (an application retransmitting) until one reaches tap_b;
    how long that took, or inf."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent: list[bytes] = []
    while loop.time() - start < timeout:
        packet = udp_packet(src, dst, f"packet {len(sent)}".encode())
        sent.append(packet)
        tap_a.inject(ethernet_frame(DEFAULT_GATEWAY_MAC, tap_a.mac, ETH_P_IP, packet))
        await asyncio.sleep(0.05)
        if any(frame[14:] in sent for frame in tap_b.written):
            return loop.time() - start
    return float("inf")


@settings(max_examples=300)
@given(st.binary(max_size=12))
def test_an_unknown_session_notice_decodes_to_its_index_or_raises_decode_error(data: bytes) -> None:
    try:
        index = decode_unknown_session(bytes([PacketType.UNKNOWN_SESSION]) + data)
    except DecodeError:
        assert len(data) != 4
    else:
        assert encode_unknown_session(index) == bytes([PacketType.UNKNOWN_SESSION]) + data


def test_a_peer_that_crashed_and_came_back_on_its_port_is_handshaken_again_at_its_first_unopenable_packet() -> None:
    """b's new process has no bootstrap and so never calls a itself: only its notice can mend a's link, which
    keepalives alone would give up seconds later."""

    async def scenario() -> None:
        net = MemoryNetwork()
        a, b, tap_a, tap_b = await linked_pair(False, False, net)
        tap_b2 = MemoryTap(name="mem1b", mac=tap_b.mac, vnet_hdr=False)
        b2 = Node(
            b.identity, NodeSettings(room=ROOM, address=f"{vaddr(1)}/16"),
            MemoryUnderlay(net, b.underlay.local_endpoint), tap=tap_b2,
        )  # fmt: skip
        try:
            link = a.links.links[b.id]
            old_remote = link.session.remote_index
            b.underlay.close()  # no goodbye
            await b.stop()
            await b2.start()
            took = await send_until_received(tap_a, tap_b2, vaddr(0), vaddr(1), 5.0)
            assert took < 1.0, took  # the first packet is lost; the next ones, 50 ms later, pass
            assert b2.links.counters.get(NOTICES, 0) >= 1
            assert a.links.counters.get(REHANDSHAKES) == 1
            # The same link on a new session: it never went down.
            assert a.links.links[b.id].session.remote_index != old_remote
            assert sum(v for k, v in a.links.counters.items() if k.startswith("links up")) == 1
        finally:
            await a.stop()
            await b2.stop()

    run(scenario())


def test_a_notice_for_another_index_or_from_another_path_changes_nothing_and_a_true_one_is_acted_on_once() -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        a, b, _, _ = await linked_pair(False, False, net)
        stranger = MemoryUnderlay(net)
        stranger.start(lambda data, endpoint: None)
        try:
            link = a.links.links[b.id]
            here = a.underlay.local_endpoint
            stranger.send(encode_unknown_session(link.session.remote_index), here)  # right index, wrong path
            b.underlay.send(encode_unknown_session(link.session.remote_index ^ 1), here)  # right path, wrong index
            b.underlay.send(b"\x87\x00", here)  # malformed
            await asyncio.sleep(0.05)
            assert a.links.counters.get(STRAY) == 2
            assert a.links.counters.get("drop: malformed or unauthentic packet") == 1
            assert REHANDSHAKES not in a.links.counters
            sent = a.links.counters.get("handshakes sent", 0)
            for _ in range(3):  # one handshake per NOTICE_RETRY however many notices come
                b.underlay.send(encode_unknown_session(link.session.remote_index), here)
            await asyncio.sleep(0.05)
            assert a.links.counters.get(REHANDSHAKES) == 1
            assert a.links.counters.get("handshakes sent", 0) == sent + 1
            assert b.id in a.links.links and a.id in b.links.links
        finally:
            await a.stop()
            await b.stop()
            stranger.close()

    run(scenario())


@pytest.mark.parametrize("restarted", ["lower", "higher"])
def test_a_member_reached_through_a_tunnel_that_crashed_and_came_back_is_handshaken_again_through_the_relay(
    restarted: str,
) -> None:
    """The notice goes back through the relay the tunnel packet came through. The restarted member's own call
    to its ring neighbour first spends its direct tries on the blocked path; with the lower ID it also ignores
    our handshake while its call is under a second old, so ours is sent again at a later notice."""

    async def scenario() -> None:
        g = MemoryGroup(seed=3)
        try:
            pair = sorted(await g.tunnelled_pair(), key=lambda n: n.id)
            gone, pinger = pair if restarted == "lower" else pair[::-1]
            ig, ip = g.nodes.index(gone), g.nodes.index(pinger)
            relay = pinger.links.links[gone.id].relay
            assert await g.reach([(ip, ig)], 5.0, every=0.2) == []
            back = await g.restart_node(ig, crash=True)
            # Packets from the start, as an application keeps sending: the first notices come while the
            # restarted member's own call to us is young.
            reach = asyncio.ensure_future(g.reach([(ip, ig)], 10.0, every=0.05))
            assert await g.wait_for(lambda: relay in back.links.links, 10.0, step=0.02)
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await reach == []
            assert loop.time() - start < 1.5
            assert back.links.counters.get(NOTICES, 0) >= 1
            assert pinger.links.counters.get(REHANDSHAKES, 0) >= 1
        finally:
            await g.stop()

    run(scenario())
