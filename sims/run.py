"""One simulator run: build an overlay, route random pairs through the node's decision, report the numbers.

`simulate(SimConfig(...))` returns the JSON-ready dict that `ipop-overlay sim --json` prints; benches and
tests call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from overlay.routing.ring import RingParams
from sims.overlay import Overlay, build_kademlia, build_symphony
from sims.routes import (
    Route,
    Routing,
    moore_bound,
    random_pairs,
    route_pairs,
    shortest_path_mean,
    stretch,
    summary,
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SimConfig:
    """Everything that decides a run; the defaults are the node's defaults."""

    nodes: int = 10_000
    long_links: int = 4  # k: harmonic long links each node draws (RingParams.long_links)
    ring_size: int = 2  # successors, and as many predecessors (RingParams.ring_size)
    incoming_cap: int | None = None  # most long links a node accepts; None: 2k, as Symphony
    topology: str = "symphony"  # or "kademlia": XOR metric, one contact per bucket
    routing: str = "promise"  # the node's rule for data; or "lookahead" (strict watermark), or "greedy"
    depth: int = 1  # lookahead hops beyond a neighbour
    hop_aware: bool = False  # score lookahead paths by hops and log-distance
    metric: str = "ring"  # "ring" (both ways round) or "clockwise" (Symphony's unidirectional routing)
    links: str = "both"  # forward over every tunnel, or only "outgoing" (ring + own long links)
    size: str = "estimate"  # N for the harmonic draw: the node's own "estimate" or the "exact" N
    stratified: bool = True  # long-link slot i draws u in [i/k, (i+1)/k)
    redraw_linked: bool = True  # a long link that lands on a ring neighbour is drawn again
    candidates: int = 1  # proximity: pick the lowest-latency of the c nodes nearest the point
    latency: str = "none"  # or "plane": nodes uniform in a 100 ms x 100 ms square
    pairs: int = 10_000
    bfs_sources: int = 32  # sampled sources for the true shortest-path mean (0: skip)
    seed: int = 1
    load: str | None = None  # a GraphML picture (`ipop-overlay graph`) to route over instead of building one

    def params(self) -> RingParams:
        cap = 2 * self.long_links if self.incoming_cap is None else self.incoming_cap
        return RingParams(ring_size=self.ring_size, long_links=self.long_links, incoming_cap=cap)

    def routing_rule(self) -> Routing:
        return Routing(
            lookahead=self.routing in ("lookahead", "promise"),
            depth=self.depth,
            hop_aware=self.hop_aware,
            promise=self.routing == "promise",
        )


def build(cfg: SimConfig, progress: Progress | None = None) -> Overlay:
    if cfg.load is not None:
        from sims.export import read_graphml

        return read_graphml(cfg.load, cfg.params())
    if cfg.topology == "kademlia":
        return build_kademlia(cfg.nodes, seed=cfg.seed, latency=cfg.latency)
    if cfg.topology != "symphony":
        raise ValueError(f"unknown topology {cfg.topology!r}: use symphony or kademlia")
    return build_symphony(
        cfg.nodes,
        cfg.params(),
        seed=cfg.seed,
        size=cfg.size,
        links=cfg.links,
        metric=cfg.metric,
        latency=cfg.latency,
        candidates=cfg.candidates,
        stratified=cfg.stratified,
        redraw_linked=cfg.redraw_linked,
        progress=(lambda d, t: progress("build", d, t)) if progress else None,
    )


def simulate(cfg: SimConfig, progress: Progress | None = None) -> tuple[dict[str, Any], list[Route]]:
    """Run one configuration; returns the report and the routes (for plots)."""
    t0 = time.perf_counter()
    ov = build(cfg, progress)
    t_build = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed + 1)
    pairs = random_pairs(ov.n, cfg.pairs, rng)
    routes = route_pairs(
        ov, pairs, cfg.routing_rule(), progress=(lambda d, t: progress("route", d, t)) if progress else None
    )
    t_route = time.perf_counter() - t0 - t_build
    ok = [r for r in routes if r.delivered]
    hops = np.array([r.hops for r in ok], dtype=np.float64)
    deg = ov.degree()
    out: dict[str, Any] = {
        "nodes": ov.n,
        "long_links": cfg.long_links if cfg.topology == "symphony" else None,
        "ring_size": cfg.ring_size if cfg.topology == "symphony" else None,
        "incoming_cap": ov.params.incoming_cap if cfg.topology == "symphony" else None,
        "topology": cfg.topology,
        "routing": cfg.routing,
        "depth": cfg.depth,
        "hop_aware": cfg.hop_aware,
        "metric": ov.metric,
        "pairs": len(routes),
        "hops": summary(hops),
        "degree": {"mean": float(deg.mean()), "max": int(deg.max())},
        "success": len(ok) / len(routes) if routes else float("nan"),
        "failures": _outcomes(routes),
        "moore_bound": moore_bound(ov.n, float(deg.mean())),
    }
    if cfg.bfs_sources > 0:
        srcs = np.unique(pairs[: cfg.bfs_sources, 0])
        out["shortest_path"] = {"mean": shortest_path_mean(ov, srcs), "sources": len(srcs)}
        if len(hops):
            out["hops_over_shortest"] = float(hops.mean()) / out["shortest_path"]["mean"]
    if cfg.latency != "none":
        st = stretch(ov, routes)
        out["stretch"] = {"median": float(np.median(st)), "p90": float(np.percentile(st, 90))}
    out["seconds"] = time.perf_counter() - t0
    out["seconds_build"] = t_build
    out["seconds_route"] = t_route
    out["config"] = asdict(cfg)
    return out, routes


def _outcomes(routes: list[Route]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in routes:
        if not r.delivered:
            out[r.outcome] = out.get(r.outcome, 0) + 1
    return out
