"""Whole nodes in one process (memory underlay, room and TAPs): join, ring, routing, DHT, repair, tunnels."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from overlay.link import Link
from overlay.membership import RECRUIT_INTERVAL
from overlay.node import Node
from overlay.wire import Endpoint, Kind, PacketType
from tests.support.memgroup import MemoryGroup

# For the tests about noticing dead links: a link silent for two of MemoryGroup's 0.5 s rounds is pinged (idle
# ones after four), and dead DEAD_GRACE (6 s, three pings) later, instead of after production's 19-32 s.
PING_INTERVAL = 1.0


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_200_nodes_join_one_by_one_route_sampled_pairs_and_respect_the_link_bound() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=7)
        try:
            for _ in range(200):
                node = await g.add_node()
                joined = node.first_link
                assert await g.wait_for(lambda joined=joined: joined.is_set() or len(g.nodes) == 1, 5.0)
            assert await g.wait_for(lambda: not g.ring_correct(), 60.0), f"wrong ring at {g.ring_correct()}"
            bound = g.nodes[0].maintenance.max_links()
            assert await g.wait_for(lambda: max(len(n.links.links) for n in g.nodes) <= bound, 30.0), max(
                len(n.links.links) for n in g.nodes
            )
            # Every node has published its address by now (first tick after its first link); a record lost
            # while the ring formed is published again by its owner's self-check.
            rng = random.Random(3)
            pairs = [tuple(rng.sample(range(200), 2)) for _ in range(60)]
            assert await g.reach(pairs, 15.0) == []
            # Few tunnels per node, not a mesh.
            degrees = [len(n.links.links) for n in g.nodes]
            assert sum(degrees) / len(degrees) <= bound
            # XMPP: at most the configured anchors stay in the room.
            assert len(g.room.anchors()) <= 3
        finally:
            await g.stop()

    run(scenario())


def test_ring_repairs_after_a_node_leaves_and_traffic_flows_again() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=11)
        try:
            assert await g.form_ring(16, 30.0)
            await g.nodes[5].stop()
            assert await g.wait_for(lambda: not g.ring_correct(), 20.0), g.ring_correct()
            p = g.send(2, 9, b"after repair")
            assert await g.wait_for(lambda: g.received(9, p), 10.0)
        finally:
            await g.stop()

    run(scenario())


def test_ring_repairs_after_a_node_crashes_without_saying_goodbye() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=5, ping_interval=PING_INTERVAL)
        try:
            assert await g.form_ring(12, 30.0)
            dead = g.nodes[4]
            dead.ticker.stop()  # no CLOSE messages: the peers must notice missing keepalives
            dead.underlay.close()
            assert await g.wait_for(lambda: not g.ring_correct(), 40.0), g.ring_correct()
        finally:
            await g.stop()

    run(scenario())


@pytest.mark.parametrize("announced", [True, False], ids=["tunnel-packets", "relay-messages"])
def test_ring_neighbours_that_cannot_reach_each_other_link_through_a_tunnel(
    announced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes that announce HELLO_TUNNEL carry the tunnel's data as TUNNEL packets (the relay seals only their
    head); nodes that do not, as nodes from before TUNNEL, get relay messages sealed whole, and the tunnel
    works the same."""
    if not announced:
        monkeypatch.setattr("overlay.linkevents.HELLO_TUNNEL", 0)  # what a node says in its hello
        monkeypatch.setattr("overlay.linkmsgs.HELLO_TUNNEL", 0)  # and what it reads in its peers'

    async def scenario() -> None:
        g = MemoryGroup(seed=3)
        try:
            a, b = await g.tunnelled_pair()
            relay = a.links.links[b.id].relay
            assert a.links.links[relay].tunnels_ok is announced and b.links.links[relay].tunnels_ok is announced
            types: collections.Counter[int] = collections.Counter()
            carry = g.network._carry

            def watch(data: bytes, src: Endpoint, dst: Endpoint) -> None:
                types[data[0]] += 1
                carry(data, src, dst)

            g.network._carry = watch  # type: ignore[method-assign]
            p = g.send(g.nodes.index(a), g.nodes.index(b), b"through the tunnel")
            assert await g.wait_for(lambda: g.received(g.nodes.index(b), p), 10.0)
            assert (types[PacketType.TUNNEL] >= 2) is announced, types  # a to the relay, the relay to b
        finally:
            await g.stop()

    run(scenario())


