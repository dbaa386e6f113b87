"""A built overlay in flat arrays: sorted node IDs, an adjacency in CSR form, and the long links each node drew.

Neighbour selection is the node's own: `RingParams`, `harmonic_target`, `estimate_size`, `SortedRing.closest`
and the incoming-cap rule of `RingTable.accepts_incoming_long` decide every link; this module only stores the
result compactly enough for 10^6 nodes (a RingTable per node would need gigabytes). `ring_table(i)` rebuilds
the node's own RingTable for one node, which is how tests check that the arrays and the node agree.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from overlay.ids import RING_BITS, ring_distance
from overlay.routing.forwarding import Distance, clockwise_distance, xor_distance
from overlay.routing.ring import (
    RingParams,
    RingTable,
    Role,
    SortedRing,
    choose_by_latency,
    estimate_size,
    harmonic_target,
    stratified_draw,
)

METRICS: dict[str, Distance] = {"ring": ring_distance, "clockwise": clockwise_distance, "xor": xor_distance}

# Our choice: a long link that cannot find a node under its incoming cap after this many draws is left out
# (it happens only when almost every node is full; Symphony redraws the same way, section 3.2).
MAX_DRAWS = 64


@dataclass
class Overlay:
    """N nodes: `ids[i]` is node i's ring ID (sorted ascending), its tunnels are `indices[indptr[i]:indptr[i+1]]`."""

    ids: np.ndarray  # uint64, sorted, unique
    indptr: np.ndarray  # int64, len N+1
    indices: np.ndarray  # int32, node indices
    long_out: np.ndarray  # int32 (N, k): the long links node i drew, -1 where none was placed
    params: RingParams
    topology: str = "symphony"
    metric: str = "ring"
    positions: np.ndarray | None = None  # float (N, 2): a point in the latency plane, when a model is on
    latency_scale: float = 100.0  # ms across one side of the plane
    _ids_list: list[int] = field(default_factory=list, repr=False)
    _nbr_cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._ids_list:
            self._ids_list = self.ids.tolist()

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self._ids_list)

    def degree(self) -> np.ndarray:
        """Tunnels per node: every distinct peer a node holds a link with, whichever side opened it."""
        return np.diff(self.indptr)

    @property
    def distance(self) -> Distance:
        return METRICS[self.metric]

    # -- lookups in node terms (IDs), as the forwarding function sees them ----------------------------------
    def node_id(self, i: int) -> int:
        return self._ids_list[i]

    def index_of(self, node_id: int) -> int:
        i = bisect.bisect_left(self._ids_list, node_id)
        if i == len(self._ids_list) or self._ids_list[i] != node_id:
            raise KeyError(f"no node with ID {node_id:016x} in this overlay")
        return i

    def neighbour_indices(self, i: int) -> list[int]:
        out: list[int] = self.indices[self.indptr[i] : self.indptr[i + 1]].tolist()
        return out

    def neighbour_ids(self, node_id: int) -> list[int]:
        """The IDs a node is linked to: `neighbours`, and also `neighbours_of` for the lookahead."""
        got = self._nbr_cache.get(node_id)
        if got is None:
            ids = self._ids_list
            got = [ids[j] for j in self.neighbour_indices(self.index_of(node_id))]
            if len(self._nbr_cache) < 2_000_000:
                self._nbr_cache[node_id] = got
        return got

    def size_estimate(self, i: int) -> float:
        """N as node i estimates it from its ring neighbours (RingTable.size_estimate on the same IDs)."""
        r = max(self.params.ring_size, 1)
        n, ids = self.n, self._ids_list
        succ = [ids[(i + j) % n] for j in range(1, min(r, n - 1) + 1)]
        pred = [ids[(i - j) % n] for j in range(1, min(r, n - 1) + 1)]
        return estimate_size(ids[i], succ, pred)

    def latency(self, a: int, b: int) -> float:
        """One-way latency in ms between node indices a and b (Euclidean distance in the plane)."""
        if self.positions is None:
            raise ValueError("this overlay was built without a latency model (--latency plane)")
        pa, pb = self.positions[a], self.positions[b]
        return float(np.hypot(pa[0] - pb[0], pa[1] - pb[1])) * self.latency_scale

    def ring_table(self, i: int) -> RingTable:
        """Node i's own RingTable with the links, roles and neighbour lists the simulator gave it."""
        t = RingTable(self.node_id(i), self.params)
        mine = {int(j) for j in self.long_out[i] if j >= 0}
        for j in self.neighbour_indices(i):
            role = Role.LONG_OUT if j in mine else Role.NONE
            if i in {int(x) for x in self.long_out[j] if x >= 0}:
                role |= Role.LONG_IN
            t.add_link(self.node_id(j), role)
        for j in self.neighbour_indices(i):
            t.set_neighbours_of(self.node_id(j), self.neighbour_ids(self.node_id(j)))
        return t


