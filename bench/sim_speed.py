"""Simulator speed and memory on this machine: N = 10^5 with 10^4 routed pairs (budget 60 s, 2 GB) and,
with --big, N = 10^6 (budget 10 min, 8 GB). Each run is a fresh `python -m sims` process so its peak RSS is
its own; prints measured/budget ratios. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(nodes: int, pairs: int, extra: list[str]) -> tuple[float, float, dict[str, object]]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "sims", "--nodes", str(nodes), "--pairs", str(pairs), "--json", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: runs go smallest first, so it is this run's peak
    return wall, max(peak_kb, before) / 1024**2, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also N = 10^6")
    args = ap.parse_args()
    cases = [(100_000, 10_000, 60.0, 2.0, []), (100_000, 10_000, 60.0, 2.0, ["--depth", "2", "--hop-aware"])]
    if args.big:
        cases.append((1_000_000, 10_000, 600.0, 8.0, ["--bfs-sources", "8"]))
    print("| N | pairs | routing | wall s | budget s | ratio | peak GB | budget GB | hops mean | build s | route s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for nodes, pairs, t_budget, m_budget, extra in cases:
        wall, gb, r = run(nodes, pairs, extra)
        rule = "hop-aware depth 2" if extra[:1] == ["--depth"] else r["routing"]
        print(
            f"| {nodes} | {pairs} | {rule} | {wall:.1f} | {t_budget:.0f} | {wall / t_budget:.2f} | {gb:.2f} "
            f"| {m_budget:.0f} | {r['hops']['mean']:.2f} | {r['seconds_build']:.1f} | {r['seconds_route']:.1f} |",  # type: ignore[index]
            flush=True,
        )


if __name__ == "__main__":
    main()
