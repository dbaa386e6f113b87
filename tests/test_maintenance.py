"""Maintenance rules with literal times: ring repair, keepalive, long links, surplus, backoff."""

from __future__ import annotations

import math
import random

from overlay.routing.maintenance import (
    BUSY_DEAD,
    BUSY_PING,
    DEAD_AFTER,
    DEAD_REASONS,
    PING_INTERVAL,
    SURPLUS_GRACE,
    SUSPECT_AFTER,
    UNREACHABLE_DEAD,
    UNREACHABLE_REASON,
    CloseLink,
    FindLong,
    Maintenance,
    OpenLink,
    Ping,
    SendNeighbours,
)
from overlay.routing.ring import HELD_MAX, RingTable, Role

SELF = 1 << 62


def fresh() -> Maintenance:
    return Maintenance(RingTable(SELF), random.Random(1))


def linked_to(peer: int, heard: float) -> Maintenance:
    """A node with one link, to `peer`, up since 0 and last heard from at `heard`."""
    m = fresh()
    m.table.add_link(peer)
    m.on_link_up(peer, 0.0)
    m.on_rx(peer, heard)
    return m


def test_a_new_link_learns_candidates_and_the_nearest_unlinked_ones_are_opened() -> None:
    m = fresh()
    m.table.add_link(5)
    m.on_link_up(5, 0.0)
    m.on_neighbours(5, [SELF + 10, SELF + 20, SELF + 30, SELF - 10, SELF - 20], 0.0)
    acts = m.tick(0.0)
    opened = {a.peer for a in acts if isinstance(a, OpenLink)}
    assert opened == {SELF + 10, SELF + 20, SELF - 10, SELF - 20}
    assert any(isinstance(a, SendNeighbours) for a in acts)
    # Not re-opened while the attempt runs.
    assert not [a for a in m.tick(1.0) if isinstance(a, OpenLink)]


def test_a_silent_link_is_pinged_then_declared_dead() -> None:
    m = fresh()
    m.table.add_link(7)
    m.on_link_up(7, 0.0)
    assert any(a == Ping(7) for a in m.tick(m.ping_interval))
    assert any(isinstance(a, CloseLink) and a.peer == 7 for a in m.tick(DEAD_AFTER))


def test_traffic_keeps_a_link_alive() -> None:
    m = fresh()
    m.table.add_link(7)
    m.on_link_up(7, 0.0)
    for t in range(1, 40):
        m.on_rx(7, float(t))
        assert not any(isinstance(a, CloseLink) for a in m.tick(float(t)))


def test_long_links_are_searched_once_the_group_is_big_enough() -> None:
    m = fresh()
    peers = [SELF + i * 2**50 for i in range(1, 4)] + [SELF - i * 2**50 for i in range(1, 4)]
    for p in peers:
        m.table.add_link(p)
        m.on_link_up(p, 0.0)
    finds = [a for a in m.tick(0.0) if isinstance(a, FindLong)]
    assert len(finds) == m.table.params.long_links
    # A refused search is retried later with a fresh draw.
    m.on_long_found(finds[0].slot, None, 1.0)
    again = [a for a in m.tick(10.0) if isinstance(a, FindLong)]
    assert finds[0].slot in {a.slot for a in again}


def test_a_link_nobody_uses_is_closed_after_the_grace_period_but_not_one_the_peer_uses() -> None:
    m = fresh()
    near = [SELF + 1, SELF + 2, SELF - 1, SELF - 2]
    for p in [*near, SELF + 2**60, SELF + 2**61]:
        m.table.add_link(p)
        m.on_link_up(p, 0.0)
    m.table.set_role(SELF + 2**61, Role.PEER_RING)
    m.tick(0.0)
    for p in m.table.neighbours():
        m.on_rx(p, SURPLUS_GRACE)  # all alive: only the surplus rule may close
    closed = {a.peer for a in m.tick(SURPLUS_GRACE + 1) if isinstance(a, CloseLink)}
    assert SELF + 2**60 in closed
    assert SELF + 2**61 not in closed
    assert not closed & set(near)


def test_failed_attempts_back_off_and_a_peer_is_forgotten_after_three() -> None:
    m = fresh()
    m.table.add_link(3)
    m.on_link_up(3, 0.0)
    m.on_neighbours(3, [SELF + 5], 0.0)
    assert OpenLink(SELF + 5) in m.tick(0.0)
    m.on_attempt_failed(SELF + 5, 1.0)
    assert OpenLink(SELF + 5) not in m.tick(2.0)
    assert OpenLink(SELF + 5) in m.tick(7.0)
    m.on_attempt_failed(SELF + 5, 8.0)
    m.on_attempt_failed(SELF + 5, 9.0)
    assert SELF + 5 not in m.table.wanted_ring_peers()


