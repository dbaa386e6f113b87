"""The forwarding decision: forward strictly closer, deliver here, or report no route.

Every hop must be strictly closer (ring distance) to the target than the node that sends it on. The packet
carries the sender's distance as a watermark, so a relay whose tables disagree with its neighbour's cannot
bounce a packet back: the receiver drops anything that does not improve on the watermark. Because distances
only shrink, a packet can never loop; the TTL is a second guard against bugs and hostile senders.

Neighbour-of-neighbour lookahead (Manku, Naor, Wieder, "Know thy neighbor's neighbor", STOC 2004): among the
neighbours that are strictly closer, choose the one through which the closest known node (itself or one of
its own neighbours) is reachable. The constraint "strictly closer" keeps the watermark invariant.

Promise routing (next_hop_promise, decide_promise; an option, measured in docs/topology.md) drops that
constraint: a hop may move away from the target to reach a node whose neighbours are much closer, and the
watermark carries the distance the sender promised instead of its own, which still rules out loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from overlay.ids import FAR, RING_MASK, ring_distance

# From the protocol: a hop count no correct route on a ring of 10^6 nodes comes near (p99 there is ~16).
DEFAULT_TTL = 64


@dataclass(frozen=True, slots=True)
class Forward:
    next_hop: int
    # Only with promise routing (decide_promise): the distance the packet now carries as its watermark.
    promise: int | None = None
    promise_hops: int = 0


@dataclass(frozen=True, slots=True)
class Deliver:
    pass


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No neighbour is closer and this node is not the exact target: tell the source."""


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Decision = Forward | Deliver | NoRoute | Drop
DELIVER = Deliver()
NO_ROUTE = NoRoute()
DROP_TTL = Drop("ttl expired")
DROP_WATERMARK = Drop("not closer than the previous hop (watermark)")
DROP_PROMISE = Drop("cannot reach the distance the previous hop promised")

NeighboursOf = Callable[[int], Iterable[int]]
# (node, target) -> how far node is from target; smaller is closer, 0 only at the target itself.
Distance = Callable[[int, int], int]


def clockwise_distance(node: int, target: int) -> int:
    """Distance from node to target travelling clockwise only: Symphony's unidirectional routing metric."""
    return (target - node) & RING_MASK


def xor_distance(node: int, target: int) -> int:
    """Kademlia's XOR metric (Maymounkov, Mazieres, IPTPS 2002), kept as a measured alternative."""
    return node ^ target


# Our choice, measured in sims/ (docs/topology.md): in hop-aware lookahead one hop is worth a factor
# e^(1/4) ~ 1.28 in distance to the target; weights from 1.6 to 5 measured the same at N=10^4.
LOG_WEIGHT = 4.0


