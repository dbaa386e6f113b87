"""Hops versus N for the routing rules, against the BFS shortest path and the Moore bound of the same
overlay; writes docs/topology-hops-vs-n.png and docs/topology-hop-distribution.png and prints the table.

    python bench/sim_sweep.py [--big]    # --big adds N = 10^6 (about 10 more minutes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sims.plots import plot_sweep  # noqa: E402
from sims.run import SimConfig, simulate  # noqa: E402

SERIES = {
    "symphony": (
        "Symphony greedy (r=1, k=4, iid)",
        {"routing": "greedy", "ring_size": 1, "stratified": False, "redraw_linked": False},
    ),
    "greedy": ("greedy, node defaults (r=2, k=4)", {"routing": "greedy"}),
    "lookahead": ("lookahead, node defaults", {}),
    "hopaware2": ("hop-aware lookahead depth 2", {"depth": 2, "hop_aware": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--pairs", type=int, default=3000)
    args = ap.parse_args()
    sizes = [1_000, 3_000, 10_000, 30_000, 100_000] + ([1_000_000] if args.big else [])
    rows = []
    hist = {}
    print("| series | N | hops mean | p99 | tunnels mean | BFS SP | Moore | hops/SP | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for key, (label, kw) in SERIES.items():
            sources = 16 if n < 1_000_000 else 4
            r, routes = simulate(SimConfig(nodes=n, pairs=args.pairs, bfs_sources=sources, **kw))  # type: ignore[arg-type]
            r["label"] = key
            rows.append(r)
            if n == 10_000:
                hist[label] = [x.hops for x in routes if x.delivered]
            sp = r["shortest_path"]["mean"]
            print(
                f"| {label} | {n} | {r['hops']['mean']:.2f} | {r['hops']['p99']:.0f} | {r['degree']['mean']:.2f} "
                f"| {sp:.2f} | {r['moore_bound']:.2f} | {r['hops']['mean'] / sp:.2f} | {r['seconds']:.1f} |",
                flush=True,
            )
    docs = ROOT / "docs"
    plot_sweep(rows, str(docs / "topology-hops-vs-n.png"), [(label, key) for key, (label, _) in SERIES.items()])
    _hist(hist, str(docs / "topology-hop-distribution.png"))
    print(f"wrote {docs / 'topology-hops-vs-n.png'} and {docs / 'topology-hop-distribution.png'}")


def _hist(hist: dict[str, list[int]], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(v) for v in hist.values())
    for label, hops in hist.items():
        counts = [hops.count(h) / len(hops) for h in range(top + 1)]
        ax.plot(range(top + 1), counts, marker="o", label=label)
    ax.set_xlabel("overlay hops (N = 10^4)")
    ax.set_ylabel("fraction of routed pairs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
