"""The node's side of end-to-end sealing (overlay/e2e.py): which data is sealed, what a SEALED link packet and a
sealed delivery become, and the relays' TOO_BIG notices. Kept out of the node so each capability has a module.

Data for a member goes on our link to it when the route takes that link (the link's session is end to end
already); anything else is sealed for the member alone, including data for a linked member whose link the route
avoids as suspect, which would otherwise cross a relay in the clear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from overlay.e2e import KEEPALIVE, TOO_BIG, EndToEnd
from overlay.link import Link
from overlay.routing.forwarding import DEFAULT_TTL
from overlay.transport.session import Handshaker
from overlay.wire import FLAG_EXACT, FLAG_PROMISE, ROUTED_HEADER, Kind, LinkMsg, Routed

if TYPE_CHECKING:
    from overlay.node import Node


class Sealing:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.e2e = EndToEnd(
            Handshaker(node.identity, node.trust),
            lambda dst, kind, body: node.send_routed(dst, kind, body),
            self._send_sealed,
            node.counters,
            node.clock,
        )
        self.e2e.wake = node.wake
        self.e2e.key_of = self._key_of
        node.datapath.e2e = self.e2e
        node.router.on_too_big = self._on_too_big
        node.router.handlers[Kind.SEALED] = self._on_delivered
        node.router.handlers[Kind.E2E] = lambda pkt: self.e2e.on_routed(pkt.src, pkt.body)

    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None:
        node = self.node
        if node_id == node.id or (node_id in node.links.links and node.router.first_hop(node_id) == node_id):
            node.router.send_data(node_id, kind, body)
        else:
            self.e2e.send(node_id, kind, body)

    def _send_sealed(self, dst: int, e2e_packet: bytes) -> None:
        flags = FLAG_EXACT | (FLAG_PROMISE if self.node.router.promise else 0)
        self.node.router.send_routed(dst, Kind.SEALED, e2e_packet, flags)

    def _key_of(self, node_id: int) -> bytes | None:
        node = self.node
        link = node.links.links.get(node_id)
        if link is not None:
            return link.peer_key
        cert = node.trust.peer(node_id) if node.trust is not None else None
        return cert.node_key if cert is not None else node.dht.cache.key_of(node_id)

    def forget(self, node_id: int) -> None:
        """A member's certificate was revoked: its sessions and its cached address go."""
        self.e2e.forget(node_id)
        self.node.dht.cache.evict_node(node_id)

    def _on_too_big(self, origin: int, dst: int) -> None:
        if origin == self.node.id:
            self.e2e.on_routed(origin, bytes([TOO_BIG]) + dst.to_bytes(8, "big"))
        else:
            self.e2e.too_big(origin, dst)

    def on_link_packet(self, link: Link, header: bytes, payload: memoryview) -> None:
        """A SEALED link packet: its routed header (decrypted by the link) and the end-to-end packet."""
        node = self.node
        node.heard(link)
        if len(header) != ROUTED_HEADER.size:
            node.count("drop: sealed packet with a bad header")
            return
        lm, ttl, flags, src, dst, watermark, kind = ROUTED_HEADER.unpack(header)
        if lm != LinkMsg.ROUTED or kind != Kind.SEALED:
            node.count("drop: sealed packet with a bad header")
            return
        node.router.on_routed(link, Routed(ttl, flags, src, dst, watermark, Kind.SEALED, payload))  # type: ignore[arg-type]

    def _on_delivered(self, pkt: Routed) -> None:
        opened = self.e2e.open(pkt.src, pkt.body)
        if opened is None:
            return
        kind, body = opened
        if kind == KEEPALIVE:
            return
        if kind not in (Kind.DATA, Kind.DATA_GSO):
            self.node.count("drop: sealed packet of an unknown kind")
            return
        datapath = self.node.datapath
        datapath.hops[0] += 1
        datapath.hops[1] += DEFAULT_TTL - pkt.ttl
        datapath.deliver_from(pkt.src, body, kind)
