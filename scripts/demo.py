#!/usr/bin/env python3
"""Demo: a five-member group in network namespaces, with UDP blocked between two pairs.

Starts a throw-away Prosody and five `ipop-overlay join` processes (one namespace each, on one lab
bridge), prints one node's `ipop-overlay status`, pings across a relay and names the relay, then
removes everything it made. Needs root, prosody, iproute2, iptables and ping. Runs in well under 2
minutes; set IPOP_KEEP_WORKDIR=1 to keep the configs and logs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.group import Group, missing_prerequisites

SIZE = 5
# UDP dropped between these pairs: their packets must cross another member.
BLOCKED = [(2, 3), (2, 4)]
# Our choice: the whole demo must end within 2 minutes; these bound its waits.
WARM_UP_S = 45.0


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    problem = missing_prerequisites()
    if problem:
        print(f"demo: cannot run: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    step("building the lab: a bridge, a Prosody namespace and 5 node namespaces")
    with Group(SIZE, prefix="ipd") as g:
        assert g.xmpp_host is not None
        step(f"Prosody runs at {g.xmpp_host.address}:5222, members-only room {g.room}")
        for i, j in BLOCKED:
            g.block_udp(i, j)
            step(f"iptables: UDP dropped between node{i} ({g.members[i].host.address}) "
                 f"and node{j} ({g.members[j].host.address})")  # fmt: skip
        for m in g.members:
            g.join(m.index)
            step(f"node{m.index} joined: id {m.node_id}, {m.address} on {m.host.address}")

        step("waiting until every member answers ping from every other")
        answered = g.wait_for_pings(g.running_pairs(), WARM_UP_S)
        late = [p for p, t in answered.items() if t is None]
        slowest = max((t for t in answered.values() if t is not None), default=0.0)
        step(f"{len(answered) - len(late)}/{len(answered)} pairs answered (last after {slowest:.1f} s)")
        if late:
            step(f"no reply yet between: {late}")

        statuses = {m.index: g.status(m.index) for m in g.members}
        pairs = [*BLOCKED, *g.running_pairs()]
        src, dst = next(((i, j) for i, j in pairs if not g.direct_link(statuses[i], j)), BLOCKED[0])
        target = g.members[dst]
        step(f"ping node{src} -> node{dst} ({target.ip}); node{src} has no direct link to node{dst}")
        out = g.lab.run(g.members[src].host, "ping", "-n", "-c", "3", "-i", "0.3", "-W", "2", target.ip,
                        check=False, timeout=20)  # fmt: skip
        print(out.stdout.rstrip(), flush=True)

        step(f"ipop-overlay status of node{src}")
        print(g.status_text(src), flush=True)
        statuses = {m.index: g.status(m.index) for m in g.members}
        tunnel = next((r for r in statuses[src]["links"] if r["peer_id"] == target.node_id and r["relay"]), None)
        if tunnel is not None:
            relay = next((m.index for m in g.members if m.node_id == tunnel["relay"]), tunnel["relay"])
            via = tunnel["endpoint"]
            step(f"node{src}'s link to node{dst} is tunnelled through node{relay} (endpoint {via})")
        path = g.overlay_path(statuses, src, dst)
        if path is None:
            step("could not derive the overlay path from the status snapshots")
        else:
            relays = ", ".join(f"node{n}" for n in path[1:-1]) or "none"
            route = " -> ".join(f"node{n}" for n in path)
            basis = "from the tunnel" if tunnel is not None else "estimated from the members' links"
            step(f"overlay path {route}: {len(path) - 1} overlay hop(s), relayed by {relays} ({basis})")
        step("stopping the nodes, Prosody and the namespaces")
    step(f"done in {time.monotonic() - started:.0f} s; nothing left behind")
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