def test_ring_neighbours_whose_path_is_lost_silently_link_again_through_a_tunnel() -> None:
    """Their underlay path is lost without a word (a NAT that mapped one anew): the link is declared dead at
    both ends and each forgets the other; neighbours still list both, so they link again, through a tunnel
    via a neighbour they share, and the ring is whole again."""

    async def scenario() -> None:
        g = MemoryGroup(seed=5, ping_interval=PING_INTERVAL)
        try:
            assert await g.form_ring(7, 30.0)
            a = g.nodes[1]
            b = next(n for n in g.nodes if n.id == a.table.successors()[0])
            assert any(b.id in n.table.neighbours() and a.id in n.table.neighbours() for n in g.nodes)
            g.network.block(a.underlay.local_endpoint, b.underlay.local_endpoint)
            assert await g.wait_for(lambda: b.id not in a.links.links and a.id not in b.links.links, 30.0)
            assert await g.wait_for(lambda: b.id in a.links.links and a.links.links[b.id].relay is not None, 30.0)
            assert await g.wait_for(lambda: not g.ring_correct(), 10.0), g.ring_correct()
        finally:
            await g.stop()

    run(scenario())


def test_a_packet_for_an_address_nobody_owns_is_dropped_counted_and_answered_with_icmp() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=2)
        try:
            assert await g.form_ring(4, 20.0)
            from overlay.tap.frames import ETH_P_IP, ethernet_frame
            from overlay.tap.vnic import DEFAULT_GATEWAY_MAC
            from tests.support.memgroup import udp_packet

            packet = udp_packet("10.254.0.1", "10.254.9.9", b"anyone?")
            g.taps[0].inject(ethernet_frame(DEFAULT_GATEWAY_MAC, g.taps[0].mac, ETH_P_IP, packet))
            n0 = g.nodes[0]
            assert await g.wait_for(lambda: n0.counters.get("drop: no node owns the address") == 1, 10.0)
            icmp = [f for f in g.taps[0].written if f[14 + 9] == 1]  # IP protocol 1: ICMP
            assert icmp and icmp[0][14 + 20] == 3  # type 3: destination unreachable
        finally:
            await g.stop()

    run(scenario())


def test_garbage_from_a_linked_peer_is_counted_and_the_link_survives() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=9)
        try:
            assert await g.form_ring(3, 20.0)
            a, b = g.nodes[0], g.nodes[1]
            link = a.links.links[b.id]
            for junk in (b"", b"\x04", b"\x04" + bytes(40), b"\x03\x05", b"\xff" * 10, bytes([Kind.FIND])):
                link.send(junk)
            await asyncio.sleep(0.2)
            assert (
                b.counters.get("drop: malformed link message", 0) + b.counters.get("drop: unknown link message", 0) >= 4
            )
            assert a.id in b.links.links
            p = g.send(0, 1, b"still fine")
            assert await g.wait_for(lambda: g.received(1, p), 5.0)
        finally:
            await g.stop()

    run(scenario())


def test_a_departed_anchor_is_replaced_through_the_overlay() -> None:
    async def scenario() -> None:
        g = MemoryGroup(seed=13)
        try:
            for _ in range(8):
                await g.add_node()
            assert await g.wait_for(lambda: len(g.room.anchors()) == 3, 10.0)
            anchor = next(n for n in g.nodes if n.bootstrap.is_anchor)
            await anchor.stop()
            assert len(g.room.anchors()) == 2
            # A remaining anchor recruits a neighbour, which joins the room as an anchor. The anchors were just
            # recruited themselves (or just recruited the third), and one recruit per RECRUIT_INTERVAL is the
            # rule: the replacement may wait that long first (a 10 s wait failed once in CI under load).
            wait = RECRUIT_INTERVAL + 10.0
            assert await g.wait_for(lambda: len(g.room.anchors()) == 3, wait), g.room.anchors()
            assert anchor.bootstrap.nick not in g.room.anchors()
        finally:
            await g.stop()

    run(scenario())


def test_neighbours_that_refuse_to_become_anchors_send_the_recruiter_on_to_the_next_at_once() -> None:
    """Every neighbour was asked moments ago and refuses (ANCHOR_REFUSED): each remaining anchor asks its
    neighbours one after another within seconds, each once, instead of one per RECRUIT_INTERVAL. A refuser is
    not asked again for RECRUIT_INTERVAL; then it accepts, and the group has its anchors back."""

    async def scenario() -> None:
        g = MemoryGroup(seed=21)
        try:
            for _ in range(8):
                await g.add_node()
            assert await g.wait_for(lambda: len(g.room.anchors()) == 3, 10.0)
            await asyncio.sleep(RECRUIT_INTERVAL)  # every anchor may recruit again
            gone = next(n for n in g.nodes if n.bootstrap.is_anchor)
            staying = [n for n in g.nodes if n.bootstrap.is_anchor and n is not gone]
            others = [n for n in g.nodes if not n.bootstrap.is_anchor]
            for n in others:
                n.membership._recruited_at = n.clock()  # asked moments ago: it refuses for RECRUIT_INTERVAL
            await gone.stop()

            def askers(n: Node) -> int:
                return sum(1 for a in staying if n.id in a.links.links)

            def refused(n: Node) -> int:
                return int(n.counters.get("anchor recruits refused", 0))

            asked = [n for n in others if askers(n)]
            assert len(asked) >= 3
            assert await g.wait_for(lambda: all(refused(n) for n in asked), 3.0), [refused(n) for n in asked]
            assert all(refused(n) <= askers(n) for n in others), [(refused(n), askers(n)) for n in others]
            assert len(g.room.anchors()) == 2
            assert await g.wait_for(lambda: len(g.room.anchors()) == 3, RECRUIT_INTERVAL + 5.0), g.room.anchors()
        finally:
            await g.stop()

    run(scenario())


