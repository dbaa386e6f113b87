"""Which overlay a node is in, and whether it is still connected to it: overlay IDs and the anchors' beacon.

Pure: fed events and `now`, no I/O.

- An overlay is named when a node founds it: its ID starts with the founding time in milliseconds, so when two
  overlays meet (two founders raced, or every anchor was lost at once and a joiner founded a new one), the
  older one wins and the younger one's members move into it, one FIND at a time, spreading like an epidemic
  over their links (`wins`, the "migrate" outcome).
- The overlay's leader (the anchor with the smallest room nick, overlay/membership.py) advances a beacon
  sequence every BEACON_INTERVAL; nodes pass the newest they heard on in their gossip (a BEACON message to every
  link at once only when they move into another ring, so their neighbours follow without waiting). A node that
  hears no newer beacon for ISLAND_AFTER is cut off from the leader: an island, or the leader and every anchor
  are gone. It goes back to the room to bridge (or to become an anchor itself).
- A node that then hears a beacon more than REJOIN_GAP ahead of the last it heard was cut off, and its ring may
  hold only other cut-off nodes: it joins again through the neighbour that brought the beacon ("rejoin"), and
  its own neighbours follow when they hear it from it. Joins route only through neighbours whose own beacon
  is current (`fit_for_join`), so a rejoin lands in the main ring, not back in the island.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BEACON_INTERVAL = 10.0  # our choice: the beacon rides the gossip (a round every ~10 s per link), so it costs nothing
# Beacons are pipelined: however many gossip rounds a node is from the leader, a newer one reaches it about every
# BEACON_INTERVAL, late by a round (ring links, ~10 s) or two (idle links, every 2nd round) when its path
# changes. Six intervals without one is no such hiccup.
ISLAND_AFTER = 60.0
REJOIN_GAP = 5  # more than this many beacons skipped (50 s): we were cut off, not just on a slower path
NO_OVERLAY = 0
UNKNOWN_SEQ = -1  # entered an overlay from the room: the first beacon heard is current, whatever its number


def new_overlay_id(now: float, rng: random.Random) -> int:
    """48 bits of founding time (ms) and 16 random bits: IDs order by age; equal times differ by chance."""
    return ((int(now * 1000) & 0xFFFFFFFFFFFF) << 16) | rng.getrandbits(16) | 1


def wins(a: int, b: int) -> bool:
    """Whether overlay `a` absorbs overlay `b` when they meet: the older (smaller ID) wins."""
    return a != NO_OVERLAY and (b == NO_OVERLAY or a < b)


@dataclass
class Beacon:
    overlay: int = NO_OVERLAY
    seq: int = 0
    heard: float = 0.0  # when the sequence last advanced (or we entered the overlay)

    def found(self, overlay: int, now: float) -> None:
        self.overlay, self.seq, self.heard = overlay, 1, now

    def enter(self, overlay: int, now: float) -> None:
        """We linked into `overlay` (from the room): take whatever beacon comes next as current."""
        self.overlay, self.seq, self.heard = overlay, UNKNOWN_SEQ, now

    def emit(self, now: float) -> int:
        """The leader's next beacon."""
        self.seq += 1
        self.heard = now
        return self.seq

    def island(self, now: float) -> bool:
        return self.overlay != NO_OVERLAY and now - self.heard > ISLAND_AFTER

    def hear(self, overlay: int, seq: int, now: float) -> str:
        """A neighbour's beacon: "newer" (pass it on), "rejoin" or "migrate" (pass it on and join through
        that neighbour), "adopt" (we had no overlay yet), or "" (nothing to do)."""
        if overlay == NO_OVERLAY:
            return ""
        if self.overlay == NO_OVERLAY:
            self.overlay, self.seq, self.heard = overlay, seq, now
            return "adopt"
        if overlay == self.overlay:
            if seq <= self.seq:
                return ""
            if self.seq == UNKNOWN_SEQ:
                self.seq, self.heard = seq, now
                return "newer"
            gap = seq - self.seq
            self.seq, self.heard = seq, now
            return "rejoin" if gap > REJOIN_GAP else "newer"
        if wins(overlay, self.overlay):
            self.overlay, self.seq, self.heard = overlay, seq, now
            return "migrate"
        return ""

    def fit_for_join(self, overlay: int, seq: int) -> bool:
        """Whether a neighbour that last told us (overlay, seq) may carry a join: it is in our overlay and not
        cut off from its leader."""
        return overlay == self.overlay and (seq + REJOIN_GAP >= self.seq or self.seq == UNKNOWN_SEQ)
