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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from overlay.ids import FAR, ring_distance

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


def next_hop(
    self_id: int,
    target: int,
    neighbours: Iterable[int],
    neighbours_of: NeighboursOf | None = None,
) -> int | None:
    """The neighbour to hand a packet for `target` to, or None when no neighbour is strictly closer.

    With `neighbours_of` (a neighbour's own neighbour list, as it last told us) the choice looks one hop
    further. Ties break on the neighbour's own distance, then on the smaller ID, so that every node and the
    simulator pick the same route for the same tables.
    """
    own = ring_distance(self_id, target)
    best: tuple[int, int, int] | None = None
    for n in neighbours:
        dn = ring_distance(n, target)
        if dn >= own:
            continue
        value = dn
        if neighbours_of is not None and dn:
            for m in neighbours_of(n):
                dm = ring_distance(m, target)
                if dm < value:
                    value = dm
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
) -> Decision:
    """What a node does with a routed packet.

    `exact`: the packet is for the node whose ID is `target` (data, link signalling); otherwise it is for
    whichever node is closest to the key `target` (DHT operations, joins).
    `watermark`: the ring distance of the previous hop to the target (`FAR` at the origin).
    """
    own = ring_distance(self_id, target)
    if watermark != FAR and own >= watermark:
        return DROP_WATERMARK
    if own == 0:
        return DELIVER
    nh = next_hop(self_id, target, neighbours, neighbours_of)
    if nh is None:
        return NO_ROUTE if exact else DELIVER
    if ttl <= 0:
        return DROP_TTL
    return Forward(nh)