def test_a_link_that_carried_data_and_went_silent_is_avoided_then_dead_within_seconds() -> None:
    m = linked_to(7, heard=100.0)
    m.on_busy(7, 100.0)  # data sent; nothing comes back (the peer crashed)
    assert m.suspects(100.0) == frozenset() and m.watching(100.0)
    assert any(a == Ping(7) for a in m.tick(100.0 + BUSY_PING))
    assert m.suspects(100.0 + BUSY_PING) == frozenset()  # its ping may still come back
    assert m.suspects(100.0 + SUSPECT_AFTER) == {7}
    assert any(isinstance(a, CloseLink) and a.peer == 7 for a in m.tick(100.0 + BUSY_DEAD))


def test_one_way_data_on_a_healthy_link_is_never_avoided() -> None:
    m = fresh()
    m.table.add_link(7)
    m.on_link_up(7, 0.0)
    t = 0.0
    while t < 60.0:
        m.on_busy(7, t)
        for a in m.tick(t):
            assert not isinstance(a, CloseLink)
            if a == Ping(7):
                m.on_rx(7, t + 0.05)  # the pong, one round trip later
        assert 7 not in m.suspects(t)
        t += 0.1
    assert m.suspects(t) == frozenset()


def test_a_neighbour_reporting_a_peer_dead_makes_our_idle_link_to_it_a_suspect() -> None:
    m = linked_to(7, heard=50.0)
    m.suspect(7, 51.0)
    assert any(a == Ping(7) for a in m.tick(51.0))
    assert any(isinstance(a, CloseLink) and a.peer == 7 for a in m.tick(51.0 + BUSY_DEAD))
    m.suspect(9, 51.0)  # not linked: nothing to check
    assert 9 not in m.suspects(60.0)


def test_an_icmp_unreachable_is_checked_at_once_and_closes_a_silent_link_within_unreachable_dead() -> None:
    m = linked_to(7, heard=100.0)
    m.tick(100.5)
    m.unreachable(7, 101.0)  # the peer's process is gone: its host answered our gossip with port unreachable
    assert m.next_deadline() <= 101.0  # not the keepalive's 13 s: now
    assert any(a == Ping(7) for a in m.tick(101.0))
    assert m.suspects(101.0 + SUSPECT_AFTER - BUSY_PING) == {7}
    m.unreachable(7, 102.0)  # more ICMP errors do not push the deadline back
    assert not any(isinstance(a, CloseLink) for a in m.tick(101.0 + UNREACHABLE_DEAD - 0.1))
    assert m.next_deadline() <= 101.0 + UNREACHABLE_DEAD
    closed = [a for a in m.tick(101.0 + UNREACHABLE_DEAD) if isinstance(a, CloseLink)]
    assert closed == [CloseLink(7, UNREACHABLE_REASON)] and UNREACHABLE_REASON in DEAD_REASONS
    assert UNREACHABLE_DEAD < BUSY_DEAD < DEAD_AFTER


def test_a_forged_icmp_unreachable_costs_a_live_peer_nothing_but_a_ping() -> None:
    m = linked_to(7, heard=100.0)
    m.unreachable(7, 101.0)
    assert any(a == Ping(7) for a in m.tick(101.0))
    m.on_rx(7, 101.2)  # its answer
    for t in (101.0 + UNREACHABLE_DEAD, 101.0 + BUSY_DEAD, 101.0 + DEAD_AFTER - 1):
        assert not any(isinstance(a, CloseLink) for a in m.tick(t)), t
    assert m.suspects(101.0 + UNREACHABLE_DEAD) == frozenset()
    m.unreachable(9, 101.0)  # no link to 9: nothing to check
    assert 9 not in m.suspects(110.0)


def test_a_lookup_sent_into_a_dead_idle_link_makes_it_a_suspect_without_the_fast_keepalive() -> None:
    m = linked_to(7, heard=100.0)
    m.tick(100.5)
    m.on_sent(7, 101.0)  # a routed DHT lookup; the peer crashed
    assert not m.watching(101.0) and m.suspects(101.0) == frozenset()
    assert m.next_deadline() == 101.0 + BUSY_PING  # no beat while it waits: a timer at its ping
    assert any(a == Ping(7) for a in m.tick(101.0 + BUSY_PING))
    assert m.next_deadline() == 101.0 + SUSPECT_AFTER  # ... and at the moment routes should avoid it
    assert m.suspects(101.0 + SUSPECT_AFTER) == {7}
    assert any(isinstance(a, CloseLink) and a.peer == 7 for a in m.tick(101.0 + BUSY_DEAD))


