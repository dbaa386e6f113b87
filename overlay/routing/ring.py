"""RingTable: one node's view of the ring: its links, the roles they play, and the peers it has heard of.

A node keeps `ring_size` successors and as many predecessors (the ring that makes greedy routing always
succeed), plus `long_links` long-distance links drawn from the harmonic distribution (Symphony: Manku, Bawa,
Raghavan, USITS 2003), and accepts at most `incoming_cap` long links from others so that no node becomes a
hub.
Successor/predecessor roles are derived from IDs, never stored: they change when a closer node appears.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from overlay.ids import RING_SIZE, clockwise, ring_distance


class Role(enum.Flag):
    NONE = 0
    LONG_OUT = enum.auto()  # we drew this peer for one of our long links
    LONG_IN = enum.auto()  # the peer drew us for one of its long links (counted against incoming_cap)
    BOOTSTRAP = enum.auto()  # the peer's only link (it is joining through us): kept until it has others
    PEER_RING = enum.auto()  # the peer keeps us as one of its ring neighbours (its view may differ from ours)
    ON_DEMAND = enum.auto()  # a direct link we opened because we send a lot to the peer (overlay/ondemand.py)
    PEER_ON_DEMAND = enum.auto()  # the peer keeps this link as one of its on-demand links


@dataclass(frozen=True, slots=True)
class RingParams:
    """Neighbour-selection parameters; the defaults follow the simulator (docs/topology.md)."""

    ring_size: int = 2  # successors, and as many predecessors
    long_links: int = 4  # k harmonic long links drawn by this node
    incoming_cap: int = 8  # most long links others may draw to this node (Symphony uses 2k)


def ring_neighbours(self_id: int, ids: Iterable[int], k: int) -> tuple[list[int], list[int]]:
    """The k nearest successors (clockwise) and k nearest predecessors of self_id among ids, nearest first.

    A peer may be both when there are fewer than 2k others. Brute-force reference for SortedRing.
    """
    others = {i for i in ids if i != self_id}
    succ = sorted(others, key=lambda i: clockwise(self_id, i))[:k]
    pred = sorted(others, key=lambda i: clockwise(i, self_id))[:k]
    return succ, pred


class SortedRing:
    """IDs in ring order with O(log n) successor/predecessor queries."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self._ids: list[int] = sorted(set(ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, node_id: object) -> bool:
        if not isinstance(node_id, int):
            return False
        i = bisect.bisect_left(self._ids, node_id)
        return i < len(self._ids) and self._ids[i] == node_id

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def add(self, node_id: int) -> None:
        i = bisect.bisect_left(self._ids, node_id)
        if i == len(self._ids) or self._ids[i] != node_id:
            self._ids.insert(i, node_id)

    def discard(self, node_id: int) -> None:
        i = bisect.bisect_left(self._ids, node_id)
        if i < len(self._ids) and self._ids[i] == node_id:
            del self._ids[i]

    def successors(self, point: int, k: int) -> list[int]:
        """The k IDs after `point` clockwise (never point itself), nearest first."""
        ids = self._ids
        n = len(ids)
        start = bisect.bisect_right(ids, point)
        out = (ids[(start + j) % n] for j in range(min(n, k + 1)))
        return [i for i in out if i != point][:k]

    def predecessors(self, point: int, k: int) -> list[int]:
        """The k IDs before `point` anticlockwise (never point itself), nearest first."""
        ids = self._ids
        n = len(ids)
        start = bisect.bisect_left(ids, point) - 1
        out = (ids[(start - j) % n] for j in range(min(n, k + 1)))
        return [i for i in out if i != point][:k]

    def closest(self, point: int) -> int:
        """The ID nearest to `point` by ring distance, `point` itself if present (ties: the smaller ID)."""
        if not self._ids:
            raise LookupError("empty ring")
        if point in self:
            return point
        cands = self.successors(point, 1) + self.predecessors(point, 1)
        return min(cands, key=lambda i: (ring_distance(i, point), i))


def estimate_size(self_id: int, successors: list[int], predecessors: list[int]) -> float:
    """Estimate the group size from the span of the nearest neighbours (Symphony, section 3.1).

    With s peers spread over an arc of length L on each side, nodes are ~L/s apart, so N ~= RING_SIZE*s/L.
    """
    span = 0
    count = 0
    if successors:
        span += clockwise(self_id, successors[-1])
        count += len(successors)
    if predecessors:
        span += clockwise(predecessors[-1], self_id)
        count += len(predecessors)
    if span == 0:
        return 1.0
    return max(1.0, RING_SIZE * count / span)


