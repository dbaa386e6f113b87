"""A group with certificates, whole nodes in one process: who gets a link, whose packets and records are
believed, and how fast a revocation cuts a member off."""

from __future__ import annotations

import asyncio
import ipaddress
import time

from overlay.datapath import SOURCE_DROP
from overlay.dht.records import make_record
from overlay.identity import Identity
from overlay.node import Node, NodeSettings
from overlay.transport.memory import MemoryUnderlay
from overlay.transport.session import REJECT_AFTER_TIME, REKEY_AFTER_TIME
from overlay.trust.certs import issue_certificate
from overlay.trust.groupkey import GroupKey
from overlay.trust.issuer import make_request
from overlay.trust.members import GroupTrust
from overlay.wire import LinkMsg, encode_ping
from tests.support.memgroup import ROOM, MemoryGroup, vaddr


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def formed(size: int, seed: int) -> MemoryGroup:
    g = MemoryGroup(seed=seed, group_key=GroupKey.from_seed(bytes([seed]) * 32))
    for _ in range(size):
        await g.add_node()
    # 60 s as for 200 nodes in tests/test_overlay_memory.py: a 20-node ring once took over 30 s on a loaded box.
    assert await g.wait_for(lambda: not g.ring_correct(), 60.0), g.ring_correct()
    return g


def outsider(g: MemoryGroup, trust: GroupTrust | None, seed: int) -> Node:
    identity = Identity.from_seed(bytes([seed]) * 32)
    return Node(
        identity,
        NodeSettings(room=ROOM, address="10.254.9.9/16"),
        MemoryUnderlay(g.network),
        trust=trust,
    )


def handshakes_refused(node: Node) -> int:
    """Handshake messages `node` turned down: Noise failed (another group's prologue) or the credential did not
    admit the sender (overlay/links.py counts each HandshakeError)."""
    return sum(v for k, v in node.links.counters.items() if k.startswith("drop: handshake: "))


async def try_link(g: MemoryGroup, node: Node, target: Node) -> bool:
    """Whether `node` gets a link to `target` with a handshake of its own: the answer once `target` has judged
    and refused its initiation (were it admitted, the response would link them at once), or they linked."""
    before = handshakes_refused(target)
    await node.start()
    try:
        node.links.connect(target.identity.public_key, target.underlay.local_endpoint)

        def linked() -> bool:
            return node.id in target.links.links or target.id in node.links.links

        await g.wait_for(lambda: linked() or handshakes_refused(target) > before, 10.0)
        await asyncio.sleep(0.1)  # a response already under way would land by now
        return linked()
    finally:
        await node.stop()  # no retries of its left to be counted with the next node's


def refusals(node: Node) -> dict[str, int]:
    assert node.trust is not None
    return {k: v for k, v in node.trust.counters.items() if k.startswith("refused")}


def test_members_link_and_route_with_certificates_and_every_source_checked() -> None:
    async def scenario() -> None:
        g = await formed(12, 21)
        try:
            pairs = [(0, 7), (3, 11), (9, 2), (5, 6)]
            assert await g.reach(pairs, 15.0) == []
            # Senders several hops away were verified through their DHT records' certificates.
            assert sum(n.counters.get(SOURCE_DROP, 0) for n in g.nodes) == 0
            assert all(n.trust is not None and n.trust.certificate is not None for n in g.nodes)
        finally:
            await g.stop()

    run(scenario())


