"""Tunnel and TURN links offered ICE again (overlay/upgrades.py): when, how often, and what a TURN link's offer
holds."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.transport.paths import UdpPath
from overlay.upgrades import UPGRADE_AFTER, UPGRADE_MAX, PathUpgrades
from tests.support.fakeice import FakeAgent
from tests.support.memgroup import MemoryGroup


def test_a_tunnel_is_offered_ice_after_a_while_then_at_doubling_intervals_up_to_the_cap() -> None:
    u = PathUpgrades()
    tries = [t for t in range(0, 3000) if u.due(float(t), [7])]
    assert tries[0] == UPGRADE_AFTER
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[:4] == [2 * UPGRADE_AFTER, 4 * UPGRADE_AFTER, 8 * UPGRADE_AFTER, 16 * UPGRADE_AFTER]
    assert max(gaps) == UPGRADE_MAX and gaps[-1] == UPGRADE_MAX


def test_tunnels_are_offered_ice_on_their_own_schedules_and_those_gone_are_forgotten() -> None:
    u = PathUpgrades()
    assert u.due(0.0, [1, 2]) == []
    assert u.due(10.0, [1, 2, 3]) == []
    assert u.due(UPGRADE_AFTER, [1, 2, 3]) == [1, 2]
    assert u.due(UPGRADE_AFTER + 10, [1, 2, 3]) == [3]
    assert u.due(UPGRADE_AFTER + 15, [3]) == []  # 1 and 2 left the tunnel
    assert u.due(UPGRADE_AFTER + 16, [1, 3]) == []  # 1 is a tunnel again: a new schedule
    assert u.due(2 * UPGRADE_AFTER + 16, [1, 3]) == [1]


def test_a_link_that_becomes_a_tunnel_again_starts_from_the_first_interval() -> None:
    u = PathUpgrades()
    for t in range(0, 200):
        u.due(float(t), [3])
    u.due(200.0, [])
    assert u.due(200.0 + UPGRADE_AFTER - 1, [3]) == []
    assert u.due(200.0 + UPGRADE_AFTER - 1 + UPGRADE_AFTER, [3]) == [3]


@given(st.lists(st.tuples(st.floats(0, 5), st.frozensets(st.integers(0, 5))), max_size=200))
def test_no_peer_is_offered_twice_within_the_first_interval(steps: list[tuple[float, frozenset[int]]]) -> None:
    u = PathUpgrades()
    now, last = 0.0, {}
    for dt, tunnels in steps:
        now += dt
        for peer in u.due(now, tunnels):
            assert peer in tunnels
            assert peer not in last or now - last[peer] >= UPGRADE_AFTER
            last[peer] = now
        for peer in list(last):
            if peer not in tunnels:
                del last[peer]  # it left the tunnel: its schedule starts again


@pytest.mark.parametrize("upgrade", [True, False], ids=["relay-upgrade", "ice-restart"])
def test_a_turn_link_is_offered_ice_without_relays_and_keeps_its_path_when_nothing_better_answers(
    upgrade: bool,
) -> None:
    """The member with the lower ID offers ICE again on a link through TURN UPGRADE_AFTER seconds on, with host
    and server-reflexive candidates only: when no pair answers, no round with relays follows (it could only find
    another relay) and the link stays as it was. An ICE restart (our addresses changed) still tries relays."""

    async def scenario() -> None:
        g = MemoryGroup(seed=6)
        try:
            for _ in range(2):
                await g.add_node()
            assert await g.wait_for(lambda: all(len(n.links.links) == 1 for n in g.nodes), 10.0)
            lo, hi = sorted(g.nodes, key=lambda n: n.id)
            agents = {n.id: FakeAgent() for n in g.nodes}
            for n in g.nodes:
                n.links.setup.agent = agents[n.id]  # type: ignore[assignment]
                link = n.links.links[(hi if n is lo else lo).id]
                assert isinstance(link.path, UdpPath)
                link.path = UdpPath(link.path.underlay, link.path.endpoint, "relay")  # as ICE chose a TURN pair
            now = lo.clock()
            if upgrade:
                for n in (lo, hi):
                    n.ice = object()  # type: ignore[assignment]  # only whether the node runs ICE is read
                    try:
                        n.events.tick_upgrades(now)
                        n.events.tick_upgrades(now + UPGRADE_AFTER)
                    finally:
                        n.ice = None
                assert lo.links.counters.get("relay upgrades") == 1
                assert "relay upgrades" not in hi.links.counters  # one side only: two offers would collide
            else:
                lo.links.setup.restart(hi.identity.public_key, lo.signalling.route(hi.id))
            failed = "relay upgrades failed" if upgrade else "ice restarts failed"
            assert await g.wait_for(lambda: lo.links.counters.get(failed) == 1, 20.0), lo.links.counters
            offered = [s.relay for s in agents[lo.id].sessions]
            assert offered == ([False] if upgrade else [False, True])
            assert [s.relay for s in agents[hi.id].sessions] == offered  # the peer answered each round
            assert lo.links.links[hi.id].kind == "relay" and hi.id in lo.links.links
        finally:
            await g.stop()

    asyncio.run(scenario())
