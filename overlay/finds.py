"""Finds: the join FIND that places a new node on the ring, and the FINDs that pick long links.

A FIND carries the sender's signed contact and is routed toward a key. For the join (FLAG_JOIN, the key is the
joiner's own ID) the node nearest the key calls the joiner back: the joiner has a single link, so a routed
reply could not reach it. For a long link (FLAG_LONG_LINK) the node nearest the drawn point answers with a FOUND
carrying its contact and ring neighbours, or refuses when its incoming long-link cap is full (Symphony,
section 3); the searcher links to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from overlay.identity import verify
from overlay.ids import node_id_from_public_key
from overlay.port import OverlayPort
from overlay.routing.maintenance import Maintenance
from overlay.routing.ring import Role
from overlay.wire import (
    FLAG_EXACT,
    FLAG_JOIN,
    FLAG_LONG_LINK,
    FLAG_REFUSED,
    Contact,
    DecodeError,
    Kind,
    Routed,
    decode_find,
    decode_found,
    encode_find,
    encode_found,
)

FIND_TIMEOUT = 5.0  # our choice: a FIND crosses ~log N hops of LAN/WAN RTT well inside this


@dataclass
class _Find:
    slot: int | None  # long-link slot, or None for the join
    started: float


class Finder:
    def __init__(self, port: OverlayPort, maintenance: Maintenance) -> None:
        self.port = port
        self.maintenance = maintenance
        self._finds: dict[int, _Find] = {}
        self._seq = 0

    def find(self, target: int, slot: int | None, flags: int, via: int | None = None) -> None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._finds[self._seq] = _Find(slot, self.port.clock())
        # A join names its first hop: until we have other links, signals for us must go through it.
        body = encode_find(self._seq, self.port.contact(), via if flags & FLAG_JOIN else None)
        self.port.send_routed(target, Kind.FIND, body, flags, via=via)

    def join(self, via: int) -> None:
        """Route a FIND for our own ID through `via` (our first link, or the neighbour that brought news of the
        overlay we move into): the nodes at our ring place call us back."""
        self.find(self.port.id, None, FLAG_JOIN, via=via)

    def introduce(self, contact: Contact, also: int | None = None) -> None:
        """As an anchor: route a FIND for a joiner's ID on its behalf, so the nodes at its ring place call it
        back even when it cannot reach us; signals for it come to us and go on over XMPP. `also`: a neighbour
        of ours to call it back as well (a joiner whose ring place is held by members it cannot reach still
        gets one link, and tunnels through it reach the rest)."""
        joiner = node_id_from_public_key(contact.public_key)
        body = encode_find(0, contact, self.port.id)
        self.port.send_routed(joiner, Kind.FIND, body, FLAG_JOIN)
        if also is not None:
            self.port.send_routed(also, Kind.FIND, body, FLAG_JOIN | FLAG_EXACT)

    def on_find(self, pkt: Routed) -> None:
        port = self.port
        _, contact, via = decode_find(pkt.body)
        sender = node_id_from_public_key(contact.public_key)
        if not verify(contact.public_key, contact.signed_part(port.room), contact.signature):
            port.count("drop: FIND with a bad contact")
            return
        introduced = pkt.flags & FLAG_JOIN and via == pkt.src
        if (sender != pkt.src and not introduced) or sender == port.id:
            return
        flags = 0
        if (
            pkt.flags & FLAG_LONG_LINK
            and not port.table.accepts_incoming_long()
            and Role.LONG_IN not in port.table.role(pkt.src)
        ):
            flags = FLAG_REFUSED
        if pkt.flags & FLAG_JOIN:
            # The joiner's ring place is next to us. It has a single link (or none, when introduced), so a
            # reply routed to it would fail; we call it back instead, signalling through the member it named,
            # and once linked we send it our neighbour list like any link.
            port.table.learn([sender])
            port.link_to(contact, via=via if via != port.id else None)
            port.wake()
            return
        ring = port.table.successors() + port.table.predecessors()
        body = pkt.body[:4] + bytes([flags]) + encode_found(port.contact(), ring)
        port.send_routed(pkt.src, Kind.FOUND, body)

    def on_found(self, pkt: Routed) -> None:
        port = self.port
        if len(pkt.body) < 5:
            raise DecodeError("FOUND too short")
        seq = int.from_bytes(pkt.body[:4], "big")
        flags = pkt.body[4]
        contact, ring = decode_found(pkt.body[5:])
        if (
            not verify(contact.public_key, contact.signed_part(port.room), contact.signature)
            or node_id_from_public_key(contact.public_key) != pkt.src
        ):
            port.count("drop: FOUND with a bad contact")
            return
        find = self._finds.pop(seq, None)
        if find is None or find.slot is None:
            return
        now = port.clock()
        port.table.learn(ring)
        if flags & FLAG_REFUSED or pkt.src == port.id:
            self.maintenance.on_long_found(find.slot, None, now)
            return
        self.maintenance.on_long_found(find.slot, pkt.src, now)
        if pkt.src not in port.links.links:
            port.link_to(contact)
        port.wake()  # the next tick tells the peer it is now one of our long links

    def pending(self) -> bool:
        return bool(self._finds)

    def tick(self, now: float) -> None:
        port = self.port
        for seq, f in list(self._finds.items()):
            if f.slot is None and port.table.successors() and len(port.links.links) > 1:
                del self._finds[seq]  # joined: a node near our ring place called us back
            elif now - f.started > FIND_TIMEOUT:
                del self._finds[seq]
                if f.slot is not None:
                    self.maintenance.on_long_found(f.slot, None, now)
                elif port.links.links:
                    # Nobody called back: the FIND was lost. Try again through any link.
                    self.join(via=next(iter(port.links.links)))
