"""Tunnel links offered ICE again (overlay/upgrades.py): when, and how often."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from overlay.upgrades import UPGRADE_AFTER, UPGRADE_MAX, TunnelUpgrades


def test_a_tunnel_is_offered_ice_after_a_while_then_at_doubling_intervals_up_to_the_cap() -> None:
    u = TunnelUpgrades()
    tries = [t for t in range(0, 3000) if u.due(float(t), [7])]
    assert tries[0] == UPGRADE_AFTER
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[:4] == [2 * UPGRADE_AFTER, 4 * UPGRADE_AFTER, 8 * UPGRADE_AFTER, 16 * UPGRADE_AFTER]
    assert max(gaps) == UPGRADE_MAX and gaps[-1] == UPGRADE_MAX


def test_tunnels_are_offered_ice_on_their_own_schedules_and_those_gone_are_forgotten() -> None:
    u = TunnelUpgrades()
    assert u.due(0.0, [1, 2]) == []
    assert u.due(10.0, [1, 2, 3]) == []
    assert u.due(UPGRADE_AFTER, [1, 2, 3]) == [1, 2]
    assert u.due(UPGRADE_AFTER + 10, [1, 2, 3]) == [3]
    assert u.due(UPGRADE_AFTER + 15, [3]) == []  # 1 and 2 left the tunnel
    assert u.due(UPGRADE_AFTER + 16, [1, 3]) == []  # 1 is a tunnel again: a new schedule
    assert u.due(2 * UPGRADE_AFTER + 16, [1, 3]) == [1]


def test_a_link_that_becomes_a_tunnel_again_starts_from_the_first_interval() -> None:
    u = TunnelUpgrades()
    for t in range(0, 200):
        u.due(float(t), [3])
    u.due(200.0, [])
    assert u.due(200.0 + UPGRADE_AFTER - 1, [3]) == []
    assert u.due(200.0 + UPGRADE_AFTER - 1 + UPGRADE_AFTER, [3]) == [3]


@given(st.lists(st.tuples(st.floats(0, 5), st.frozensets(st.integers(0, 5))), max_size=200))
def test_no_peer_is_offered_twice_within_the_first_interval(steps: list[tuple[float, frozenset[int]]]) -> None:
    u = TunnelUpgrades()
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
