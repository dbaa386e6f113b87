#!/usr/bin/env python3
"""Demo: a six-member group in network namespaces, four of them behind NATs, with certificates.

Two members on the public segment, two behind an endpoint-independent NAT (Linux MASQUERADE, like most home
routers) and two behind a symmetric NAT (MASQUERADE --random-fully), with a throw-away Prosody and coturn
(STUN + TURN) on the public segment. Every member is the real `ipop-overlay join` with ICE configured. Prints
one NATed member's `ipop-overlay status` (its links' kinds: host, srflx/prflx through NATs, relay through TURN),
pings between two members that have no direct link (the packets cross another member) and names the hops.
The group's life around it: `ipop-overlay group init` makes the group key, node0 (the room's owner) is the
issuer, every member gets its certificate (node5 also its address) from it, and at the end node5 is removed
with `ipop-overlay group remove` and cut off by everyone. Then it removes everything it made. Needs root,
prosody, coturn, iproute2, iptables and ping. Runs in about 3 minutes; set IPOP_KEEP_WORKDIR=1 to keep the
configs and logs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.group import Group, missing_prerequisites

CLUSTERS = {"home": "cone", "office": "symmetric"}
PLACEMENT: list[str | None] = [None, None, "home", "home", "office", "office"]
# Ring links only (two successors, two predecessors): in a group of six each member then has one other member
# it reaches across a neighbour, which is what the demo shows. Real groups keep long links too.
NODE_EXTRA = "[overlay]\nlong_links = 0\n"
# Our choice: the whole demo must end within about 2 minutes; these bound its waits.
WARM_UP_S = 45.0
APART_S = 60.0  # links made while joining close once neither end uses them (30 s idle)
REVOKE_S = 60.0  # from the requirement: every node cuts a removed member within 60 s
REMOVED = 5


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def where(g: Group, i: int) -> str:
    cluster = g.placement[i]
    return "public segment" if cluster is None else f"behind the {CLUSTERS[cluster]} NAT '{cluster}'"


def apart(g: Group) -> tuple[int, int] | None:
    """A pair with no direct link either way (their packets cross another member), NATed members first, and
    pairs with no link at all before pairs linked through a tunnel (which ICE may upgrade at any time)."""
    sts: dict[int, dict[str, Any]] = {m.index: g.status(m.index) for m in g.members}

    def linked(i: int, j: int) -> bool:
        return g.link_row(sts[i], j) is not None

    pairs = [(i, j) for i in sts for j in sts if i < j]
    pairs.sort(key=lambda p: (linked(*p) or linked(p[1], p[0]), -sum(g.placement[k] is not None for k in p)))
    return next(((i, j) for i, j in pairs if not g.direct_link(sts[i], j) and not g.direct_link(sts[j], i)), None)


def main() -> int:
    problem = missing_prerequisites()
    if problem:
        print(f"demo: cannot run: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    step("building the lab: a bridge, two NAT routers, Prosody, coturn and 6 node namespaces")
    with Group(
        len(PLACEMENT), clusters=CLUSTERS, placement=PLACEMENT, turn=True, ice=True, node_extra=NODE_EXTRA,
        prefix="ipd", trust=True, auto_address=[REMOVED],
    ) as g:  # fmt: skip
        assert g.xmpp_host is not None and g.coturn is not None
        pub = (g.group_dir / "group.pub").read_text().split()[-1]
        step(f"ipop-overlay group init: group key {pub} (group.key 0600 for the issuer, group.pub for members)")
        step(f"Prosody runs at {g.xmpp_host.address}:5222, members-only room {g.room}, owned by node0 (the issuer)")
        step(f"coturn (STUN and TURN over UDP and TCP) at {', '.join(f'{a}:{p}' for a, p in g.coturn.servers)}")
        for m in g.members:
            g.join(m.index, timeout=40)
            cert = g.status(m.index)["trust"]
            m.address = cert["address"]
            step(
                f"node{m.index} joined: id {m.node_id}, certificate for {cert['jid']} at {cert['address']} "
                f"(serial {cert['serial']}), on {m.host.address}, {where(g, m.index)}"
            )

        step("waiting until every member answers ping from every other")
        answered = g.wait_for_pings(g.running_pairs(), WARM_UP_S)
        late = [p for p, t in answered.items() if t is None]
        slowest = max((t for t in answered.values() if t is not None), default=0.0)
        step(f"{len(answered) - len(late)}/{len(answered)} pairs answered (last after {slowest:.1f} s)")
        if late:
            step(f"no reply yet between: {late}")

        step("waiting for the links used only while joining to close, so some pairs are apart")
        found: list[tuple[int, int]] = []

        def some_apart() -> bool:
            pair = apart(g)
            if pair is not None:
                found.append(pair)
            return pair is not None

        g.wait_until(some_apart, APART_S, 2.0)
        pair = found[-1] if found else None
        src, dst = pair if pair is not None else (2, 4)
        target = g.members[dst]
        note = "no direct link between them" if pair is not None else "they are still linked directly"
        step(f"ping node{src} ({where(g, src)}) -> node{dst} ({where(g, dst)}, {target.ip}); {note}")
        # The path as the members' links are while the ping runs: a link made or upgraded later (a ring repair, ICE
        # again on a tunnel) would name another.
        statuses = {m.index: g.status(m.index) for m in g.members}
        out = g.lab.run(g.members[src].host, "ping", "-n", "-c", "3", "-i", "0.3", "-W", "2", target.ip,
                        check=False, timeout=20)  # fmt: skip
        print(out.stdout.rstrip(), flush=True)
        path = g.overlay_path(statuses, src, dst)
        if path is None:
            step("could not derive the overlay path from the status snapshots")
        else:
            relays = ", ".join(f"node{n}" for n in path[1:-1]) or "none"
            route = " -> ".join(f"node{n}" for n in path)
            step(f"overlay path {route}: {len(path) - 1} overlay hop(s), relayed by {relays}")

        shown = next(i for i in (src, dst, 2, 4) if g.placement[i] is not None)
        step(f"ipop-overlay status of node{shown} ({where(g, shown)}): the kind column says how each link crosses")
        print(g.status_text(shown), flush=True)
        removed = g.members[REMOVED]
        jid = f"node{REMOVED}@{g.server.domain}" if g.server else ""
        step(f"ipop-overlay group remove {jid} (as the room's owner)")
        g.expected_errors.append("has been revoked")  # the removed member's own log says so, as it should
        cli = g.cli(g.members[0].host, "group", "remove", "--config", str(g.members[0].config), jid)
        print((cli.stdout or cli.stderr).rstrip(), flush=True)
        t0 = time.monotonic()
        others = [m.index for m in g.members if m.index != REMOVED]

        def cut() -> bool:
            return all(removed.node_id not in {lk["peer_id"] for lk in g.status(i)["links"]} for i in others)

        if g.wait_until(cut, REVOKE_S, 0.5):
            step(f"every member closed its links to node{REMOVED} {time.monotonic() - t0:.1f} s later (revoked)")
        else:
            step(f"node{REMOVED} still linked after {REVOKE_S:.0f} s")
        gone = not g.ping(REMOVED, 0, count=2, timeout=1.0)
        step(f"ping node{REMOVED} -> node0: {'no reply, as it should be' if gone else 'answered (unexpected)'}")
        step("stopping the nodes, Prosody, coturn and the namespaces")
    step(f"done in {time.monotonic() - started:.0f} s; nothing left behind")
    return 0 if out.returncode == 0 and gone else 1


if __name__ == "__main__":
    sys.exit(main())
