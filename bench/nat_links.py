#!/usr/bin/env python3
"""Benchmark: links through NATs. How long a link takes to set up by kind (host, srflx/prflx, relay), and iperf3
over a direct ICE link and over TURN, each beside the underlay path between the same namespaces, in one run.

The lab of tests/test_nat.py: a public member, two clusters behind endpoint-independent NATs, one behind a
symmetric NAT, Prosody and coturn on the public segment, every node the real CLI with ICE configured. Set-up
times come from the nodes' own debug logs: from an attempt's start (`attempt N to PEER`) to `link up: PEER` on
the initiating side. A benchmark, not a test: it exits 0 whatever the numbers (2 when it cannot run at all).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("IPOP_LOG_LEVEL", "debug")  # the set-up times are read from the nodes' debug logs

from bench.iperf_tap import IPERF_PORT, median_mbps
from tests.support.group import Group, missing_prerequisites

CLUSTERS = {"a": "cone", "b": "cone", "s": "symmetric"}
PLACEMENT: list[str | None] = [None, "a", "a", "b", "b", "s", "s"]
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
ATTEMPT = re.compile(_STAMP + r" DEBUG overlay.linksetup: attempt \d+ to ([0-9a-f]{16}): ")
LINK_UP = re.compile(_STAMP + r" INFO overlay.links: link up: ([0-9a-f]{16}) .* \((\w+)\)$")


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def setup_times(log: Path) -> list[tuple[str, float]]:
    """(kind, seconds) for each link this node set up itself: first attempt to the peer -> link up."""
    started: dict[str, float] = {}
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if m := ATTEMPT.match(line):
            started.setdefault(m.group(2), _when(m.group(1)))
        elif (m := LINK_UP.match(line)) and m.group(2) in started:
            kind = "srflx" if m.group(3) == "prflx" else m.group(3)
            out.append((kind, _when(m.group(1)) - started.pop(m.group(2))))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="lab builds to pool set-up times over")
    parser.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median is reported)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    args = parser.parse_args()
    problem = missing_prerequisites() or (None if shutil.which("iperf3") else "iperf3 is not installed")
    if problem:
        print(f"nat_links: cannot run: {problem}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {}
    results: dict[str, float | None] = {}
    for rnd in range(args.rounds):
        with Group(len(PLACEMENT), clusters=CLUSTERS, placement=PLACEMENT, turn=True, ice=True, prefix="inb") as g:
            for i in range(len(PLACEMENT)):
                g.join(i, timeout=40)
            late = [p for p, t in g.wait_for_pings(g.running_pairs(), 60.0).items() if t is None]
            if late:
                print(f"nat_links: no reply for {late} within 60 s; measuring anyway", flush=True)
            for m in g.members:
                for kind, seconds in setup_times(m.log):
                    times.setdefault(kind, []).append(seconds)
            if rnd + 1 < args.rounds:
                continue
            for m in g.members:
                g.lab.popen(
                    m.host, "iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            time.sleep(0.5)
            public, cone_a, cone_b, sym = g.members[0], g.members[1], g.members[3], g.members[5]
            kinds = {row["peer_id"]: row["kind"] for row in g.status(1)["links"]}
            print(f"link kinds at node1: cone b {kinds.get(cone_b.node_id)}, symmetric {kinds.get(sym.node_id)}")
            results["underlay, NAT a -> public"] = median_mbps(
                g, "underlay", cone_a.host, public.host.address, args.runs, args.seconds
            )
            results["overlay, NAT a -> public"] = median_mbps(
                g, "overlay to public", cone_a.host, public.ip, args.runs, args.seconds
            )
            results["overlay ICE direct, NAT a -> NAT b"] = median_mbps(
                g, "ICE srflx", cone_a.host, cone_b.ip, args.runs, args.seconds
            )
            results["overlay TURN, symmetric -> NAT b"] = median_mbps(
                g, "TURN relay", sym.host, cone_b.ip, args.runs, args.seconds
            )
    print()
    print("link set-up, first attempt to link up (initiating side), seconds:")
    for kind in ("host", "srflx", "relay", "tunnel"):
        v = times.get(kind, [])
        if v:
            print(f"  {kind:<7} n={len(v):3d}  p50 {pct(v, 0.5):.2f}  p95 {pct(v, 0.95):.2f}  max {max(v):.2f}")
    print()
    base = results.get("underlay, NAT a -> public")
    for label, mbps in results.items():
        ratio = f"  {mbps / base:.3f} of the underlay" if mbps and base and not label.startswith("underlay") else ""
        print(f"{label:<36} {'failed' if mbps is None else f'{mbps:8.0f} Mbit/s'}{ratio}")
    direct, ice = results.get("overlay, NAT a -> public"), results.get("overlay ICE direct, NAT a -> NAT b")
    if direct and ice:
        print(f"ICE direct (srflx) / overlay direct (host) in this run: {ice / direct:.2f}")
    print(f"(median of {args.runs} x {args.seconds:g} s iperf3 TCP, one stream; set-up times pooled over "
          f"{args.rounds} lab builds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