def test_a_non_member_gets_no_link_whatever_it_presents() -> None:
    async def scenario() -> None:
        g = await formed(4, 22)
        target = g.nodes[1]
        assert g.group_key is not None and g.issuer is not None
        try:
            # 1. A key pair and no certificate: a node of a group without certificates, and one that pins this
            # group's key but was never given a certificate.
            assert not await try_link(g, outsider(g, None, 90), target)
            pinned = GroupTrust(g.group_key.public_key, Identity.from_seed(bytes([93]) * 32).public_key, time.time)
            assert not await try_link(g, outsider(g, pinned, 93), target)
            # 2. A certificate from another group's key, for its own node key.
            rogue_key = GroupKey.from_seed(bytes([99]) * 32)
            identity = Identity.from_seed(bytes([91]) * 32)
            rogue = GroupTrust(rogue_key.public_key, identity.public_key, time.time)
            rogue.certificate = issue_certificate(
                rogue_key,
                jid="mallory@example.test",
                node_key=identity.public_key,
                address=ipaddress.IPv4Interface("10.254.9.9/16"),
                now=time.time(),
                lifetime=3600,
            )
            assert not await try_link(g, outsider(g, rogue, 91), target)
            # 3. Another member's valid certificate, presented with its own key.
            stolen = GroupTrust(g.group_key.public_key, bytes(32), time.time)
            stolen.certificate = g.nodes[2].trust.certificate  # type: ignore[union-attr]
            assert not await try_link(g, outsider(g, stolen, 92), target)
            seen = refusals(target)
            assert seen.get("refused: no certificate", 0) >= 1
            assert seen.get("refused: certificate of another node", 0) >= 1
            # Another group (or none) fails earlier still: the prologue (the group key) differs, Noise cannot finish.
            assert target.links.counters.get("drop: handshake: handshake initiation fails authentication", 0) >= 1
        finally:
            await g.stop()

    run(scenario())


def test_a_member_sending_from_another_members_address_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        g = await formed(6, 23)
        try:
            assert await g.reach([(1, 4)], 10.0) == []
            before = g.nodes[4].counters.get(SOURCE_DROP, 0)
            spoofed = [g.send(1, 4, f"spoofed {k}".encode(), src=vaddr(3)) for k in range(3)]
            assert await g.wait_for(lambda: g.nodes[4].counters.get(SOURCE_DROP, 0) >= before + 3, 8.0)
            assert not any(g.received(4, p) for p in spoofed)
            honest = g.send(1, 4, b"honest")
            assert await g.wait_for(lambda: g.received(4, honest), 5.0)
        finally:
            await g.stop()

    run(scenario())


def test_a_forged_record_for_a_members_address_is_refused_by_its_holders() -> None:
    async def scenario() -> None:
        g = await formed(6, 24)
        try:
            thief = g.nodes[1]
            assert thief.trust is not None and thief.trust.certificate is not None
            # Node 1 signs a record for node 3's address with its own key and its own certificate.
            forged = make_record(thief.identity, ROOM, vaddr(3), time.time(), credential=thief.trust.own())
            for n in g.nodes:
                assert n.dht.store.put(forged, time.time()) == "address not in the signer's certificate"
            # A record without any certificate is refused too, even for the signer's own address.
            bare = make_record(thief.identity, ROOM, vaddr(1), time.time())
            assert g.nodes[0].dht.store.put(bare, time.time()) == "no valid certificate"
        finally:
            await g.stop()

    run(scenario())