def test_an_anchor_and_a_member_cut_off_until_their_links_die_get_back_into_the_ring_when_the_network_heals() -> None:
    """Their links die and their tables empty; an anchor used to stay out for good (it hears no beacon and every
    joiner had joined), a member waited a minute for the missing beacon. Both go to the room after ALONE_AFTER."""

    async def scenario() -> None:
        g = MemoryGroup(seed=13, ping_interval=PING_INTERVAL)
        try:
            for _ in range(8):
                await g.add_node()
            assert await g.wait_for(lambda: not g.ring_correct() and len(g.room.anchors()) == 3, 30.0)
            leader = min(g.room.anchors())
            anchor = next(n for n in g.nodes if n.bootstrap.is_anchor and n.bootstrap.nick != leader)
            member = next(n for n in g.nodes if not n.bootstrap.is_anchor)
            cut = [(x.underlay.local_endpoint, n.underlay.local_endpoint) for x in (anchor, member) for n in g.nodes]
            for a, b in cut:
                g.network.block(a, b)
            assert await g.wait_for(
                lambda: all(not x.links.links and not x.table.successors() for x in (anchor, member)), 60.0
            )
            for a, b in cut:
                g.network.unblock(a, b)
            # ALONE_AFTER (10 s) from the last link's death, then one hello and a join FIND; the beacon's island
            # rule alone would take 60-70 s, and the anchor had no way back at all.
            assert await g.wait_for(lambda: not g.ring_correct(), 25.0), g.ring_correct()
            assert anchor.membership is not None and member.membership is not None
            assert anchor.membership.state == member.membership.state == "member"
        finally:
            await g.stop()

    run(scenario())


def test_data_packets_take_the_route_the_shared_promise_walk_computes_on_the_nodes_own_tables() -> None:
    from overlay.routing.forwarding import Deliver, walk

    async def scenario() -> None:
        g = MemoryGroup(seed=17)
        try:
            assert await g.form_ring(60, 40.0)
            by_id = {n.id: n for n in g.nodes}
            rng = random.Random(5)
            pairs = [tuple(rng.sample(range(60), 2)) for _ in range(30)]
            # Resolve every destination first, so each measured packet goes straight onto the overlay.
            assert await g.reach(pairs, 30.0) == []
            await asyncio.sleep(1.0)  # let neighbour lists settle: the walk below reads the same tables
            for a, b in pairs:
                src, dst = g.nodes[a], g.nodes[b]
                path, end = walk(
                    src.id,
                    dst.id,
                    exact=True,
                    promise=True,
                    view=lambda n: (by_id[n].table.neighbours(), by_id[n].table.neighbours_of),
                )
                assert isinstance(end, Deliver)
                before = list(dst.data_hops)
                p = g.send(a, b, f"measure {a}->{b}".encode())
                assert await g.wait_for(lambda p=p, b=b: g.received(b, p), 5.0)
                assert dst.data_hops[0] == before[0] + 1
                assert dst.data_hops[1] - before[1] == len(path) - 1, (a, b, path)
        finally:
            await g.stop()

    run(scenario())