def harmonic_target(self_id: int, u: float, n_estimate: float) -> int:
    """The ring point for a long link, for a uniform draw u in [0, 1).

    Symphony's harmonic pdf p(x) = 1/(x ln n) on [1/n, 1] has inverse CDF x = n^(u-1): short links are as
    likely per octave as long ones, which gives O(log^2 n / k) greedy hops.
    """
    n = max(n_estimate, 2.0)
    x = math.exp(math.log(n) * (u - 1.0))
    return (self_id + int(x * (RING_SIZE - 1))) % RING_SIZE


def stratified_draw(slot: int, slots: int, u: float) -> float:
    """The uniform draw for long-link slot `slot` of `slots`, from a uniform u in [0, 1).

    Slot i draws from [i/slots, (i+1)/slots): the k links then cover the octaves of distance evenly instead
    of clumping, which the simulator measured at ~5% fewer hops (docs/topology.md); each link is still
    harmonic when the slot is picked at random.
    """
    # (slot + u) / slots can round up to the next slot's start: keep it inside its own slot
    return min((slot + u) / slots, math.nextafter((slot + 1) / slots, 0.0))


def choose_by_latency(candidates: Iterable[int], rtt: Callable[[int], float]) -> int:
    """Proximity neighbour selection: of the nodes near a harmonic point, the one with the lowest RTT.

    Picking among the few nodes next to the drawn point keeps the harmonic distribution of ring distances
    (Gummadi et al., "The impact of DHT routing geometry on resilience and proximity", SIGCOMM 2003) while
    each long hop gets short in latency. Ties break on the smaller ID so runs are reproducible.
    """
    best = min(candidates, key=lambda i: (rtt(i), i), default=None)
    if best is None:
        raise ValueError("no candidate for a long link")
    return best


# Our choice: holds on forgotten peers kept at most (RingTable._held), so a long-lived member of a large group
# with churn does not keep one for every peer whose link ever died (~100 KB at most).
HELD_MAX = 1024


