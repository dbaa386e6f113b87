"""A member that crashed and came back holds none of what its peers told it, while their links to it stay up
(overlay/links.py renews them in place): they tell it again (HELLO, the records it is a replica of), and
until it holds its records again, lookups that reach it as a key's root are answered by the other replicas.
Whole nodes in one process."""

from __future__ import annotations

import asyncio

import pytest

from overlay.dht.records import record_key
from overlay.dht.service import AddressService
from overlay.ids import ring_distance
from overlay.node import Node
from tests.support.memgroup import ROOM, MemoryGroup, vaddr

PASSED = "address lookups passed on to replicas"
RENEWED = "links renewed by the peer"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def group_with_a_root(g: MemoryGroup, size: int) -> tuple[int, int]:
    """A formed group with every address record at its root; (r, x): node r is the root of node x's record."""
    for _ in range(size):
        await g.add_node()
    assert await g.wait_for(lambda: not g.ring_correct(), 30.0)

    def root_of(i: int) -> Node:
        key = record_key(ROOM, vaddr(i))
        return min(g.nodes, key=lambda n: ring_distance(n.id, key))

    assert await g.wait_for(lambda: all(vaddr(i) in root_of(i).dht.held() for i in range(size)), 20.0)
    x = next(i for i in range(size) if root_of(i) is not g.nodes[i])
    return g.nodes.index(root_of(x)), x


def test_a_lookup_that_reaches_a_restarted_root_is_answered_by_the_other_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No records are handed over once the group has formed, so the restarted root holds nothing for the whole
    test: without the replicas' answers its own lookup would get its own "none" until LOOKUP_TIMEOUT."""

    async def scenario() -> None:
        g = MemoryGroup(seed=21)
        try:
            # Hand-over stays on while the group forms: a record published before the last members joined reaches
            # its final root only that way (without it, a slow CI run once waited out the 20 s for that).
            r, x = await group_with_a_root(g, 8)
            monkeypatch.setattr(AddressService, "hand_over", lambda self, peer: None)
            root = await g.restart_node(r, crash=True)
            assert await g.wait_for(lambda: len(root.links.links) >= 2, 10.0, step=0.05)
            assert await g.reach([(r, x)], 3.0, every=0.2) == []
            assert root.counters.get(PASSED, 0) >= 1
            assert vaddr(x) not in root.dht.held()
        finally:
            await g.stop()

    run(scenario())


def test_the_peers_of_a_restarted_member_hand_it_its_records_and_hello_again_over_the_links_they_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(AddressService, "_pass_on", lambda self, pkt, address: False)

    async def scenario() -> None:
        g = MemoryGroup(seed=21)
        try:
            r, x = await group_with_a_root(g, 8)
            before = {n.id: n.links.links.get(g.nodes[r].id) for n in g.nodes}
            root = await g.restart_node(r, crash=True)
            assert await g.wait_for(lambda: vaddr(x) in root.dht.held(), 5.0)
            kept = [n for n in g.nodes if n is not root and n.id in before and n.links.links.get(root.id) is not None]
            assert kept and sum(n.counters.get(RENEWED, 0) for n in kept) >= 1
            # Every peer whose link stayed up said HELLO again: the restarted member knows they take TUNNEL
            # packets (a HELLO says so) on every link it holds to them.
            assert await g.wait_for(
                lambda: all(root.links.links[n.id].tunnels_ok for n in kept if n.id in root.links.links), 5.0
            )
            assert await g.reach([(r, x), (x, r)], 5.0, every=0.2) == []
        finally:
            await g.stop()

    run(scenario())
