"""Fragment probes: may this link carry a datagram as big as a TCP super-frame?

A PROBE (LinkMsg.PROBE, overlay/wire.py PROBE_SIZE bytes) goes out on each link that has not answered one; the
peer echoes its token in a PROBE_ACK. Until then super-frames for the link are cut into TCP segments first
(overlay/superframes.py, and the compiled data path passes them up: `big_ok`). The answer also says the peer
knows super-frames at all: a node from before them drops the PROBE as an unknown message. Used by a group node's
DataPath and by a SocialVPN node alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from overlay.link import Link
from overlay.wire import encode_probe

# Our choice: a probe that got no answer is sent again after PROBE_INTERVAL, then at doubling intervals up to
# PROBE_MAX. Until a probe passes, every super-frame on the link is cut into TCP segments in Python, so a lost
# probe must not cost long: it is one train of ~42 datagrams, and a path losing 1 % of its datagrams loses a
# third of such trains; a TURN server's 128 KB relay socket lost the probe of one end of a TURN link in 3 of 5
# runs of tests/test_nat.py (2026-12-07, docs/nat-traversal.md), after which that end carried bulk TCP at the
# Python path's pace for the minute PROBE_INTERVAL then was. A path that never carries one costs six probes in
# its first minute and then backs off: a probe every minute had cost 1 KB/s of every idle link that never
# answered (bench/scale.py --nat, 2026-12-06, when no TURN link did), where an idle direct link costs 11 B/s;
# at PROBE_MAX it costs 16 B/s. A new path is probed at once.
PROBE_INTERVAL = 1.0
PROBE_MAX = 3840.0


class _Links(Protocol):
    links: dict[int, Link]

    def on_change(self, peer: int) -> None: ...


class FragmentProbes:
    def __init__(self, links: _Links, rng: random.Random, count: Callable[[str], None]) -> None:
        self.links = links
        self.rng = rng
        self.count = count
        # By peer: when the next probe is due, the token of the last one sent while it is unanswered, and the
        # interval and path it went on.
        self.due: dict[int, float] = {}
        self.token: dict[int, int] = {}
        self.every: dict[int, tuple[float, str]] = {}

    def probe(self, link: Link, now: float) -> None:
        peer, path = link.peer_id, link.describe_endpoint()
        interval, probed_on = self.every.get(peer, (0.0, ""))
        if peer in self.token and probed_on == path:
            interval = min(interval * 2, PROBE_MAX)  # the last one on this path got no answer
        else:
            interval = PROBE_INTERVAL
        self.every[peer] = (interval, path)
        token = self.rng.getrandbits(64)
        self.token[peer] = token
        self.due[peer] = now + interval
        link.send(encode_probe(token))

    def tick(self, now: float) -> None:
        for link in list(self.links.links.values()):
            if link.fragments_ok:
                continue
            peer = link.peer_id
            # A link replaced by a new handshake on another path starts unproven and is probed again at once.
            moved = self.every.get(peer, (0.0, ""))[1] != link.describe_endpoint()
            if moved or now >= self.due.get(peer, now):
                self.probe(link, now)

    def next_due(self) -> float:
        """When the next unanswered probe goes again (inf when none waits): the node ticks by then."""
        return min((self.due[peer] for peer in self.token if peer in self.due), default=float("inf"))

    def on_ack(self, link: Link, token: int) -> None:
        if self.token.get(link.peer_id) != token:
            self.count("drop: probe ack for no probe")
            return
        del self.token[link.peer_id]
        link.fragments_ok = True
        self.links.on_change(link.peer_id)

    def forget(self, peer: int) -> None:
        self.due.pop(peer, None)
        self.token.pop(peer, None)
        self.every.pop(peer, None)
