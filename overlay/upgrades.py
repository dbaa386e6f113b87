"""Tunnel and TURN links are stopgaps: try ICE on them again, on a backing-off schedule. Pure: fed those links
and `now`, no I/O.

A link ends in a tunnel through a shared neighbour when neither the direct handshake nor ICE worked at the time
(overlay/linksetup.py). That is often passing: a TURN server that was restarting or slow to allocate on a loaded
host, a STUN server not answered yet, a peer whose offer was lost. A tunnel costs the neighbour every byte of
the link, and the pair an extra hop, for as long as the link lives, which for a ring link is as long as both
members stay. So the member with the lower node ID of the pair (one side only: two offers would collide and
cost twice) offers ICE again on the link, UPGRADE_AFTER seconds after it became a tunnel and then at doubling
intervals up to UPGRADE_MAX. The restart keeps the link and its session meanwhile; when a pair is nominated
the handshake moves the link onto it, and the link stops being a tunnel here.

A link through TURN costs the TURN server every byte, and each packet a detour through it. A joiner's first links
(to the anchors, offered in its XMPP hello) carry relay candidates at once, and aioice nominates the first pair
that answers, often the relay before hole punching completes: tests/test_nat.py once saw two members behind
endpoint-independent NATs linked through TURN for good. TURN links are offered ICE again on the same schedule,
with host and server-reflexive candidates only (overlay/linksetup.py restart); a pair that needs TURN (a
symmetric NAT on one side) keeps its link and costs a few seconds of checks every ~5 minutes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Our choice: past a TURN server's allocation retry (ice.TURN_RETRY, 30 s) on the second try, so a relay that
# was missing when the link was made is there for it.
UPGRADE_AFTER = 20.0
# Our choice: a pair that truly needs the tunnel (both behind symmetric NATs, no TURN server) costs one offer
# and a few seconds of checks every ~5 minutes.
UPGRADE_MAX = 320.0


@dataclass
class PathUpgrades:
    """When each of our tunnel and TURN links is next offered ICE."""

    _next: dict[int, tuple[float, float]] = field(default_factory=dict)  # peer -> (when, interval)

    def due(self, now: float, tunnels: Iterable[int]) -> list[int]:
        """`tunnels`: the peers of our tunnel and TURN links this side upgrades. Returns those to offer ICE to
        now. A link that left them (moved onto a direct path, or closed) is forgotten: back on one, it starts
        afresh."""
        current = set(tunnels)
        for peer in [p for p in self._next if p not in current]:
            del self._next[peer]
        out = []
        for peer in current:
            when, interval = self._next.setdefault(peer, (now + UPGRADE_AFTER, UPGRADE_AFTER))
            if now >= when:
                interval = min(interval * 2, UPGRADE_MAX)
                self._next[peer] = (now + interval, interval)
                out.append(peer)
        return sorted(out)
