"""On-demand direct links: when a pair talks a lot through relays, give it a link of its own; when it falls
quiet, let the link go. Pure: fed byte counts and `now`, no I/O.

The data path counts the bytes it sends to each destination through another member (`relayed`, one dict update
per packet). Every tick the rate per destination is measured; a destination above `rate` bytes/s for OPEN_AFTER
seconds in a row gets a link (Open). An on-demand link whose traffic both ways stays below `rate` / HYSTERESIS
for `idle` seconds is released (Release): it then closes like any link neither end uses (maintenance's surplus
rule), unless it became a ring or long link meanwhile. The gap between the two thresholds and the idle time keep
a link from flapping with bursty traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OPEN_AFTER = 2.0  # seconds above the rate: an on-demand link is asked for within ~3 s of the rate passing
HYSTERESIS = 8.0  # released only below rate / 8
RETRY_AFTER = 30.0  # our choice: a destination whose link could not be made is not asked again sooner
MAX_ON_DEMAND = 8  # our choice: beyond this many, the busiest keep theirs (each costs keepalives)


@dataclass(frozen=True, slots=True)
class Open:
    peer: int


@dataclass(frozen=True, slots=True)
class Release:
    peer: int


@dataclass
class OnDemand:
    rate: float  # bytes per second through relays that earns a pair a direct link; 0 disables
    idle: float = 60.0  # seconds below rate / HYSTERESIS before an on-demand link is released
    relayed: dict[int, int] = field(default_factory=dict)  # bytes sent through relays per destination, this tick
    links: dict[int, float] = field(default_factory=dict)  # our on-demand links -> since when quiet (or -1)
    _hot: dict[int, float] = field(default_factory=dict)  # destination -> since when above the rate
    _asked: dict[int, float] = field(default_factory=dict)  # destination -> when we asked for a link
    _last: float | None = None
    _traffic: dict[int, int] = field(default_factory=dict)  # link bytes (both ways) at the last tick

    def tick(self, now: float, link_bytes: Callable[[int], int | None]) -> list[Open | Release]:
        """`link_bytes(peer)`: bytes sent plus received on our direct link to `peer`, None when not linked."""
        actions: list[Open | Release] = []
        dt = now - self._last if self._last is not None else 0.0
        self._last = now
        relayed, self.relayed = self.relayed, {}
        if self.rate <= 0 or dt <= 0:
            return actions
        for peer, nbytes in relayed.items():
            if peer in self.links or link_bytes(peer) is not None:
                continue
            if nbytes / dt < self.rate:
                self._hot.pop(peer, None)
                continue
            since = self._hot.setdefault(peer, now - dt)
            asked = self._asked.get(peer)
            if now - since >= OPEN_AFTER and (asked is None or now - asked >= RETRY_AFTER):
                if len(self.links) + sum(1 for t in self._asked.values() if now - t < RETRY_AFTER) < MAX_ON_DEMAND:
                    self._asked[peer] = now
                    actions.append(Open(peer))
        for peer in [p for p in self._hot if p not in relayed]:
            del self._hot[peer]
        for peer, quiet_since in list(self.links.items()):
            total = link_bytes(peer)
            if total is None:
                del self.links[peer]  # the link went down
                self._traffic.pop(peer, None)
                continue
            rate = (total - self._traffic.get(peer, total)) / dt
            self._traffic[peer] = total
            if rate >= self.rate / HYSTERESIS:
                self.links[peer] = -1.0
            elif quiet_since < 0:
                self.links[peer] = now
            elif now - quiet_since >= self.idle:
                del self.links[peer]
                self._traffic.pop(peer, None)
                actions.append(Release(peer))
        for peer, t in list(self._asked.items()):
            if now - t >= RETRY_AFTER:
                del self._asked[peer]
        return actions

    def active(self) -> bool:
        """Whether rates are being measured (traffic through relays, or on-demand links to watch)."""
        return bool(self.relayed or self._hot or self.links)

    def linked(self, peer: int, total_bytes: int) -> bool:
        """A direct link to `peer` came up: True when we asked for it, or our traffic to the peer is above the
        rate now (it is then one of our on-demand links). A link that maintenance made meanwhile (a ring repair,
        a long link, the peer's own ask) carries that traffic as well: kept as an on-demand link, it stays while
        the traffic lasts, when the role it was made for goes, and we ask for no second one."""
        asked = self._asked.pop(peer, None) is not None
        if not asked and (peer not in self._hot or len(self.links) >= MAX_ON_DEMAND):
            return False
        self.links[peer] = -1.0
        self._traffic[peer] = total_bytes
        self._hot.pop(peer, None)
        return True
