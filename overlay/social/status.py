"""`status` of a SocialVPN node (what `ipop-overlay status` prints in social mode)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from overlay.ids import format_id
from overlay.status import ice_status

if TYPE_CHECKING:
    from overlay.social.node import SocialNode


def social_status(node: SocialNode) -> dict[str, Any]:
    """Our address, DNS and XMPP state, and each friend device: its address, names, link and warning."""
    table = node.names()
    by_address: dict[int, list[str]] = {}
    for name, address in sorted(table.items(), key=lambda kv: len(kv[0])):
        by_address.setdefault(address, []).append(name)
    friends: dict[str, list[dict[str, Any]]] = {f: [] for f in node.watch.roster.friends()}
    for device in sorted(node.devices.values(), key=lambda d: d.jid):
        link = node.links.links.get(device.peer_id)
        friends.setdefault(device.friend, []).append(
            {
                "device": device.jid,
                "node_id": format_id(device.peer_id),
                "address": str(ipaddress.IPv4Address(device.local)),
                "names": by_address.get(device.local, []),
                "link": link.kind if link is not None else None,
                "endpoint": link.describe_endpoint() if link is not None else None,
                "rtt_ms": round(link.rtt * 1000, 2) if link is not None and link.rtt is not None else None,
                "tx_bytes": link.tx_bytes if link is not None else 0,
                "rx_bytes": link.rx_bytes if link is not None else 0,
                "warning": device.warning,
                "online": device.online,
            }
        )
    fast = node.fast.counters() if node.fast is not None else {}
    return {
        "mode": "social",
        "node_id": format_id(node.id),
        "jid": node.full_jid,
        "address": f"{ipaddress.IPv4Address(node.address)}/{node.vnic.prefix_len}",
        "dns": str(ipaddress.IPv4Address(node.dns)),
        "domain": node.settings.domain,
        "endpoint": f"{node.underlay.local_endpoint[0]}:{node.underlay.local_endpoint[1]}",
        "lanes": node.fast.lanes if node.fast is not None else 0,  # Engines of the compiled data path; 0: Python
        "xmpp": "online" if node.watch.started else "reconnecting",
        "friends": [{"jid": f, "devices": d} for f, d in sorted(friends.items())],
        "requests": node.watch.roster.requests(),
        "warnings": list(node.warnings),
        "ice": ice_status(node.ice),
        "counters": dict(sorted({**node.counters, **node.nat.counters, **node.links.counters, **fast}.items())),
    }
