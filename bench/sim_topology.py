"""Topology numbers the issue asks for: Symphony calibration, lookahead, beyond Symphony, latency stretch,
Kademlia. Prints a markdown table; every hop count is also given as a ratio to the BFS shortest path measured
on the same overlay in the same run. Not a pass/fail test.

    python bench/sim_topology.py            # N = 10^4 and 10^5 (about 3 minutes on 2 cores)
    python bench/sim_topology.py --quick    # N = 10^4 only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sims.run import SimConfig, simulate

SYMPHONY = {  # Manku, Bawa, Raghavan 2003: 1 successor/predecessor, k=4, incoming cap 2k, links both ways
    "ring_size": 1,
    "long_links": 4,
    "size": "exact",
    "stratified": False,
    "redraw_linked": False,
}


def rows(quick: bool) -> list[tuple[str, str, SimConfig]]:
    sizes = [10_000] if quick else [10_000, 100_000]
    out: list[tuple[str, str, SimConfig]] = []
    for n in sizes:
        target = "9.5-10.5" if n == 10_000 else "14.2-15.6"
        out.append(("symphony greedy (calibration)", target, SimConfig(nodes=n, routing="greedy", **SYMPHONY)))
        out.append(
            (
                "symphony greedy, clockwise only, own links",
                "",
                SimConfig(nodes=n, routing="greedy", metric="clockwise", links="outgoing", **SYMPHONY),
            )
        )
    for n in sizes:
        target = "mean<=6.8 p99<=13" if n == 10_000 else "mean<=9.5 p99<=16"
        iid = {"stratified": False, "redraw_linked": False}
        out.append(("defaults, lookahead, iid draws", target, SimConfig(nodes=n, **iid)))
        out.append(("defaults, lookahead (node default)", target, SimConfig(nodes=n)))
        out.append(("defaults, greedy", "", SimConfig(nodes=n, routing="greedy")))
    n = 10_000
    out.append(
        (
            "r=2 k=3, hop-aware depth 2",
            "<=1.3x SP, tunnels<=10",
            SimConfig(nodes=n, long_links=3, depth=2, hop_aware=True),
        )
    )
    out.append(
        (
            "r=1 k=4, hop-aware depth 2",
            "<=1.3x SP, tunnels<=10",
            SimConfig(nodes=n, ring_size=1, depth=2, hop_aware=True),
        )
    )
    out.append(("r=2 k=4, hop-aware depth 1", "", SimConfig(nodes=n, hop_aware=True)))
    out.append(("r=2 k=4, hop-aware depth 2", "", SimConfig(nodes=n, depth=2, hop_aware=True)))
    for c in (1, 16, 32):
        out.append(
            (f"plane latency, c={c}, lookahead", "stretch median<=3", SimConfig(nodes=n, latency="plane", candidates=c))
        )
    out.append(
        (
            "plane latency, c=16, hop-aware depth 2",
            "stretch median<=3",
            SimConfig(nodes=n, latency="plane", candidates=16, depth=2, hop_aware=True),
        )
    )
    for m in sizes:
        out.append(("kademlia, XOR greedy", "", SimConfig(nodes=m, topology="kademlia", routing="greedy")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=10_000)
    args = ap.parse_args()
    print(
        "| configuration | N | target | hops mean | p50 | p99 | max | tunnels mean/max | BFS SP | hops/SP "
        "| Moore | success | stretch med/p90 | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, target, cfg in rows(args.quick):
        cfg = SimConfig(**{**cfg.__dict__, "pairs": args.pairs})
        r, _ = simulate(cfg)
        h, d = r["hops"], r["degree"]
        sp = r.get("shortest_path", {}).get("mean", float("nan"))
        st = r.get("stretch")
        st_txt = f"{st['median']:.2f}/{st['p90']:.2f}" if st else ""
        print(
            f"| {label} | {r['nodes']} | {target} | {h['mean']:.2f} | {h['p50']:.0f} | {h['p99']:.0f} | {h['max']:.0f} "
            f"| {d['mean']:.2f}/{d['max']} | {sp:.2f} | {h['mean'] / sp:.2f} | {r['moore_bound']:.2f} "
            f"| {r['success']:.4f} | {st_txt} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