def test_a_revocation_cuts_the_member_off_everywhere_and_its_certificate_no_longer_admits_it() -> None:
    async def scenario() -> None:
        g = await formed(20, 25)
        assert g.issuer is not None
        try:
            victim = g.nodes[7]
            assert await g.reach([(7, 15), (15, 7)], 15.0) == []
            # The room's owner removes user7: the issuer revokes it and one member starts the flood.
            revs = g.issuer.set_members({f"user{i}@example.test": "member" for i in range(1000) if i != 7}, time.time())
            assert len(revs) == 1
            start = asyncio.get_running_loop().time()
            g.nodes[0].trust_service.apply(revs)  # type: ignore[union-attr]
            others = [n for n in g.nodes if n is not victim]
            assert await g.wait_for(lambda: all(victim.id not in n.links.links for n in others), 60.0)
            took = asyncio.get_running_loop().time() - start
            assert took < 60.0
            assert all(len(n.trust.revocations) == 1 for n in others)  # type: ignore[union-attr]
            assert all(victim.id not in n.e2e.peers() for n in others)  # its end-to-end sessions are gone too
            # Its packets stop and it cannot link again with the certificate it holds. With no link left, its
            # router drops the packet ("no route"): then it cannot arrive any more.
            no_route = victim.counters.get("no route", 0)
            lost = g.send(7, 15, b"after revocation")
            await g.wait_for(lambda: g.received(15, lost) or victim.counters.get("no route", 0) > no_route, 10.0)
            assert not g.received(15, lost)
            holder = g.nodes[15].trust
            assert holder is not None
            refused = holder.counters.get("refused: certificate revoked", 0)
            victim.links.connect(g.nodes[15].identity.public_key, g.nodes[15].underlay.local_endpoint)
            # Its handshake reaches node 15, which refuses it: were it admitted, the link would be up at once.
            await g.wait_for(
                lambda: (
                    victim.id in g.nodes[15].links.links
                    or holder.counters.get("refused: certificate revoked", 0) > refused
                ),
                10.0,
            )
            await asyncio.sleep(0.1)  # a response already under way would land by now
            assert victim.id not in g.nodes[15].links.links
            assert holder.counters.get("refused: certificate revoked", 0) >= 1
            # Its renewal is refused too (the issuer checks the current certificate and the member list).
            renewal = make_request(
                victim.identity,
                ROOM,
                time.time(),
                None,
                victim.trust.certificate.encode(),  # type: ignore[union-attr]
            )
            answer = g.issuer.handle(renewal.encode(), None, time.time())
            assert b"revoked" in answer
            # The rest of the group still talks.
            assert await g.reach([(3, 15)], 10.0) == []
        finally:
            await g.stop()

    run(scenario())


async def linked_pair(seed: int) -> tuple[MemoryGroup, list[float], list[Node]]:
    """Two members of a group with certificates on a clock the test moves (clock[0]), A linked to B."""
    g = MemoryGroup(seed=seed, group_key=GroupKey.from_seed(bytes([seed]) * 32))
    clock = [time.time()]
    nodes = []
    for i in range(2):
        identity = Identity.from_seed(bytes([seed * 2 + i]) * 32)
        node = Node(
            identity,
            NodeSettings(room=ROOM, address=f"{vaddr(i)}/16"),
            MemoryUnderlay(g.network),
            clock=lambda: clock[0],
            trust=g.trust_for(identity, i),
        )
        await node.start()
        nodes.append(node)
    a, b = nodes
    a.links.connect(b.identity.public_key, b.underlay.local_endpoint)
    if not await g.wait_for(lambda: b.id in a.links.links and a.id in b.links.links, 3.0):
        for n in nodes:
            await n.stop()
        raise AssertionError("the two members did not link")
    return g, clock, nodes


def test_a_session_is_rekeyed_by_its_initiator_and_a_link_whose_keys_grow_too_old_is_closed() -> None:
    async def scenario() -> None:
        g, clock, nodes = await linked_pair(26)
        a, b = nodes
        try:
            first = a.links.links[b.id].session
            assert first.initiator
            # What B's HELLO said is B's: the link that takes the new session keeps it (B says it again only when
            # its use of the link changes).
            link_ab, link_ba = a.links.links[b.id], b.links.links[a.id]
            assert await g.wait_for(lambda: all((x.tunnels_ok, x.lanes_ok) for x in (link_ab, link_ba)), 3.0)
            clock[0] += REKEY_AFTER_TIME + 1
            a.links.tick(clock[0])
            assert await g.wait_for(lambda: a.links.links[b.id].session is not first, 3.0)
            assert a.links.counters.get("rekeys started") == 1
            assert a.links.links[b.id].tunnels_ok and a.links.links[b.id].lanes_ok
            # The responder moves to the new session when the initiator first uses it (key confirmation).
            a.links.links[b.id].send(encode_ping(LinkMsg.PING, 1))
            assert await g.wait_for(lambda: b.links.links[a.id].session.created == clock[0], 3.0)
            # A peer that stops answering handshakes: its link is closed once the keys are REJECT_AFTER_TIME old.
            b.underlay.close()
            clock[0] += REJECT_AFTER_TIME + 1
            a.links.tick(clock[0])
            assert b.id not in a.links.links
            assert a.links.counters.get("links closed: keys too old") == 1
        finally:
            for n in nodes:
                await n.stop()

    run(scenario())


