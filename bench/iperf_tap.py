#!/usr/bin/env python3
"""Benchmark: iperf3 TCP between two members' TAP addresses, against the raw veth between the same
namespaces, measured in the same run; prints both (median of 3 runs) and their ratio.

Two `ipop-overlay join` processes in namespaces on one lab bridge with a real Prosody (tests/support/
group.py). A benchmark, not a test: it exits 0 whatever the numbers (2 when it cannot run at all). Every
iperf3 run is bounded in time; the lab is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.group import TAP_NAME, VIRTUAL_MTU, Group, missing_prerequisites
from tests.support.netlab import HOST_IFNAME, Host

IPERF_PORT = 5201
PREFIX6 = "fd00:1:2:3::/64"  # --ipv6: each member's IPv6 address is this prefix and its node ID
# Where node1's datagrams went: coalesced chunk trains and whole datagrams are "handled"; chunks that came one by
# one are rebuilt by the Engine; "passed up" went to Python.
CHUNK_COUNTERS = (
    "fast path: datagrams handled",
    "fast path: chunks: messages rebuilt",
    "fast path: datagrams passed up",
)
# Our choice: iperf3 seconds beyond -t before a run counts as hung (connect, warm-up, report).
RUN_SLACK_S = 15.0


def iperf_mbps(g: Group, client: Host, server_ip: str, seconds: float) -> float | None:
    """One iperf3 TCP run from `client` to `server_ip`; receiver-side Mbit/s, None when it failed."""
    argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
            "--connect-timeout", "3000"]  # fmt: skip
    try:
        out = g.lab.run(client, *argv, check=False, timeout=seconds + RUN_SLACK_S)
    except subprocess.TimeoutExpired:
        print(f"  iperf3 to {server_ip} still running after {seconds + RUN_SLACK_S:.0f} s", flush=True)
        return None
    try:
        report = json.loads(out.stdout)
    except ValueError:
        report = {}
    try:
        bps = float(report["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError):
        reason = report.get("error") or out.stderr.strip() or out.stdout.strip()[-200:]
        print(f"  iperf3 to {server_ip} failed (exit {out.returncode}): {reason}", flush=True)
        server_log = g.workdir / f"iperf3-{server_ip}.log"
        if server_log.exists():
            tail = server_log.read_text(errors="replace").strip().splitlines()[-4:]
            print("  server said: " + " | ".join(line.strip() for line in tail), flush=True)
        return None
    return bps / 1e6


def tap_offload(g: Group, host: Host) -> str:
    """Whether the node opened its TAP with TSO: it then caps super-frames with gso_max_size (65536 is the
    kernel's default, left alone without offload)."""
    out = g.lab.run(host, "ip", "-d", "-j", "link", "show", TAP_NAME, check=False, timeout=10)
    try:
        size = json.loads(out.stdout)[0]["gso_max_size"]
    except (ValueError, LookupError, TypeError):
        return "unknown"
    return f"TSO super-frames up to {size} bytes" if size != 65536 else "off (1 frame per MTU-sized packet)"


def median_mbps(g: Group, label: str, client: Host, server_ip: str, runs: int, seconds: float) -> float | None:
    values = []
    for n in range(runs):
        mbps = iperf_mbps(g, client, server_ip, seconds)
        print(
            f"  {label} run {n + 1}/{runs}: " + ("failed" if mbps is None else f"{mbps:.0f} Mbit/s"),
            flush=True,
        )
        if mbps is not None:
            values.append(mbps)
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median is reported)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--no-relay", action="store_true", help="skip the relayed path (node0 -> node2 via node1)")
    parser.add_argument(
        "--routed",
        action="store_true",
        help="also a pair with no link at all (four nodes, one ring neighbour each side): data sealed end to end, "
        "relays forward on the routed header",
    )
    parser.add_argument(
        "--software-gso",
        action="store_true",
        help="the members' kernels cut UDP GSO sends in software (ethtool tx-udp-segmentation off), as for a NIC "
        "without UDP segmentation: chunks then arrive one by one, not coalesced by GRO",
    )
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help="also IPv6 inside the VPN ([vnic] address6): the same paths to the members' IPv6 addresses",
    )
    args = parser.parse_args()
    problem = missing_prerequisites() or (None if shutil.which("iperf3") else "iperf3 is not installed")
    if problem:
        print(f"iperf_tap: cannot run: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results: dict[str, float | None] = {}
    with Group(2 if args.no_relay else 3, prefix="ipb", address6=PREFIX6 if args.ipv6 else None) as g:
        if not args.no_relay:
            g.block_udp(0, 2)  # node0 and node2 can only talk through node1
        g.join_all()
        if args.software_gso:
            for m in g.members:
                g.lab.run(m.host, "ethtool", "-K", HOST_IFNAME, "tx-udp-segmentation", "off")
        pairs = [(0, j) for j in range(1, g.size)]
        late = [p for p, t in g.wait_for_pings(pairs, 30.0).items() if t is None]
        if args.ipv6:
            late += [(i, j, "IPv6") for (i, j), t in g.wait_for_pings(pairs, 30.0, v6=True).items() if t is None]
        if late:
            print(f"iperf_tap: no overlay ping reply for {late} within 30 s; measuring anyway", flush=True)
        for m in g.members[1:]:
            # One server per namespace, listening on all its addresses (veth and TAP); its log is kept
            # under both names so a failed run can show what the server saw.
            log = g.workdir / f"iperf3-{m.host.address}.log"
            g.lab.popen(m.host, "iperf3", "-s", "-p", str(IPERF_PORT), "--logfile", str(log),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            for address in (m.ip, m.ip6) if args.ipv6 else (m.ip,):
                (g.workdir / f"iperf3-{address}.log").symlink_to(log)
        time.sleep(0.5)  # iperf3 -s binds within milliseconds; the client also retries for 3 s
        a, b = g.members[0], g.members[1]
        print(f"veth {a.host.address} -> {b.host.address}; TAP {a.ip} -> {b.ip} (MTU {VIRTUAL_MTU})", flush=True)
        print(f"TAP offload: {tap_offload(g, a.host)}", flush=True)
        results["raw veth"] = median_mbps(g, "veth", a.host, b.host.address, args.runs, args.seconds)
        results["overlay direct"] = median_mbps(g, "tap direct", a.host, b.ip, args.runs, args.seconds)
        if args.ipv6:
            assert b.ip6 is not None
            results["direct IPv6"] = median_mbps(g, "tap direct IPv6", a.host, b.ip6, args.runs, args.seconds)
        if not args.no_relay:
            c = g.members[2]
            print(f"TAP {a.ip} -> {c.ip} relayed by node1 (UDP between node0 and node2 dropped)", flush=True)
            results["overlay relayed"] = median_mbps(g, "tap relayed", a.host, c.ip, args.runs, args.seconds)
            if args.ipv6:
                assert c.ip6 is not None
                results["relayed IPv6"] = median_mbps(g, "tap relayed IPv6", a.host, c.ip6, args.runs, args.seconds)
        try:
            links = [(r["peer_id"], r["endpoint"], r["rtt_ms"]) for r in g.status(0)["links"]]
            counters = g.status(1)["counters"]
            chunks = {k: counters.get(k, 0) for k in CHUNK_COUNTERS}
        except RuntimeError as exc:
            links = [str(exc)]  # type: ignore[list-item]
            chunks = {}
    if args.routed:
        results["overlay routed"] = routed(args.runs, args.seconds)
    print()
    veth = results["raw veth"]
    for label, mbps in results.items():
        ratio = f"  {mbps / veth:.3f} of veth" if mbps and veth and label != "raw veth" else ""
        print(f"{label:<16} {_fmt(mbps)}{ratio}")
    for v4, v6 in (("overlay direct", "direct IPv6"), ("overlay relayed", "relayed IPv6")):
        over, under = results.get(v6), results.get(v4)
        if over and under:
            print(f"{v6} / IPv4: {over / under:.2f}")
    print(f"(median of {args.runs} x {args.seconds:g} s iperf3 TCP, one stream)")
    print(f"node0 links: {links}")
    print(f"node1 counters: {chunks}")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


# Four members with one ring neighbour on each side and nothing else: the two members opposite each other on the
# ring have no link, not even a tunnel, so their data is sealed end to end and crosses a relay (overlay/e2e.py).
ROUTED_EXTRA = "[overlay]\nring_size = 1\nlong_links = 0\non_demand_rate = 0\n"
APART_S = 90.0  # links made while joining close once neither end uses them (30 s idle)


def routed(runs: int, seconds: float) -> float | None:
    with Group(4, prefix="ipr", node_extra=ROUTED_EXTRA) as g:
        g.join_all()
        pair: list[tuple[int, int]] = []

        def apart() -> bool:
            sts = {m.index: g.status(m.index) for m in g.members}
            found = [(i, j) for i in sts for j in sts if i < j and not g.direct_link(sts[i], j)]
            found = [(i, j) for i, j in found if not g.direct_link(sts[j], i)]
            pair[:] = found[:1]
            return bool(found)

        if not g.wait_until(apart, APART_S, 2.0):
            print("iperf_tap: every pair of the four is still linked; no routed measurement", flush=True)
            return None
        i, j = pair[0]
        late = [p for p, t in g.wait_for_pings([(i, j)], 30.0).items() if t is None]
        if late:
            print(f"iperf_tap: no ping reply node{i} -> node{j}; measuring anyway", flush=True)
        server = g.members[j]
        g.lab.popen(server.host, "iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        path = g.overlay_path({m.index: g.status(m.index) for m in g.members}, i, j)
        print(f"TAP {g.members[i].ip} -> {server.ip}, no link between them; overlay path {path}", flush=True)
        return median_mbps(g, "tap routed (sealed)", g.members[i].host, server.ip, runs, seconds)


def _fmt(mbps: float | None) -> str:
    return "failed" if mbps is None else f"{mbps:8.0f} Mbit/s"


if __name__ == "__main__":
    sys.exit(main())
