"""Routing random pairs over a built overlay with the node's forwarding decision, and the numbers around it.

Every hop is `overlay.routing.forwarding.decide` called with the current node's links and, for lookahead,
its neighbours' lists: the simulator owns no routing rule. Shortest paths (BFS over the CSR arrays), the
Moore bound and latency stretch are what the routes are measured against.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from overlay.ids import RING_SIZE
from overlay.routing.forwarding import Deliver, NeighboursOf, walk
from sims.overlay import Overlay


@dataclass(frozen=True, slots=True)
class Route:
    path: list[int]  # node indices, source first
    delivered: bool
    outcome: str  # "delivered", "no route", or the drop reason

    @property
    def hops(self) -> int:
        return len(self.path) - 1


@dataclass(frozen=True, slots=True)
class Routing:
    """How nodes choose the next hop: the knobs of `decide`, as the node would set them."""

    lookahead: bool = True  # use the neighbours' neighbour lists (False: plain greedy)
    depth: int = 1  # hops beyond a neighbour the lookahead sees (2: neighbours' neighbours' lists too)
    hop_aware: bool = False  # score lookahead paths by hops and log-distance (needs the size estimate)
    promise: bool = False  # promise routing (decide_promise): hops may move away to reach a closer node


GREEDY = Routing(lookahead=False)


def route(ov: Overlay, src: int, target: int, routing: Routing = GREEDY, *, exact: bool = True) -> Route:
    """The path a packet from node index `src` to ring ID `target` takes, hop by hop through `decide`."""
    nbrs = ov.neighbour_ids
    lookahead = nbrs if routing.lookahead else None

    def view(node: int) -> tuple[Iterable[int], NeighboursOf | None]:
        return nbrs(node), lookahead

    def spacing(node: int) -> float:
        # hop-aware lookahead needs the ID spacing: each node uses its own estimate of N, as the node would
        return RING_SIZE / ov.size_estimate(ov.index_of(node))

    ids, d = walk(
        ov.node_id(src),
        target,
        exact=exact,
        view=view,
        distance=ov.distance,
        depth=routing.depth,
        spacing=spacing if routing.hop_aware else None,
        promise=routing.promise,
    )
    path = [ov.index_of(i) for i in ids]
    if isinstance(d, Deliver):
        return Route(path, True, "delivered")
    return Route(path, False, getattr(d, "reason", "no route"))


def random_pairs(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """count (src, dst) index pairs with src != dst."""
    src = rng.integers(0, n, size=count)
    dst = (src + rng.integers(1, n, size=count)) % n
    return np.stack([src, dst], axis=1)


def route_pairs(
    ov: Overlay,
    pairs: np.ndarray,
    routing: Routing = GREEDY,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Route]:
    out = []
    for k, (s, t) in enumerate(pairs.tolist()):
        out.append(route(ov, s, ov.node_id(t), routing))
        if progress is not None and k % 256 == 0:
            progress(k, len(pairs))
    return out


def bfs_hops(ov: Overlay, src: int) -> np.ndarray:
    """Hop distance from node src to every node over the tunnels (-1 where unreachable); level-synchronous."""
    n = ov.n
    dist = np.full(n, -1, dtype=np.int32)
    dist[src] = 0
    frontier = np.array([src], dtype=np.int64)
    level = 0
    indptr, indices = ov.indptr, ov.indices
    while len(frontier):
        level += 1
        starts, ends = indptr[frontier], indptr[frontier + 1]
        lens = ends - starts
        if lens.sum() == 0:
            break
        offs = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        nxt = np.unique(indices[offs])
        nxt = nxt[dist[nxt] < 0]
        dist[nxt] = level
        frontier = nxt.astype(np.int64)
    return dist


def shortest_path_mean(ov: Overlay, sources: np.ndarray) -> float:
    """Mean hop distance from the sampled sources to every other reachable node (the graph's true optimum)."""
    total = 0
    count = 0
    for s in sources.tolist():
        d = bfs_hops(ov, s)
        reach = d > 0
        total += int(d[reach].sum())
        count += int(reach.sum())
    return total / count if count else float("nan")


def moore_bound(n: int, degree: float) -> float:
    """Lowest possible mean distance in any graph of n nodes and this degree: every node at hop h is new
    (at most d(d-1)^(h-1) of them), so no routing on these tunnels can average fewer hops.
    """
    if n <= 1:
        return 0.0
    if degree <= 1:
        return float("nan")
    left = float(n - 1)
    total = 0.0
    h = 1
    layer = float(degree)
    while left > 0:
        take = min(layer, left)
        total += h * take
        left -= take
        h += 1
        layer *= degree - 1
    return total / (n - 1)


def path_latency(ov: Overlay, path: list[int]) -> float:
    return sum(ov.latency(a, b) for a, b in itertools.pairwise(path))


def stretch(ov: Overlay, routes: list[Route]) -> np.ndarray:
    """Overlay path latency over the direct latency, for each delivered route (pairs at one point skipped)."""
    vals = []
    for r in routes:
        if not r.delivered or r.hops == 0:
            continue
        direct = ov.latency(r.path[0], r.path[-1])
        if direct > 0:
            vals.append(path_latency(ov, r.path) / direct)
    return np.array(vals)


def summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }
