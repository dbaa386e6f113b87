"""The pure routing core: ring table against brute force, and the forwarding decision's guarantees."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.ids import FAR, RING_MASK, RING_SIZE, ring_distance
from overlay.routing.forwarding import (
    DELIVER,
    DROP_PROMISE,
    DROP_TTL,
    DROP_WATERMARK,
    NO_ROUTE,
    Deliver,
    Forward,
    clockwise_distance,
    decide,
    decide_promise,
    next_hop,
    next_hop_promise,
    walk,
    xor_distance,
)
from overlay.routing.ring import (
    RingParams,
    RingTable,
    Role,
    SortedRing,
    choose_by_latency,
    estimate_size,
    harmonic_target,
    ring_neighbours,
    stratified_draw,
)

ids64 = st.integers(min_value=0, max_value=RING_MASK)
# Small rings with IDs crowded near 0 and near the wrap point, where off-by-one errors live.
edge_ids = st.one_of(ids64, st.integers(0, 40), st.integers(RING_MASK - 40, RING_MASK))


# -- SortedRing and RingTable against the brute-force reference -----------------------------------------------
@given(st.sets(edge_ids, min_size=1, max_size=40), edge_ids, st.integers(1, 5))
def test_sorted_ring_neighbours_match_brute_force(ids: set[int], point: int, k: int) -> None:
    ring = SortedRing(ids)
    succ, pred = ring_neighbours(point, ids, k)
    assert ring.successors(point, k) == succ
    assert ring.predecessors(point, k) == pred


@given(st.sets(edge_ids, min_size=1, max_size=40), edge_ids)
def test_sorted_ring_closest_is_the_nearest_by_ring_distance(ids: set[int], point: int) -> None:
    want = min(ids, key=lambda i: (ring_distance(i, point), i))
    assert SortedRing(ids).closest(point) == want


@given(st.sets(edge_ids, min_size=2, max_size=40), st.data())
def test_sorted_ring_add_discard_keeps_order_and_membership(ids: set[int], data: st.DataObject) -> None:
    ring = SortedRing()
    for i in ids:
        ring.add(i)
        ring.add(i)
    gone = data.draw(st.sampled_from(sorted(ids)))
    ring.discard(gone)
    assert list(ring) == sorted(ids - {gone})
    assert gone not in ring and len(ring) == len(ids) - 1


@given(edge_ids, st.sets(edge_ids, min_size=1, max_size=30), st.integers(1, 3))
def test_ring_table_ring_roles_match_brute_force(self_id: int, peers: set[int], k: int) -> None:
    peers.discard(self_id)
    t = RingTable(self_id, RingParams(ring_size=k))
    for p in peers:
        t.add_link(p)
    succ, pred = ring_neighbours(self_id, peers, k)
    assert t.successors() == succ
    assert t.predecessors() == pred
    assert t.ring_peers() == set(succ) | set(pred)


@given(edge_ids, st.sets(edge_ids, max_size=30), st.sets(edge_ids, max_size=30))
def test_wanted_ring_peers_come_from_everything_known(self_id: int, linked: set[int], heard: set[int]) -> None:
    t = RingTable(self_id, RingParams(ring_size=2))
    for p in linked - {self_id}:
        t.add_link(p)
    t.learn(heard)
    succ, pred = ring_neighbours(self_id, (linked | heard) - {self_id}, 2)
    assert t.wanted_ring_peers() == list(dict.fromkeys(succ + pred))


def test_the_ring_closes_once_every_linked_peer_has_named_us_and_at_most_2k_peers_are_known() -> None:
    # The bench lab: we (100) have one link, to 200, which is linked to us and to 300.
    t = RingTable(100, RingParams(ring_size=2))
    t.add_link(200)
    assert not t.ring_closes()  # its list has not come yet: a joiner with just its bootstrap link waits
    t.set_neighbours_of(200, [100, 300])
    assert t.ring_closes() and len(t.successors()) == 1
    t.learn([400])  # heard of, but on no linked peer's list: we may not reach it
    assert not t.ring_closes()
    t.set_neighbours_of(200, [100, 300, 400, 500, 600])  # five others: more than 2k, the lists must fill instead
    assert not t.few_known() and not t.ring_closes()
    stale = RingTable(100, RingParams(ring_size=2))
    stale.add_link(200)
    stale.set_neighbours_of(200, [300])  # a list sent before its link to us came up
    assert not stale.ring_closes()


def test_incoming_cap_counts_only_incoming_long_links() -> None:
    t = RingTable(1000, RingParams(incoming_cap=2))
    t.add_link(1, Role.LONG_OUT)
    t.add_link(2, Role.LONG_IN)
    assert t.accepts_incoming_long()
    t.add_link(3, Role.LONG_IN)
    assert not t.accepts_incoming_long()
    t.remove_link(2)
    assert t.accepts_incoming_long()


# -- neighbour selection helpers -----------------------------------------------------------------------------
@given(ids64, st.floats(0.0, 1.0, exclude_max=True), st.floats(2.0, 1e7))
def test_harmonic_target_is_between_one_spacing_and_the_whole_ring(self_id: int, u: float, n: float) -> None:
    d = (harmonic_target(self_id, u, n) - self_id) % RING_SIZE
    assert RING_SIZE / n * 0.999 <= d < RING_SIZE


@given(st.integers(1, 8), st.data())
def test_stratified_draws_stay_in_their_slot(slots: int, data: st.DataObject) -> None:
    slot = data.draw(st.integers(0, slots - 1))
    u = data.draw(st.floats(0.0, 1.0, exclude_max=True))
    assert slot / slots <= stratified_draw(slot, slots, u) < (slot + 1) / slots


def test_choose_by_latency_takes_lowest_rtt_then_smallest_id() -> None:
    rtt = {10: 5.0, 11: 2.0, 12: 2.0, 13: 9.0}
    assert choose_by_latency(rtt, rtt.__getitem__) == 11


def test_estimate_size_recovers_n_on_an_even_ring() -> None:
    n = 1000
    step = RING_SIZE // n
    succ, pred = [step, 2 * step], [RING_SIZE - step, RING_SIZE - 2 * step]
    assert abs(estimate_size(0, succ, pred) - n) < 1


# -- the forwarding decision ----------------------------------------------------------------------------------
def test_watermark_drops_a_packet_that_did_not_get_closer() -> None:
    d = decide(100, 200, exact=True, watermark=100, ttl=10, neighbours=[150])
    assert d == DROP_WATERMARK
    d = decide(100, 200, exact=True, watermark=101, ttl=10, neighbours=[150])
    assert d == Forward(150)


def test_ttl_expires_on_a_relay_but_not_at_the_destination() -> None:
    assert decide(100, 200, exact=True, watermark=FAR, ttl=0, neighbours=[150]) == DROP_TTL
    assert decide(200, 200, exact=True, watermark=FAR, ttl=0, neighbours=[150]) == DELIVER


def test_no_closer_neighbour_is_no_route_for_a_node_and_delivery_for_a_key() -> None:
    assert decide(100, 200, exact=True, watermark=FAR, ttl=5, neighbours=[50, 400]) == NO_ROUTE
    assert decide(100, 200, exact=False, watermark=FAR, ttl=5, neighbours=[50, 400]) == DELIVER


def test_lookahead_prefers_the_neighbour_whose_neighbour_is_the_target() -> None:
    nbrs = {150: [10], 120: [200]}
    assert next_hop(100, 200, [150, 120]) == 150
    assert next_hop(100, 200, [150, 120], nbrs.__getitem__) == 120


def test_hop_aware_lookahead_takes_the_shorter_path_to_the_target() -> None:
    # 150 reaches the target in two more hops (via 180), 120 in one: both look equally close by distance.
    nbrs = {150: [180], 180: [200], 120: [200], 200: []}
    look = nbrs.__getitem__
    assert next_hop(100, 200, [150, 120], look, depth=2) == 150
    assert next_hop(100, 200, [150, 120], look, depth=2, spacing=10.0) == 120


def test_ties_break_on_the_smaller_id_whatever_the_order() -> None:
    assert next_hop(0, 1000, [1100, 900]) == 900
    assert next_hop(0, 1000, [900, 1100]) == 900


def test_other_metrics_route_on_their_own_distance() -> None:
    # clockwise only: 300 is 'behind' target 200 from 100's point of view, so it is never closer
    assert next_hop(100, 200, [300], distance=clockwise_distance) is None
    assert next_hop(100, 200, [190], distance=clockwise_distance) == 190
    assert next_hop(0b1000, 0b1011, [0b1010, 0b0011], distance=xor_distance) == 0b1010


def _consistent_overlay(ids: list[int], rng: random.Random, extra: int) -> dict[int, list[int]]:
    """Each node linked to its 2 ring neighbours per side and `extra` random long links, both ways."""
    ring = sorted(ids)
    n = len(ring)
    adj: dict[int, set[int]] = {i: set() for i in ring}
    for pos, i in enumerate(ring):
        for j in range(1, min(2, n - 1) + 1):
            other = ring[(pos + j) % n]
            if other != i:
                adj[i].add(other)
                adj[other].add(i)
        for _ in range(extra):
            other = rng.choice(ring)
            if other != i:
                adj[i].add(other)
                adj[other].add(i)
    return {i: sorted(v) for i, v in adj.items()}


def _walk(adj: dict[int, list[int]], src: int, target: int, exact: bool, **kw: Any) -> tuple[list[int], object]:
    look = kw.pop("neighbours_of", None)
    if "spacing" in kw:
        fixed = kw.pop("spacing")
        kw["spacing"] = lambda _node: fixed
    path, d = walk(src, target, exact=exact, view=lambda n: (adj[n], look), **kw)
    for a, b in itertools.pairwise(path):
        assert b in adj[a], "a hop that is not a link"
    assert len(path) <= len(adj) + 1, "a route visited more nodes than exist: a loop"
    return path, d


ROUTING_VARIANTS = [
    {},
    {"neighbours_of": "look"},
    {"neighbours_of": "look", "depth": 2, "spacing": 1e15},
    {"distance": clockwise_distance},
]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(edge_ids, min_size=2, max_size=60, unique=True),
    st.integers(0, 3),
    st.integers(0, 2**32),
    st.sampled_from(range(len(ROUTING_VARIANTS))),
    st.data(),
)
def test_forwarding_on_a_consistent_ring_reaches_the_target_without_revisiting(
    ids: list[int], extra: int, seed: int, variant: int, data: st.DataObject
) -> None:
    adj = _consistent_overlay(ids, random.Random(seed), extra)
    kw: dict[str, object] = dict(ROUTING_VARIANTS[variant])
    if kw.get("neighbours_of") == "look":
        kw["neighbours_of"] = adj.__getitem__
    src = data.draw(st.sampled_from(ids))
    dst = data.draw(st.sampled_from(ids))
    path, outcome = _walk(adj, src, dst, True, **kw)
    assert isinstance(outcome, Deliver) and path[-1] == dst
    assert len(set(path)) == len(path)
    distance = kw.get("distance", ring_distance)
    dists = [distance(p, dst) for p in path]  # type: ignore[operator]
    assert all(a > b for a, b in itertools.pairwise(dists))


@settings(max_examples=60, deadline=None)
@given(st.lists(edge_ids, min_size=2, max_size=60, unique=True), st.integers(0, 2**32), edge_ids, st.booleans())
def test_key_lookups_end_at_the_node_closest_to_the_key(ids: list[int], seed: int, key: int, lookahead: bool) -> None:
    adj = _consistent_overlay(ids, random.Random(seed), 2)
    src = random.Random(seed).choice(ids)
    look = {"neighbours_of": adj.__getitem__} if lookahead else {}
    path, outcome = _walk(adj, src, key, False, **look)
    assert isinstance(outcome, Deliver)
    assert ring_distance(path[-1], key) == min(ring_distance(i, key) for i in ids)


# -- promise routing -----------------------------------------------------------------------------------------
def test_promise_routing_steps_away_to_reach_a_neighbour_of_the_target() -> None:
    # 90 is farther from 200 than 100 is, but it links to 200: a strict watermark forbids the step, a promise
    # of (distance 0, one more hop) allows it.
    nbrs = {150: [160], 90: [200]}
    assert next_hop(100, 200, [150, 90], nbrs.__getitem__) == 150
    assert next_hop_promise(100, 200, [150, 90], nbrs.__getitem__) == (90, 0, 1)
    d = decide_promise(100, 200, exact=True, promise=FAR, ttl=5, neighbours=[150, 90], neighbours_of=nbrs.__getitem__)
    assert d == Forward(90, promise=0, promise_hops=1)


def test_promise_must_be_kept_or_the_packet_is_dropped() -> None:
    # this node (distance 50 from 200) knows a node at distance 20 (180), two hops away through 160
    lists = {160: [180]}
    kw: dict[str, Any] = {"exact": True, "ttl": 5, "neighbours": [160], "neighbours_of": lambda n: lists.get(n, [])}
    assert decide_promise(150, 200, promise=10, promise_hops=2, **kw) == DROP_PROMISE
    # the promised distance again must come in fewer hops than promised, or a route could circle
    assert decide_promise(150, 200, promise=20, promise_hops=1, **kw) == DROP_PROMISE
    assert decide_promise(150, 200, promise=20, promise_hops=2, **kw) == Forward(160, promise=20, promise_hops=1)
    assert decide_promise(150, 200, promise=30, promise_hops=0, **kw) == Forward(160, promise=20, promise_hops=1)


def _bound(own: int, promise: int, hops: int) -> tuple[int, int]:
    return (own, 0) if own <= promise else (promise, hops)


def _promise_walk(
    src: int,
    target: int,
    exact: bool,
    view: Any,
    depth: int,
    spacing: float,
    limit: int,
) -> tuple[list[int], object]:
    """Walk with decide_promise, asserting at every hop that the node's bound strictly decreases."""
    cur, promise, hops, path = src, FAR, 0, [src]
    last: tuple[int, int] | None = None
    for _ in range(limit + 1):
        nbrs, look = view(cur)
        state = _bound(ring_distance(cur, target), promise, hops)
        assert last is None or state < last, "the promise bound did not decrease: routes could loop"
        last = state
        d = decide_promise(
            cur,
            target,
            exact=exact,
            promise=promise,
            promise_hops=hops,
            ttl=10**6,
            neighbours=nbrs,
            neighbours_of=look,
            depth=depth,
            spacing=spacing,
        )
        if not isinstance(d, Forward):
            return path, d
        assert d.next_hop in nbrs and d.promise is not None
        cur, promise, hops = d.next_hop, d.promise, d.promise_hops
        path.append(cur)
    raise AssertionError(f"no end after {limit} hops: {path[:20]}")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(edge_ids, min_size=2, max_size=40, unique=True),
    st.integers(0, 3),
    st.integers(0, 2**32),
    st.integers(1, 2),
    st.sampled_from([0.0, 1e15]),
    st.booleans(),
    st.data(),
)
def test_promise_routing_on_a_consistent_ring_always_arrives(
    ids: list[int], extra: int, seed: int, depth: int, spacing: float, exact: bool, data: st.DataObject
) -> None:
    adj = _consistent_overlay(ids, random.Random(seed), extra)
    src = data.draw(st.sampled_from(ids))
    target = data.draw(st.sampled_from(ids)) if exact else data.draw(edge_ids)
    path, outcome = _promise_walk(src, target, exact, lambda n: (adj[n], adj.__getitem__), depth, spacing, 4 * len(ids))
    assert isinstance(outcome, Deliver)
    assert ring_distance(path[-1], target) == min(ring_distance(i, target) for i in ids)
    assert all(b in adj[a] for a, b in itertools.pairwise(path))
    same, _ = _walk(adj, src, target, exact, promise=True, depth=depth, neighbours_of=adj.__getitem__, spacing=spacing)
    assert same == path, "walk() takes the route decide_promise gives hop by hop"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(edge_ids, min_size=2, max_size=24, unique=True),
    st.integers(0, 2**32),
    st.integers(1, 2),
    st.sampled_from([0.0, 1e15, 1e18]),
    st.booleans(),
    st.data(),
)
def test_promise_routing_ends_whatever_the_tables_say(
    ids: list[int], seed: int, depth: int, spacing: float, exact: bool, data: st.DataObject
) -> None:
    """Links one-way and random, every node's copy of every neighbour list its own stale guess: routes may
    fail, but each hop lowers the bound and no route outlives (depth + 1) x (distinct distances) hops."""
    rng = random.Random(seed)
    links = {i: rng.sample(ids, rng.randint(0, min(5, len(ids)))) for i in ids}
    lists = {(i, j): rng.sample(ids, rng.randint(0, min(5, len(ids)))) for i in ids for j in ids}

    def view(node: int) -> tuple[list[int], Any]:
        return links[node], lambda other: lists[(node, other)]

    src = data.draw(st.sampled_from(ids))
    target = data.draw(st.sampled_from(ids)) if exact else data.draw(edge_ids)
    distinct = len({ring_distance(i, target) for i in ids})
    _, outcome = _promise_walk(src, target, exact, view, depth, spacing, (depth + 1) * distinct)
    assert outcome in (DELIVER, NO_ROUTE, DROP_PROMISE)
