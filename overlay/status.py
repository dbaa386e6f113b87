"""A node's status (`ipop-overlay status`, the control socket, tests): its links and their roles, ring place, DHT,
data counters, membership, ICE, end-to-end sessions and trust, in one JSON-ready dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overlay._fast import GCM
from overlay.ids import format_id
from overlay.routing.ring import Role

if TYPE_CHECKING:
    from overlay.node import Node
    from overlay.transport.ice import IceAgent


def ice_status(agent: IceAgent | None) -> dict[str, Any]:
    """The ICE agent's part of `status` (a group's or a social node's): its NAT's mapping, each TURN server's
    allocation or why there is none, its counters and candidates."""
    ice: dict[str, Any] = {"enabled": agent is not None}
    if agent is not None:
        ice["counters"] = dict(sorted(agent.counters.items()))
        ice["mapping"] = agent.mapping()
        ice["turn"] = [
            {
                "server": a.server.describe(),
                "relayed": f"{a.relayed[0]}:{a.relayed[1]}" if a.relayed else None,
                "error": a.error,
                "counters": dict(sorted(a.counters.items())),
            }
            for a in agent.allocations
        ]
        ice["candidates"] = [c.to_sdp() for c in agent.host_candidates() + agent.srflx_candidates()]
    return ice


def node_status(node: Node) -> dict[str, Any]:
    fast = {}
    if node.fast is not None:
        node.fast.sync()
        fast = node.fast.counters()
    links = []
    ring = node.table.ring_peers()
    long_out = node.maintenance.long_link_peers()
    for link in sorted(node.links.links.values(), key=lambda lk: lk.peer_id):
        roles = [
            name
            for name, on in (
                ("ring", link.peer_id in ring),
                ("long_out", link.peer_id in long_out),
                ("long_in", Role.LONG_IN in node.table.role(link.peer_id)),
                ("on_demand", bool(node.table.role(link.peer_id) & (Role.ON_DEMAND | Role.PEER_ON_DEMAND))),
            )
            if on
        ]
        links.append(
            {
                "peer_id": format_id(link.peer_id),
                "peer_address": link.contact.address if link.contact else None,
                "endpoint": link.describe_endpoint(),
                "relay": format_id(link.relay) if link.relay is not None else None,
                "kind": link.kind,
                "superframes": link.fragments_ok,  # the probe came back: TCP super-frames cross whole (as chunks)
                "rtt_ms": round(link.rtt * 1000, 3) if link.rtt is not None else None,
                "tx_bytes": link.tx_bytes,
                "rx_bytes": link.rx_bytes,
                "roles": roles,
            }
        )
    hops = node.datapath.hops
    ice = ice_status(node.ice)
    return {
        "node_id": format_id(node.id),
        "address": f"{node.address}/{node.network.prefixlen}",
        "address6": f"{node.address6}/{node.network6.prefixlen}" if node.network6 else None,
        "room": node.room,
        "endpoint": f"{node.underlay.local_endpoint[0]}:{node.underlay.local_endpoint[1]}",
        "cipher": f"AES-256-GCM, {GCM}",
        "lanes": node.fast.lanes if node.fast is not None else 0,  # the compiled data path's Engines; 0: Python's
        "links": links,
        "successors": [format_id(i) for i in node.table.successors()],
        "predecessors": [format_id(i) for i in node.table.predecessors()],
        "dht": {"stored": len(node.dht.store), "cached": len(node.dht.cache), "held": node.dht.held()},
        "data_in": {"packets": hops[0], "mean_hops": round(hops[1] / max(1, hops[0]), 2)},
        "counters": dict(sorted({**node.counters, **node.links.counters, **fast}.items())),
        "anchor": bool(getattr(node.bootstrap, "is_anchor", False)),
        "overlay": {
            "id": f"{node.beacon.overlay:016x}",
            "beacon": node.beacon.seq,
            "beacon_age_s": round(node.clock() - node.beacon.heard, 1) if node.beacon.overlay else None,
        },
        "membership": node.membership.status() if node.membership is not None else None,
        "ice": ice,
        "e2e": node.e2e.status(),
        "trust": node.trust_service.status() if node.trust_service is not None else None,
    }