def test_a_lookup_on_a_healthy_idle_link_costs_one_ping_at_most() -> None:
    m = linked_to(7, heard=100.0)
    m.on_sent(7, 101.0)
    m.on_rx(7, 101.5)  # any packet from the peer answers it
    assert not m.watching(101.5)
    assert not any(a == Ping(7) for a in m.tick(101.0 + BUSY_PING))


def test_hearing_from_a_link_moves_the_wake_up_for_its_silence_instead_of_leaving_a_wasted_tick() -> None:
    m = Maintenance(RingTable(SELF), random.Random(1), stabilize_interval=100.0)  # no gossip round in the way
    for peer in (7, 9):
        m.table.add_link(peer)
        m.on_link_up(peer, 0.0)
    m.tick(0.0)
    m.on_rx(7, 1.0)
    m.on_rx(9, 4.0)
    m.tick(4.0)
    assert (m.next_deadline(), m.due_peer) == (1.0 + PING_INTERVAL, 7)
    m.on_rx(7, 10.0)  # its gossip arrived: wake for 9's silence next, not for 7's old deadline
    assert (m.next_deadline(), m.due_peer) == (4.0 + PING_INTERVAL, 9)
    m.on_rx(9, 12.0)
    assert (m.next_deadline(), m.due_peer) == (10.0 + PING_INTERVAL, 7)
    assert not any(isinstance(a, Ping) for a in m.tick(10.0 + PING_INTERVAL - 0.1))


def test_a_peer_whose_link_died_comes_back_with_a_neighbours_unchanged_list() -> None:
    """Our links across a NAT die at once (it mapped us anew) while a neighbour outside stays linked to those
    peers: its next list is the one it sent before, and must still make them ring candidates again."""
    m = fresh()
    for peer in (5, SELF + 10):
        m.table.add_link(peer)
        m.on_link_up(peer, 0.0)
    assert m.on_neighbours(5, [SELF + 10, SELF + 20], 0.0)
    m.table.remove_link(SELF + 10)
    m.on_link_down(SELF + 10, 1.0, dead=True)
    assert SELF + 10 not in m.table.wanted_ring_peers()
    # Not while the neighbour, told it is suspect, may not have checked its own link yet (BUSY_DEAD)...
    assert not m.on_neighbours(5, [SELF + 10, SELF + 20], 1.0 + BUSY_DEAD)
    assert SELF + 10 not in m.table.wanted_ring_peers()
    # ... but once it has, the same list names a peer it still reaches.
    assert m.on_neighbours(5, [SELF + 10, SELF + 20], 12.0)
    assert OpenLink(SELF + 10) in m.tick(12.0)
    assert not m.on_neighbours(5, [SELF + 10, SELF + 20], 22.0)  # and now nothing


def test_a_peer_forgotten_after_failed_attempts_comes_back_only_with_a_changed_list() -> None:
    m = fresh()
    m.table.add_link(3)
    m.on_link_up(3, 0.0)
    m.on_neighbours(3, [SELF + 5], 0.0)
    for t in (1.0, 8.0, 9.0):
        m.on_attempt_failed(SELF + 5, t)
    assert SELF + 5 not in m.table.wanted_ring_peers()
    assert not m.on_neighbours(3, [SELF + 5], 20.0)  # the same list: still unreachable for us
    assert SELF + 5 not in m.table.wanted_ring_peers()
    assert m.on_neighbours(3, [SELF + 5, SELF + 6], 30.0)  # the neighbour's links changed: try again
    assert SELF + 5 in m.table.wanted_ring_peers()


def test_holds_on_forgotten_peers_are_bounded_and_the_oldest_goes_first() -> None:
    t = RingTable(SELF)
    t.add_link(7)
    first, last = SELF + 1, SELF + 1 + HELD_MAX
    t.set_neighbours_of(7, [first, last])
    for i in range(HELD_MAX + 1):
        t.forget(first + i, until=math.inf)  # first ... last: one more than the bound
    # The same list again: the first hold went to make room, so `first` is a candidate again; `last` is not.
    assert t.set_neighbours_of(7, [first, last], 10.0)
    assert t.closest_known(first) == first
    assert t.closest_known(last) != last
