"""Link signalling: how ICE offers and answers travel between members.

A joiner's first link is signalled in its XMPP hellos to the anchors (overlay/membership.py). Every later link
is signalled through the overlay in routed SIGNAL packets, so a node's XMPP traffic does not grow with its
links. A SIGNAL packet names its final destination: usually the packet's own destination, but a joiner with a
single link is reachable only through the member it joined by, so a signal for it is routed to that member,
which passes it on over its link, or, when it has no link to the joiner yet (an anchor introducing a joiner it
cannot reach itself), in an XMPP message to the joiner's room nick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from overlay.identity import verify
from overlay.ids import FAR, node_id_from_public_key
from overlay.linksetup import Signaller
from overlay.port import OverlayPort
from overlay.routing.forwarding import DEFAULT_TTL
from overlay.transport.signals import Signal, decode_routed_signal, decode_signal, encode_routed_signal
from overlay.wire import FLAG_EXACT, DecodeError, Kind, Routed

log = logging.getLogger(__name__)

# Passes a signal body (final destination + signal) to a joiner over XMPP; False when it cannot.
XmppRelay = Callable[[int, bytes], bool]


class Signalling:
    def __init__(self, port: OverlayPort, first_hop: Callable[[int], int | None]) -> None:
        self.port = port
        self.first_hop = first_hop
        self.xmpp_relay: XmppRelay = lambda dst, body: False

    def route(self, peer: int, via: int | None = None, *, then: Sequence[int | None] = ()) -> Signaller:
        """A Signaller that routes signals for `peer` through the overlay (to `via` first, if given). Each
        names our first hop, so the peer's replies reach us while the ring cannot route to us yet. `then`: where
        each later send goes instead, in turn (None: straight to the peer), for when `via` may not reach it."""
        ways = [via, *then]
        sent = 0

        def send(signal: Signal) -> None:
            nonlocal sent
            way = ways[sent % len(ways)]
            sent += 1
            dst = way if way is not None else peer
            reply_via = self.first_hop(dst) or 0
            log.debug("signal %s %d for %016x via %016x", signal.type.name, signal.attempt, peer, dst)
            self.port.send_routed(dst, Kind.SIGNAL, encode_routed_signal(peer, signal, reply_via))

        return send

    def on_routed(self, pkt: Routed) -> None:
        """A SIGNAL packet delivered here: for us, or to pass on to the joiner it names."""
        final, reply_via, raw = decode_routed_signal(pkt.body)
        if final != self.port.id:
            self.pass_on(final, pkt.body, pkt.src)
            return
        self.receive(raw, lambda sender: self.route(sender, reply_via if reply_via not in (0, sender) else None))

    def pass_on(self, final: int, body: bytes, src: int) -> None:
        link = self.port.links.links.get(final)
        if link is not None:
            link.send(Routed(DEFAULT_TTL - 1, FLAG_EXACT, src, final, FAR, Kind.SIGNAL, body).encode())
        elif not self.xmpp_relay(final, body):
            # Not linked to it (yet) and it left the room: the ring may know it by now.
            log.debug("signal for %016x from %016x: routing it on", final, src)
            self.port.count("signals routed on")
            self.port.send_routed(final, Kind.SIGNAL, body)

    def receive(self, raw: bytes, reply_route: Callable[[int], Signaller]) -> int | None:
        """A signal for us: check it, hand it to link setup; replies go by `reply_route(sender)`. Returns the
        sender's node ID, or None for a signal that does not check out (counted)."""
        try:
            signal = decode_signal(raw)
        except DecodeError:
            self.port.count("drop: malformed signal")
            return None
        contact = signal.contact
        if not verify(contact.public_key, contact.signed_part(self.port.room), contact.signature):
            self.port.count("drop: signal with a bad contact")
            return None
        sender = node_id_from_public_key(contact.public_key)
        self.port.links.setup.on_signal(signal, reply_route(sender))
        return sender
