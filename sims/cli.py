"""`ipop-overlay sim` / `python -m sims`: build an overlay with the node's rules, route pairs, print numbers."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from sims.run import SimConfig, build, simulate


def _parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="ipop-overlay sim",
        description="Simulate the overlay with the node's own neighbour selection and forwarding decision.",
    )
    p.add_argument("--nodes", type=int, default=d.nodes, help="group size N (default %(default)s)")
    p.add_argument("--long-links", type=int, default=d.long_links, help="k harmonic long links per node")
    p.add_argument("--ring-size", type=int, default=d.ring_size, help="successors (and predecessors) kept")
    p.add_argument("--incoming-cap", type=int, default=None, help="most long links a node accepts (2k)")
    p.add_argument("--topology", choices=["symphony", "kademlia"], default=d.topology)
    p.add_argument(
        "--routing",
        choices=["greedy", "lookahead", "promise"],
        default=d.routing,
        help="promise: lookahead that may step away from the target (decide_promise)",
    )
    p.add_argument("--depth", type=int, default=d.depth, help="lookahead hops beyond a neighbour (1)")
    p.add_argument("--hop-aware", action="store_true", help="score lookahead paths by hops + log-distance")
    p.add_argument("--metric", choices=["ring", "clockwise"], default=d.metric)
    p.add_argument("--links", choices=["both", "outgoing"], default=d.links, help="tunnels used to forward")
    p.add_argument("--size", choices=["estimate", "exact"], default=d.size, help="N used for link draws")
    p.add_argument("--iid-draws", action="store_true", help="draw every long link independently")
    p.add_argument("--keep-ring-draws", action="store_true", help="keep long links that hit ring peers")
    p.add_argument("--candidates", type=int, default=d.candidates, help="proximity: lowest RTT of c nodes")
    p.add_argument("--latency", choices=["none", "plane"], default=d.latency)
    p.add_argument("--pairs", type=int, default=d.pairs, help="random pairs routed")
    p.add_argument("--bfs-sources", type=int, default=d.bfs_sources, help="BFS sources for shortest paths")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    p.add_argument("--plot", metavar="FILE.png", help="hop distribution histogram")
    p.add_argument("--graphml", metavar="FILE", help="write the built overlay as GraphML (small N)")
    p.add_argument(
        "--load", metavar="FILE", help="route over this GraphML picture (from `ipop-overlay graph`) instead of building"
    )
    churn = p.add_argument_group("churn (virtual clock, the node's maintenance rules)")
    churn.add_argument("--churn", action="store_true", help="run nodes joining and leaving instead")
    churn.add_argument("--duration", type=float, default=1800.0, help="virtual seconds of churn")
    churn.add_argument("--warmup", type=float, default=300.0, help="seconds over which the nodes first join")
    churn.add_argument("--settle", type=float, default=120.0, help="quiet seconds before the final check")
    churn.add_argument("--weibull-shape", type=float, default=0.5, help="session time shape (<1 heavy tail)")
    churn.add_argument("--weibull-scale", type=float, default=1800.0, help="session time scale, seconds")
    churn.add_argument("--sample-every", type=float, default=30.0, help="seconds between route samples")
    return p


class ProgressBar:
    """One line on stderr, redrawn at most every 0.2 s."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.2 and done < total:
            return
        self._last = now
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{stage:6s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        nodes=args.nodes,
        long_links=args.long_links,
        ring_size=args.ring_size,
        incoming_cap=args.incoming_cap,
        topology=args.topology,
        routing=args.routing,
        depth=args.depth,
        hop_aware=args.hop_aware,
        metric=args.metric,
        links=args.links,
        size=args.size,
        stratified=not args.iid_draws,
        redraw_linked=not args.keep_ring_draws,
        candidates=args.candidates,
        latency=args.latency,
        pairs=args.pairs,
        bfs_sources=args.bfs_sources,
        seed=args.seed,
        load=args.load,
    )


def _check(args: argparse.Namespace) -> str | None:
    if args.nodes < 2:
        return f"--nodes must be at least 2, got {args.nodes}"
    if args.pairs < 1:
        return f"--pairs must be at least 1, got {args.pairs}"
    if args.long_links < 0 or args.ring_size < 1:
        return "--long-links must be >= 0 and --ring-size >= 1"
    if args.candidates > 1 and args.latency == "none":
        return "--candidates picks by latency: add --latency plane"
    if args.depth < 1:
        return f"--depth must be at least 1, got {args.depth}"
    return None


def _print_text(r: dict[str, Any]) -> None:
    h, d = r["hops"], r["degree"]
    shape = f"k={r['long_links']} ring={r['ring_size']} cap={r['incoming_cap']}" if r["long_links"] else ""
    print(f"{r['topology']} N={r['nodes']} {shape} routing={r['routing']} metric={r['metric']}")
    print(f"  hops       mean {h['mean']:.2f}  p50 {h['p50']:.0f}  p99 {h['p99']:.0f}  max {h['max']:.0f}")
    print(f"  tunnels    mean {d['mean']:.2f}  max {d['max']}")
    print(f"  success    {r['success']:.4f}  {r['failures'] or ''}")
    if "shortest_path" in r:
        sp = r["shortest_path"]["mean"]
        print(f"  shortest   mean {sp:.2f} (BFS)  routed/shortest {r.get('hops_over_shortest', math.nan):.2f}")
    print(f"  moore      {r['moore_bound']:.2f}")
    if "stretch" in r:
        print(f"  stretch    median {r['stretch']['median']:.2f}  p90 {r['stretch']['p90']:.2f}")
    print(f"  seconds    {r['seconds']:.1f} (build {r['seconds_build']:.1f}, route {r['seconds_route']:.1f})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"ipop-overlay sim: {problem}", file=sys.stderr)
        return 2
    bar = None if args.json else ProgressBar()
    cfg = config_from(args)
    if args.churn:
        from sims.churn import ChurnConfig, run_churn

        ccfg = ChurnConfig(
            nodes=args.nodes,
            params=cfg.params(),
            duration=args.duration,
            warmup=args.warmup,
            settle=args.settle,
            weibull_shape=args.weibull_shape,
            weibull_scale=args.weibull_scale,
            sample_every=args.sample_every,
            seed=args.seed,
            promise=args.routing == "promise",
        )
        report = run_churn(ccfg, progress=bar)
    else:
        report, routes = simulate(cfg, progress=bar)
        if args.plot:
            from sims.plots import plot_hops

            plot_hops(routes, args.plot, title=f"{cfg.topology} N={cfg.nodes} {cfg.routing}")
        if args.graphml:
            from sims.export import write_graphml

            write_graphml(build(cfg), args.graphml)
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps(report, sort_keys=True))
    elif args.churn:
        from sims.churn import print_churn

        print_churn(report)
    else:
        _print_text(report)
    return 0