def next_hop(
    self_id: int,
    target: int,
    neighbours: Iterable[int],
    neighbours_of: NeighboursOf | None = None,
    *,
    distance: Distance = ring_distance,
    depth: int = 1,
    spacing: float = 0.0,
) -> int | None:
    """The neighbour to hand a packet for `target` to, or None when no neighbour is strictly closer.

    With `neighbours_of` (a neighbour's own neighbour list, as it last told us) the choice looks `depth`
    hops beyond each neighbour (depth 2 needs the lists of the neighbours' neighbours too). Only paths whose
    every hop gets strictly closer count, since the watermark forbids any other. With `spacing` (the mean
    gap between IDs, RING_SIZE / N) the lookahead is hop-aware: a path is scored by its hops plus
    LOG_WEIGHT * ln(1 + distance / spacing), so a target two hops away beats a slightly closer node three
    hops away; without it, the closest node seen wins whatever it costs in hops (Manku, Naor, Wieder).
    Ties break on the neighbour's own distance, then on the smaller ID, so that every node and the
    simulator pick the same route for the same tables. `distance` is the metric (ring distance both ways
    round, the default, because links carry traffic in both directions).
    """
    own = distance(self_id, target)
    look = neighbours_of if depth > 0 else None

    def score(hops: int, d: int) -> float:
        return hops + LOG_WEIGHT * math.log1p(d / spacing) if d else float(hops)

    def ball(node: int, dn: int, hops: int, left: int, best: float) -> float:
        # best score (or distance) over the strictly improving paths up to `left` more hops from node
        assert look is not None
        for m in look(node):
            dm = distance(m, target)
            if dm >= dn:
                continue
            value = score(hops + 1, dm) if spacing else dm
            if value < best:
                best = value
            if left > 1 and dm:
                best = ball(m, dm, hops + 1, left - 1, best)
        return best

    best: tuple[float, int, int] | None = None
    for n in neighbours:
        dn = distance(n, target)
        if dn >= own:
            continue
        value: float = score(1, dn) if spacing else dn
        if look is not None and dn:
            value = ball(n, dn, 1, depth, value)
        key = (value, dn, n)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def decide(
    self_id: int,
    target: int,
    *,
    exact: bool,
    watermark: int,
    ttl: int,
    neighbours: Iterable[int],
    neighbours_of: NeighboursOf | None = None,
    distance: Distance = ring_distance,
    depth: int = 1,
    spacing: float = 0.0,
) -> Decision:
    """What a node does with a routed packet.

    `exact`: the packet is for the node whose ID is `target` (data, link signalling); otherwise it is for
    whichever node is closest to the key `target` (DHT operations, joins).
    `watermark`: the distance of the previous hop to the target (`FAR` at the origin).
    `distance`, `depth`, `spacing`: as for next_hop.
    """
    own = distance(self_id, target)
    if watermark != FAR and own >= watermark:
        return DROP_WATERMARK
    if own == 0:
        return DELIVER
    nh = next_hop(self_id, target, neighbours, neighbours_of, distance=distance, depth=depth, spacing=spacing)
    if nh is None:
        return NO_ROUTE if exact else DELIVER
    if ttl <= 0:
        return DROP_TTL
    return Forward(nh)


def next_hop_promise(
    self_id: int,
    target: int,
    neighbours: Iterable[int],
    neighbours_of: NeighboursOf | None = None,
    *,
    promise: int = FAR,
    promise_hops: int = 0,
    distance: Distance = ring_distance,
    depth: int = 1,
    spacing: float = 0.0,
) -> tuple[int, int, int] | None:
    """Promise routing: (next hop, new promise, new promise_hops), or None when no path keeps the promise.

    Unlike next_hop, a neighbour need not be closer than this node: what counts is the closest node reachable
    through it within the lookahead (the neighbour itself, its neighbours, and theirs with depth 2), as in
    Manku, Naor and Wieder's neighbour-of-neighbour greedy, which may step away from the target to reach a
    neighbour whose neighbour is much closer. Instead of the sender's own distance the packet carries a
    promise: a distance P and the hops h within which a node at distance P was known to be reachable from
    the receiver. This node's bound is (P, h), or (its own distance, 0) when that is smaller (lexicographic
    order). A path of k hops through a neighbour, ending at node e, counts if distance(e) < P, or if
    distance(e) == P and k - 1 < h (it reaches the promised distance in fewer hops than promised). The best
    path wins (smallest distance, or with `spacing` smallest hops + LOG_WEIGHT * ln(1 + distance / spacing),
    as for next_hop; ties on fewer hops, smaller distance, the neighbour's distance, then the smaller ID) and
    the packet goes on with the promise (distance(e), k - 1).

    Why a route cannot loop, whatever the tables say. Let S(x) be the bound above at node x. Forwarding to n
    with promise (P', h') needs (P', h') < S(x), and S(n) <= (P', h'), so S strictly decreases at every hop.
    P only takes distances of node IDs seen in some view and h is at most `depth`, so a route makes at most
    (depth + 1) x (distinct such distances) hops, whatever the TTL. With consistent tables a promise is
    always kept: the promised node is k - 1 hops beyond the next hop, inside that node's own lookahead.
    """
    own = distance(self_id, target)
    bound, bound_hops = (own, 0) if own <= promise else (promise, promise_hops)
    look = neighbours_of if depth > 0 else None

    def score(hops: int, d: int) -> float:
        if not spacing:
            return float(d)
        return hops + LOG_WEIGHT * math.log1p(d / spacing) if d else float(hops)

    best: tuple[float, int, int, int, int] | None = None
    for n in neighbours:
        dn = distance(n, target)
        # at a fixed hop count the score only grows with distance, so the best end at each depth is the closest
        level = [n]
        d = dn
        for hops in range(1, depth + 2):
            if hops > 1:
                assert look is not None
                level = [m for node in level for m in look(node)]
                if not level:
                    break
                d = min(distance(m, target) for m in level)
            if d < bound or (d == bound and hops <= bound_hops):
                key = (score(hops, d), hops, d, dn, n)
                if best is None or key < best:
                    best = key
            if look is None or d == 0:
                break
    return None if best is None else (best[4], best[2], best[1] - 1)


