"""The forwarding decision: forward strictly closer, deliver here, or report no route.

Every hop must be strictly closer (ring distance) to the target than the node that sends it on. The packet
carries the sender's distance as a watermark, so a relay whose tables disagree with its neighbour's cannot
bounce a packet back: the receiver drops anything that does not improve on the watermark. Because distances
only shrink, a packet can never loop; the TTL is a second guard against bugs and hostile senders.

Neighbour-of-neighbour lookahead (Manku, Naor, Wieder, "Know thy neighbor's neighbor", STOC 2004): among the
neighbours that are strictly closer, choose the one through which the closest known node (itself or one of
its own neighbours) is reachable. The constraint "strictly closer" keeps the watermark invariant.
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
) -> tuple[list[int], Decision]:
    """The route of a packet when every node on it applies `decide` to its own view: the node IDs visited
    (source first) and the decision that ended the walk (Deliver, NoRoute or a Drop). The simulator and the
    routing tests walk routes with this one function. `spacing(node)`: that node's RING_SIZE / N estimate
    for hop-aware lookahead; `alive(node)`: False ends the walk at a forward to a crashed node.
    """
    cur, watermark, ttl, path = src, FAR, DEFAULT_TTL, [src]
    while True:
        neighbours, neighbours_of = view(cur)
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
        watermark = distance(cur, target)
        ttl -= 1
        cur = d.next_hop
        path.append(cur)
        if alive is not None and not alive(cur):
            return path, DROP_DOWN
