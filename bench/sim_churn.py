"""Route success and maintenance traffic under Weibull churn, with the node's own maintenance rules on a
virtual clock. The baseline is the same overlay with no churn (session times far longer than the run).
Not a pass/fail test.

    python bench/sim_churn.py [--nodes 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sims.churn import ChurnConfig, run_churn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--duration", type=float, default=1800.0)
    args = ap.parse_args()
    print(
        "| sessions (Weibull shape, scale) | mean session s | joins | leaves | success during | worst sample "
        "| after repair | msgs/node/s | opens/node/s | tunnels mean/max | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, scale in ((1.0, 1e9), (0.5, 3600.0), (0.5, 1800.0), (0.5, 600.0)):
        cfg = ChurnConfig(
            nodes=args.nodes,
            duration=args.duration,
            weibull_shape=shape,
            weibull_scale=scale,
            sample_every=60.0,
            sample_pairs=300,
        )
        r = run_churn(cfg)
        w = r["weibull"]
        label = "none (baseline)" if scale >= 1e9 else f"{shape}, {scale:.0f} s"
        mean = "inf" if scale >= 1e9 else f"{w['mean_session']:.0f}"
        print(
            f"| {label} | {mean} | {r['joins']} | {r['leaves']} | {r['success_during_churn']:.4f} "
            f"| {r['success_min']:.3f} | {r['success_after_settle']:.4f} | {r['messages_per_node_s']:.2f} "
            f"| {r['actions_per_node_s'].get('OpenLink', 0.0):.3f} "
            f"| {r['degree']['mean']:.1f}/{r['degree']['max']} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