def test_what_either_end_sent_on_the_old_session_while_a_rekey_completes_is_not_lost() -> None:
    """The initiator moves to the new session at the response, the responder at the initiator's first packet on
    it: until then, and for packets already on their way, each end gets packets on the old session. Both keep
    accepting them (never sending on it) until the next rekey or REJECT_AFTER_TIME."""

    async def scenario() -> None:
        g, clock, nodes = await linked_pair(28)
        a, b = nodes
        try:
            first = a.links.links[b.id].session
            clock[0] += REKEY_AFTER_TIME + 1
            a.links.tick(clock[0])
            assert await g.wait_for(lambda: a.links.links[b.id].session is not first, 3.0)
            link_a, link_b = a.links.links[b.id], b.links.links[a.id]
            assert link_b.session.local_index == first.remote_index  # B has not seen the new one used yet
            ping = encode_ping(LinkMsg.PING, 1)
            # B still sends on the old session: A takes it.
            before = link_a.rx_bytes
            link_b.send(ping)
            assert await g.wait_for(lambda: a.links.links[b.id].rx_bytes > before, 3.0)
            # A's first packet on the new session moves B; a late one of A's on the old session still arrives.
            late = first.seal(ping)
            link_a.send(ping)
            assert await g.wait_for(lambda: b.links.links[a.id].session.local_index == link_a.session.remote_index, 3.0)
            before = b.links.links[a.id].rx_bytes
            link_a.path.send(late)
            assert await g.wait_for(lambda: b.links.links[a.id].rx_bytes > before, 3.0)
            assert a.links.counters.get("drop: unknown session", 0) == 0
            assert b.links.counters.get("drop: unknown session", 0) == 0
            # Past REJECT_AFTER_TIME the old session is closed: a packet on it is dropped.
            clock[0] = first.created + REJECT_AFTER_TIME + 1
            a.links.tick(clock[0])
            assert a.links.links[b.id].previous is None
            old_b = b.links.links[a.id].previous
            assert old_b is not None
            b.links.links[a.id].path.send(old_b.seal(ping))
            assert await g.wait_for(lambda: a.links.counters.get("drop: unknown session", 0) == 1, 3.0)
        finally:
            for n in nodes:
                await n.stop()

    run(scenario())


def test_certificates_are_renewed_through_the_overlay_at_half_life() -> None:
    async def scenario() -> None:
        lifetime = 8.0
        g = MemoryGroup(seed=27, group_key=GroupKey.from_seed(bytes([27]) * 32), cert_lifetime=lifetime, issuer_node=0)
        try:
            assert await g.form_ring(6, 30.0)
            first = {n.id: n.trust.certificate for n in g.nodes}  # type: ignore[union-attr]
            # Past half life every member holds a newer certificate for the same address, and links stay up.
            renewed = lambda: all(  # noqa: E731
                n.trust.certificate is not None  # type: ignore[union-attr]
                and n.trust.certificate.serial != first[n.id].serial  # type: ignore[union-attr]
                for n in g.nodes
            )
            assert await g.wait_for(renewed, lifetime), {n.id: n.counters for n in g.nodes}
            for n in g.nodes:
                assert n.trust.certificate.address == first[n.id].address  # type: ignore[union-attr]
            assert sum(n.counters.get("certificate renewals asked", 0) for n in g.nodes[1:]) >= 5
            assert await g.reach([(1, 4), (5, 2)], 10.0) == []
        finally:
            await g.stop()

    run(scenario())