def random_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct uniform 64-bit IDs, sorted (stand-ins for hashes of public keys)."""
    ids = np.unique(rng.integers(0, 2**RING_BITS, size=n, dtype=np.uint64))
    while len(ids) < n:
        more = rng.integers(0, 2**RING_BITS, size=n - len(ids), dtype=np.uint64)
        ids = np.unique(np.concatenate([ids, more]))
    return ids


def plane_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    """Nodes placed uniformly in the unit square (the 'plane' latency model)."""
    return rng.random((n, 2))


def csr(n: int, src: np.ndarray, dst: np.ndarray, undirected: bool) -> tuple[np.ndarray, np.ndarray]:
    if undirected:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    keep = src != dst
    key = np.unique(src[keep].astype(np.int64) * n + dst[keep].astype(np.int64))
    s, d = key // n, key % n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(s, minlength=n), out=indptr[1:])
    return indptr, d.astype(np.int32)


def ring_edges(n: int, ring_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each node to its ring_size successors (predecessors are the same edges seen from the other end)."""
    i = np.arange(n, dtype=np.int64)
    src = np.concatenate([i for _ in range(ring_size)])
    dst = np.concatenate([(i + j) % n for j in range(1, ring_size + 1)])
    return src, dst


def build_symphony(
    n: int,
    params: RingParams | None = None,
    *,
    seed: int = 1,
    size: str = "exact",
    links: str = "both",
    metric: str = "ring",
    latency: str = "none",
    candidates: int = 1,
    redraw_linked: bool = False,
    stratified: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Overlay:
    """Ring of `params.ring_size` successors/predecessors plus `params.long_links` harmonic long links.

    Nodes draw their long links one by one in a random order (the order they would have joined in). Each
    draw uses the node's `harmonic_target` with N exact (`size="exact"`) or as the node itself estimates it
    from its ring neighbours (`size="estimate"`), links to the node closest to that point, and redraws when
    that node is already at its incoming cap, is the node itself or (with `redraw_linked`) already a peer.
    `candidates` > 1 is proximity neighbour selection: the c nodes nearest the point are asked and the
    lowest-latency one that accepts is taken. `links="outgoing"` forwards only over ring links and the
    node's own long links (Symphony's unidirectional model); `"both"` also over long links others drew to it.
    """
    if n < 2:
        raise ValueError(f"an overlay needs at least 2 nodes, got {n}")
    params = params or RingParams()
    nrng = np.random.default_rng(seed)
    rng = random.Random(seed)
    ids = random_ids(n, nrng)
    positions = plane_positions(n, nrng) if latency == "plane" else None
    ids_list: list[int] = ids.tolist()
    ring = SortedRing(ids_list)
    r, k, cap = params.ring_size, params.long_links, params.incoming_cap
    incoming = [0] * n
    long_out = np.full((n, max(k, 1)), -1, dtype=np.int32)
    half = candidates // 2

    def rtt_from(i: int) -> Callable[[int], float]:
        assert positions is not None
        px, py = positions[i]

        def rtt(node_id: int) -> float:
            q = positions[bisect.bisect_left(ids_list, node_id)]
            return float((q[0] - px) ** 2 + (q[1] - py) ** 2)

        return rtt

    order = list(range(n))
    rng.shuffle(order)
    for done, i in enumerate(order):
        self_id = ids_list[i]
        if size == "exact":
            n_est = float(n)
        else:
            succ = [ids_list[(i + j) % n] for j in range(1, min(r, n - 1) + 1)]
            pred = [ids_list[(i - j) % n] for j in range(1, min(r, n - 1) + 1)]
            n_est = estimate_size(self_id, succ, pred)
        mine: set[int] = set()
        if redraw_linked:
            mine |= {(i + j) % n for j in range(-r, r + 1)}
        slot = 0
        for _ in range(k * MAX_DRAWS):
            if slot == k:
                break
            u = stratified_draw(slot, k, rng.random()) if stratified else rng.random()
            point = harmonic_target(self_id, u, n_est)
            j = bisect.bisect_left(ids_list, ring.closest(point))
            if candidates > 1 and positions is not None:
                near = [(j + d) % n for d in range(-half, candidates - half)]
                ok = [ids_list[c] for c in near if c != i and c not in mine and incoming[c] < cap]
                if not ok:
                    continue
                j = bisect.bisect_left(ids_list, choose_by_latency(ok, rtt_from(i)))
            # RingTable.accepts_incoming_long: a node takes long links while it has fewer than incoming_cap.
            if j == i or j in mine or incoming[j] >= cap:
                continue
            incoming[j] += 1
            mine.add(j)
            long_out[i, slot] = j
            slot += 1
        if progress is not None and done % 4096 == 0:
            progress(done, n)
    rs, rd = ring_edges(n, r)
    lo_src = np.repeat(np.arange(n, dtype=np.int64), long_out.shape[1])
    lo_dst = long_out.reshape(-1).astype(np.int64)
    has = lo_dst >= 0
    lo_src, lo_dst = lo_src[has], lo_dst[has]
    if links == "both":
        indptr, indices = csr(n, np.concatenate([rs, lo_src]), np.concatenate([rd, lo_dst]), True)
    elif links == "outgoing":
        src = np.concatenate([rs, rd, lo_src])
        dst = np.concatenate([rd, rs, lo_dst])
        indptr, indices = csr(n, src, dst, False)
    else:
        raise ValueError(f"links must be 'both' or 'outgoing', got {links!r}")
    return Overlay(ids, indptr, indices, long_out, params, "symphony", metric, positions, _ids_list=ids_list)


def build_kademlia(n: int, *, seed: int = 1, latency: str = "none") -> Overlay:
    """Kademlia's shape as tunnels: for every non-empty bucket (peers sharing exactly p leading bits with the
    node) one random contact, routed by XOR distance. With IDs sorted, each bucket is a contiguous index range.
    """
    if n < 2:
        raise ValueError(f"an overlay needs at least 2 nodes, got {n}")
    nrng = np.random.default_rng(seed)
    ids = random_ids(n, nrng)
    positions = plane_positions(n, nrng) if latency == "plane" else None
    src_parts, dst_parts, per_node = [], [], []
    i = np.arange(n, dtype=np.int64)
    for p in range(RING_BITS):
        shift = np.uint64(RING_BITS - 1 - p)
        lo = ((ids >> shift) ^ np.uint64(1)) << shift
        hi = lo + (np.uint64(1) << shift) - np.uint64(1)
        a = np.searchsorted(ids, lo, side="left")
        b = np.searchsorted(ids, hi, side="right")
        has = b > a
        pick = a[has] + (nrng.random(int(has.sum())) * (b[has] - a[has])).astype(np.int64)
        src_parts.append(i[has])
        dst_parts.append(pick)
        per_node.append(has)
    indptr, indices = csr(n, np.concatenate(src_parts), np.concatenate(dst_parts), True)
    long_out = np.full((n, 1), -1, dtype=np.int32)
    buckets = sum(1 for has in per_node if has.any())
    params = RingParams(ring_size=0, long_links=buckets, incoming_cap=n)
    return Overlay(ids, indptr, indices, long_out, params, "kademlia", "xor", positions)