def decide_promise(
    self_id: int,
    target: int,
    *,
    exact: bool,
    promise: int,
    ttl: int,
    neighbours: Iterable[int],
    neighbours_of: NeighboursOf | None = None,
    promise_hops: int = 0,
    distance: Distance = ring_distance,
    depth: int = 1,
    spacing: float = 0.0,
) -> Decision:
    """decide() for promise routing (next_hop_promise): the packet's watermark field carries the promise
    distance (`FAR` at the origin) and a small field its hops; Forward.promise and Forward.promise_hops are
    the values to send on.

    A node farther than its promise that cannot keep it (its tables disagree with the sender's) drops the
    packet; a node at or within its promise that has nothing better is where the route ends, as in decide.
    """
    own = distance(self_id, target)
    if own == 0:
        return DELIVER
    nh = next_hop_promise(
        self_id,
        target,
        neighbours,
        neighbours_of,
        promise=promise,
        promise_hops=promise_hops,
        distance=distance,
        depth=depth,
        spacing=spacing,
    )
    if nh is None:
        if own > promise:
            return DROP_PROMISE
        return NO_ROUTE if exact else DELIVER
    if ttl <= 0:
        return DROP_TTL
    return Forward(nh[0], promise=nh[1], promise_hops=nh[2])


# A node's view for a walk: its neighbours, and its copy of their neighbour lists (None: no lookahead).
View = Callable[[int], tuple[Iterable[int], NeighboursOf | None]]
DROP_DOWN = Drop("next hop is down")


def walk(
    src: int,
    target: int,
    *,
    exact: bool,
    view: View,
    distance: Distance = ring_distance,
    depth: int = 1,
    spacing: Callable[[int], float] | None = None,
    alive: Callable[[int], bool] | None = None,
    promise: bool = False,
) -> tuple[list[int], Decision]:
    """The route of a packet when every node on it applies `decide` to its own view: the node IDs visited
    (source first) and the decision that ended the walk (Deliver, NoRoute or a Drop). The simulator and the
    routing tests walk routes with this one function. `spacing(node)`: that node's RING_SIZE / N estimate
    for hop-aware lookahead; `alive(node)`: False ends the walk at a forward to a crashed node. `promise`:
    every node applies decide_promise instead, and the watermark carries the promise; a node that cannot keep
    the promise it was given finishes the route under the strict rule, as the node does (a packet switches
    once and never back, and each phase only moves closer by its own measure, so no loop).
    """
    cur, watermark, hops_left, ttl, path = src, FAR, 0, DEFAULT_TTL, [src]
    while True:
        neighbours, neighbours_of = view(cur)
        if promise:
            d = decide_promise(
                cur,
                target,
                exact=exact,
                promise=watermark,
                promise_hops=hops_left,
                ttl=ttl,
                neighbours=neighbours,
                neighbours_of=neighbours_of,
                distance=distance,
                depth=depth,
                spacing=spacing(cur) if spacing is not None else 0.0,
            )
            if d is DROP_PROMISE:
                promise, watermark = False, FAR
                continue
        else:
            d = decide(
                cur,
                target,
                exact=exact,
                watermark=watermark,
                ttl=ttl,
                neighbours=neighbours,
                neighbours_of=neighbours_of,
                distance=distance,
                depth=depth,
                spacing=spacing(cur) if spacing is not None else 0.0,
            )
        if not isinstance(d, Forward):
            return path, d
        watermark = d.promise if promise and d.promise is not None else distance(cur, target)
        hops_left = d.promise_hops
        ttl -= 1
        cur = d.next_hop
        path.append(cur)
        if alive is not None and not alive(cur):
            return path, DROP_DOWN