def test_a_crashed_record_holder_is_replaced_so_the_record_keeps_its_copies() -> None:
    from overlay.dht.records import record_key
    from overlay.dht.store import REPLICAS
    from overlay.ids import ring_distance

    async def scenario() -> None:
        g = MemoryGroup(seed=9, ping_interval=PING_INTERVAL)
        try:
            assert await g.form_ring(12, 30.0)
            address = g.nodes[0].address
            key = record_key(g.nodes[0].room, address)

            def holders() -> set[int]:
                return {i for i, n in enumerate(g.nodes) if not n.stopped and n.dht.store.get(address, n.clock())}

            def nearest_live() -> set[int]:
                live = [i for i, n in enumerate(g.nodes) if not n.stopped]
                return set(sorted(live, key=lambda i: ring_distance(g.nodes[i].id, key))[:REPLICAS])

            assert await g.wait_for(lambda: holders() == nearest_live(), 20.0), (holders(), nearest_live())
            victim = next(i for i in sorted(holders()) if i != 0)
            dead = g.nodes[victim]
            dead.ticker.stop()  # a crash: no CLOSE, the neighbours notice missing keepalives
            dead.underlay.close()
            # The dead holder's place goes to the next-nearest node: REPLICAS copies again, not two.
            assert await g.wait_for(lambda: holders() == nearest_live(), 30.0), (holders(), nearest_live())
            assert victim not in nearest_live()
        finally:
            await g.stop()

    run(scenario())


def test_members_of_a_small_ring_with_one_link_each_publish_their_addresses_at_once() -> None:
    """The bench lab's shape: the first and the third member cannot reach each other, so each has one link (to
    the second) until their tunnel comes up after the direct stage; in a group of two, both have one link.
    Knowing the whole ring, each publishes its address at once instead of after SETTLE_TIME (3 s), and a
    packet between the first and the third gets through before their tunnel is up."""
    from overlay.dht.service import SETTLE_TIME

    async def scenario() -> None:
        g = MemoryGroup(seed=4)
        soon = SETTLE_TIME - 2.0
        try:
            # The memory network numbers endpoints from 1 in the order the nodes start.
            first, third = ("198.19.0.1", 5800), ("198.19.0.3", 5800)
            g.network.block(first, third)

            def published(count: int) -> bool:
                return all(any(n.dht.store.get(m.address, n.clock()) for n in g.nodes) for m in g.nodes[:count])

            for size in (1, 2, 3):
                node = await g.add_node()
                if size > 1:
                    assert await g.wait_for(node.first_link.is_set, 10.0)
                    assert await g.wait_for(lambda size=size: published(size), soon, step=0.05), size
            assert (g.nodes[0].underlay.local_endpoint, g.nodes[2].underlay.local_endpoint) == (first, third)
            assert g.nodes[0].id not in g.nodes[2].links.links  # no tunnel yet: one link each
            assert not await g.reach([(0, 2), (2, 0)], soon, every=0.5)
        finally:
            await g.stop()

    run(scenario())


def test_a_lookup_is_retried_when_its_retry_is_due_not_a_whole_interval_after_the_last_tick() -> None:
    from overlay.dht.service import LOOKUP_RETRY

    async def scenario() -> None:
        g = MemoryGroup(seed=4)
        try:
            node = await g.add_node()
            node.dht.look_up("10.254.9.9")
            sent = node.dht._lookups["10.254.9.9"].sent
            # A tick just before the retry was due: the next one comes at the retry, not LOOKUP_RETRY later.
            assert node.dht.next_deadline(sent + 0.9 * LOOKUP_RETRY) == sent + LOOKUP_RETRY
        finally:
            await g.stop()

    run(scenario())


def test_a_routed_control_packet_is_acknowledged_by_the_next_hop_so_the_sender_sends_no_ping() -> None:
    from overlay.wire import LinkMsg

    async def scenario() -> None:
        g = MemoryGroup(seed=5)
        try:
            assert await g.form_ring(6, 20.0)
            a = g.nodes[0]
            acks: list[int] = []
            # Counted where they arrive, on every link of a's: one made after this point (a long link still
            # coming up) acknowledges too, and a spy on the senders' links of the moment missed it (CI).
            original = a.links.callbacks.message

            def spy(link: Link, msg: bytes) -> None:
                if msg == bytes([LinkMsg.ACK]):
                    acks.append(link.peer_id)
                original(link, msg)

            a.links.callbacks.message = spy
            watched = 0
            for n in g.nodes[1:] * 2:
                a.dht._ask(n.address)  # a DHT lookup, routed through one of a's links unless a holds the key
                if not a.maintenance._awaiting:
                    continue
                watched += 1
                # Answered at once, not at the peer's next gossip round (0.375-0.625 s here) nor after a ping (2 s).
                assert await g.wait_for(lambda: not a.maintenance._awaiting, 0.1, step=0.005)
            # Another packet from the peer (its gossip) may clear the wait before its ACK leaves: count the ACKs
            # once they are all out, not at the moment the last wait ended.
            assert watched >= 4
            assert await g.wait_for(lambda: len(acks) >= watched, 1.0), (len(acks), watched)
            assert set(acks) <= set(a.links.links)
            assert a.maintenance.suspects(a.clock()) == frozenset()
        finally:
            await g.stop()

    run(scenario())