@dataclass
class RingTable:
    """The links of one node, their roles, and the candidate peers it has heard of."""

    self_id: int
    params: RingParams = field(default_factory=RingParams)
    _links: dict[int, Role] = field(default_factory=dict)
    _linked: SortedRing = field(default_factory=SortedRing)
    _known: SortedRing = field(default_factory=SortedRing)
    _neighbours_of: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Forgotten peers -> until when a neighbour's unchanged list does not bring them back (set_neighbours_of);
    # a changed list always does. inf for peers our attempts failed to reach, so an unreachable peer is not
    # tried again at every round of gossip.
    _held: dict[int, float] = field(default_factory=dict)

    # -- links ---------------------------------------------------------------------------------------------
    def add_link(self, peer: int, role: Role = Role.NONE) -> None:
        if peer == self.self_id:
            raise ValueError("a node does not link to itself")
        self._links[peer] = self._links.get(peer, Role.NONE) | role
        self._linked.add(peer)
        self._known.add(peer)
        self._held.pop(peer, None)

    def set_role(self, peer: int, role: Role, on: bool = True) -> None:
        if peer in self._links:
            self._links[peer] = (self._links[peer] | role) if on else (self._links[peer] & ~role)

    def remove_link(self, peer: int) -> Role:
        """Forget a link (closed or failed); returns the roles it played so the caller can repair them."""
        role = self._links.pop(peer, Role.NONE)
        self._linked.discard(peer)
        self._neighbours_of.pop(peer, None)
        return role

    def forget(self, peer: int, *, until: float = 0.0) -> None:
        """Drop a peer from the candidates too (it left, our link to it died, or it could not be reached). Until
        `until`, only a neighbour's list that changed brings it back; after, any list that names it."""
        self.remove_link(peer)
        self._known.discard(peer)
        if until > 0.0:
            self._held.pop(peer, None)
            self._held[peer] = until
            if len(self._held) > HELD_MAX:  # the oldest hold goes: it has likely run out, or its peer left
                del self._held[next(iter(self._held))]

    def is_linked(self, peer: int) -> bool:
        return peer in self._links

    def link_count(self) -> int:
        return len(self._links)

    def role(self, peer: int) -> Role:
        return self._links.get(peer, Role.NONE)

    def neighbours(self) -> list[int]:
        return list(self._links)

    def incoming_long(self) -> int:
        return sum(1 for r in self._links.values() if Role.LONG_IN in r)

    def outgoing_long(self) -> list[int]:
        return [p for p, r in self._links.items() if Role.LONG_OUT in r]

    def accepts_incoming_long(self) -> bool:
        return self.incoming_long() < self.params.incoming_cap

    # -- what neighbours tell us -----------------------------------------------------------------------------
    def learn(self, ids: Iterable[int]) -> bool:
        """Take these peers as candidates; whether any was new to us."""
        before = len(self._known)
        for i in ids:
            if i != self.self_id:
                self._known.add(i)
        return len(self._known) != before

    def set_neighbours_of(self, peer: int, ids: Iterable[int], now: float = 0.0) -> bool:
        """A linked peer's own neighbour list: lookahead for forwarding and ring candidates for repair. Whether
        it told us anything: a list other than the peer's last, or a peer we did not know of."""
        if peer not in self._links:
            return False
        nbrs = tuple(i for i in ids if i != peer)
        old = self._neighbours_of.get(peer, ())
        if nbrs == old:
            # The list the peer sent before still brings back a peer we forgot since, once the hold is over: the
            # neighbour still reaches it. Otherwise members whose links across a NAT all died at once (the NAT
            # mapped them anew) stayed out of their ring places while their neighbours' lists stood still.
            return self.learn(i for i in nbrs if self._held.get(i, 0.0) <= now)
        for i in nbrs:
            self._held.pop(i, None)
        self.learn(nbrs)
        dropped = set(old) - set(nbrs)
        self._neighbours_of[peer] = nbrs
        # A candidate we only heard of through gossip goes once no neighbour mentions it any more (it left
        # or failed): otherwise a dead node would stay a "wanted" ring peer until attempts time out.
        for i in dropped:
            if i not in self._links and not any(i in lst for lst in self._neighbours_of.values()):
                self._known.discard(i)
                self._held.pop(i, None)
        return True

    def neighbours_of(self, peer: int) -> tuple[int, ...]:
        return self._neighbours_of.get(peer, ())

    # -- the ring --------------------------------------------------------------------------------------------
    def successors(self) -> list[int]:
        return self._linked.successors(self.self_id, self.params.ring_size)

    def predecessors(self) -> list[int]:
        return self._linked.predecessors(self.self_id, self.params.ring_size)

    def ring_closes(self) -> bool:
        """Whether we know every member of a ring of at most 2k+1 nodes (k = ring_size). Then every member is one
        of our k successors or k predecessors, so our ring place is known even when our successor and
        predecessor lists are short because we have fewer than k links. In the bench lab (3 members, the first
        and the third unable to reach each other) those two had one link each for 3 s, until the direct stage
        gave up and a tunnel came up.

        What we know is the whole ring when every linked peer has sent us a neighbour list that names us (it
        was sent after our link came up) and every peer we know of is linked or on one of those lists. A
        joiner with only its bootstrap link therefore waits for the bootstrap's list, and in a larger ring
        that list alone names more than 2k peers."""
        if not self._links or not self.few_known():
            return False
        reach = set(self._links)
        for peer in self._links:
            nbrs = self._neighbours_of.get(peer, ())
            if self.self_id not in nbrs:
                return False
            reach.update(nbrs)
        return all(i in reach for i in self._known)

    def few_known(self) -> bool:
        """Whether we know of at most 2k peers: the ring may be one that closes (ring_closes)."""
        return len(self._known) <= 2 * self.params.ring_size

    def wanted_ring_peers(self) -> list[int]:
        """The successors and predecessors this node should be linked to, among all peers it knows of."""
        k = self.params.ring_size
        want = self._known.successors(self.self_id, k) + self._known.predecessors(self.self_id, k)
        return list(dict.fromkeys(want))

    def ring_peers(self) -> set[int]:
        return set(self.successors()) | set(self.predecessors())

    def surplus_links(self) -> list[int]:
        """Linked peers that play no role: not a wanted ring neighbour and not a long or on-demand link."""
        keep = set(self.wanted_ring_peers()) | self.ring_peers()
        return [p for p, r in self._links.items() if r == Role.NONE and p not in keep]

    def nearest_known(self, point: int, k: int) -> list[int]:
        """The `k` known peers (linked or heard of) nearest `point`, either way round the ring."""
        if not len(self._known):
            return []
        cands = set(self._known.successors(point, k)) | set(self._known.predecessors(point, k))
        return sorted(cands, key=lambda n: (ring_distance(n, point), n))[:k]

    def closest_known(self, point: int) -> int | None:
        """The known peer (linked or not) nearest `point`, or None when this node knows nobody."""
        return self._known.closest(point) if len(self._known) else None

    def size_estimate(self) -> float:
        return estimate_size(
            self.self_id,
            self._known.successors(self.self_id, self.params.ring_size),
            self._known.predecessors(self.self_id, self.params.ring_size),
        )
