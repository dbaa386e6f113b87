"""What the node does with its links: their coming up and going down, requests for new ones, maintenance's
actions on them (overlay/routing/maintenance.py), ICE restarts when our addresses move, and the ticks of
on-demand links (overlay/ondemand.py) and of ICE again on tunnel and TURN links (overlay/upgrades.py).

The LinkManager (overlay/links.py) calls these; the pure cores decide, and this module carries out.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from overlay.identity import verify
from overlay.ids import format_id, node_id_from_public_key
from overlay.link import Link
from overlay.ondemand import Open
from overlay.routing.maintenance import (
    DEAD_REASONS,
    CloseLink,
    FindLong,
    OpenLink,
    Ping,
    SendNeighbours,
    TellUse,
)
from overlay.routing.ring import Role
from overlay.transport.paths import UdpPath
from overlay.wire import (
    FLAG_EXACT,
    FLAG_LONG_LINK,
    HELLO_LANES,
    HELLO_TUNNEL,
    Contact,
    Endpoint,
    Kind,
    LinkMsg,
    Routed,
    decode_link_request,
    encode_link_request,
    encode_neighbours,
    encode_ping,
    encode_suspect,
)

if TYPE_CHECKING:
    from overlay.node import Node

log = logging.getLogger(__name__)

PEER_CLOSED = "peer closed the link"


class LinkEvents:
    def __init__(self, node: Node) -> None:
        self.node = node

    def link_to(self, contact: Contact, via: int | None = None) -> None:
        node = self.node
        peer = node_id_from_public_key(contact.public_key)
        signal = node.signalling.route(peer, via)
        node.links.setup.connect(contact.public_key, contact.endpoint, contact, signal=signal)

    def relay_candidates(self, peer: int) -> list[int]:
        """Direct neighbours that say they are linked to `peer`: tunnels to it can go through them."""
        links, table = self.node.links.links, self.node.table
        cands = [n for n, lk in links.items() if lk.relay is None and peer in table.neighbours_of(n)]
        return sorted(cands, key=lambda n: links[n].rtt or 1.0)

    def on_link_up(self, link: Link) -> None:
        node = self.node
        now = node.clock()
        node.table.add_link(link.peer_id)
        node.maintenance.on_link_up(link.peer_id, now)
        node.router.forget_routes()
        link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        node.datapath.probes.probe(link, now)
        if not node.first_link.is_set():
            node.first_link.set()
            node.first_link_at = now
            node.finder.join(via=link.peer_id)
        node.dht.hand_over(link.peer_id)
        if node.trust_service is not None:
            node.trust_service.on_link_up(link)
        if link.relay is None and node.on_demand.linked(link.peer_id, link.tx_bytes + link.rx_bytes):
            node.table.set_role(link.peer_id, Role.ON_DEMAND)
            node.count("on-demand switches")
            log.info("on-demand link to %s up (%s): traffic moves to it", format_id(link.peer_id), link.kind)
        node.ticker.schedule(now)

    def on_peer_renewed(self, link: Link) -> None:
        """The link stayed up while the peer's end of it is new: it restarted, or called again (an ICE upgrade
        also does, and then this repeats what the peer holds, a few hundred bytes). What a link's start tells the
        peer goes again: our HELLO at the next tick, the records it holds a copy of, our revocations."""
        node = self.node
        now = node.clock()
        node.count("links renewed by the peer")
        node.maintenance.forget_told_use(link.peer_id)
        link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        node.dht.hand_over(link.peer_id)
        if node.trust_service is not None:
            node.trust_service.on_link_up(link)
        node.ticker.schedule(now)

    def send_hello(self, link: Link, use: int) -> None:
        """Our contact, what we use the link for (maintenance USE_* flags: the peer keeps a link either end
        uses), and that we take TUNNEL packets."""
        link.send(bytes([LinkMsg.HELLO, use | HELLO_TUNNEL | HELLO_LANES]) + self.node.contact().encode())

    def on_link_down(self, link: Link, reason: str) -> None:
        node = self.node
        now = node.clock()
        was_ring = link.peer_id in node.table.successors() or link.peer_id in node.table.predecessors()
        node.table.remove_link(link.peer_id)
        node.messages.forget(link.peer_id)
        node.datapath.probes.forget(link.peer_id)
        gone = reason == PEER_CLOSED or reason in DEAD_REASONS
        node.maintenance.on_link_down(link.peer_id, now, dead=gone)
        if reason in DEAD_REASONS:
            msg = encode_suspect(link.peer_id)
            for other in list(node.links.links.values()):
                other.send(msg)
        if gone:
            node.dht.cache.evict_node(link.peer_id)
            node.dht.on_neighbour_lost(link.peer_id, was_ring, now)
        node.router.forget_routes()
        node.ticker.schedule(now)

    def on_attempt_failed(self, peer: int) -> None:
        self.node.maintenance.on_attempt_failed(peer, self.node.clock())

    def on_link_request(self, pkt: Routed) -> None:
        node = self.node
        contact, via = decode_link_request(pkt.body)
        if node_id_from_public_key(contact.public_key) != pkt.src:
            return
        if not verify(contact.public_key, contact.signed_part(node.room), contact.signature):
            node.count("drop: contact with a bad signature")
            return
        if pkt.src in node.links.links:
            # The peer asks for a link we think we have: its end is gone (it closed the link or restarted and our
            # copy of the news was lost), or the request crossed our own. Check ours now, as a busy link, instead
            # of waiting out the keepalive; once it is dead, the peer's next request is answered.
            node.maintenance.suspect(pkt.src, node.clock())
            node.ticker.schedule(node.clock())
            return
        node.table.learn([pkt.src])
        self.link_to(contact, via if via != node.id else None)

    def on_unreachable(self, endpoint: Endpoint) -> None:
        """An ICMP error said `endpoint` is unreachable (overlay/transport/underlay.py): check the links whose
        path ends there now (maintenance `unreachable`), not at their next keepalive."""
        node = self.node
        now = node.clock()
        hit = False
        for link in node.links.links.values():
            if isinstance(link.path, UdpPath) and link.path.endpoint == endpoint:
                node.maintenance.unreachable(link.peer_id, now)
                hit = True
        if hit:
            node.count("links: ICMP unreachable")
            node.ticker.schedule(now)

    def on_sent(self, link: Link, data: bool) -> None:
        """A routed packet went out on `link` (data: the first since our last tick). Watch it for an answer from
        now, not from our next tick (10 s away when idle): a route through a crashed node's link is then avoided
        within BUSY_PING + 1 s of the first packet lost on it, control packets (DHT lookups, finds) included."""
        node = self.node
        now = node.clock()
        if data:
            node.maintenance.on_busy(link.peer_id, now)
        else:
            node.maintenance.on_sent(link.peer_id, now)
        node.ticker.watch_silence()

    def on_no_route(self, dst: int, kind: int) -> None:
        if kind == Kind.DATA:
            # The node we resolved an address to is gone: forget it so the next packet looks it up again.
            self.node.dht.cache.evict_node(dst)
        elif kind == Kind.SIGNAL:
            self.node.links.setup.signal_lost(dst)

    def act(self, action: Any, now: float) -> None:
        """Carry out one of maintenance's actions."""
        node = self.node
        links = node.links.links
        if isinstance(action, Ping):
            link = links.get(action.peer)
            if link is not None:
                link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
                if node.ice is not None and not action.idle:
                    # A busy or ring link silent for a ping interval (gossip keeps those busier than that):
                    # check at once whether our addresses changed rather than at the next periodic STUN round.
                    # Idle links are pinged on a slow beat as a matter of course: no reason to ask.
                    node.ice.refresh_soon(now)
        elif isinstance(action, SendNeighbours):
            msg = encode_neighbours(list(action.neighbours), node.beacon.overlay, max(0, node.beacon.seq))
            for peer in action.peers:
                link = links.get(peer)
                if link is not None:
                    link.send(msg)
        elif isinstance(action, OpenLink):
            # Signal through the overlay: the peer calls us back (direct, ICE, tunnel), its signals coming to us
            # through our first hop when the ring cannot route to us yet.
            body = encode_link_request(node.contact(), node.router.first_hop(action.peer))
            node.send_routed(action.peer, Kind.LINK_REQUEST, body, FLAG_EXACT)
        elif isinstance(action, FindLong):
            node.finder.find(action.target, action.slot, FLAG_LONG_LINK)
        elif isinstance(action, CloseLink):
            node.links.close(action.peer, action.reason)
        elif isinstance(action, TellUse):
            link = links.get(action.peer)
            if link is not None:
                self.send_hello(link, action.use)

    # -- ICE restarts and upgrades (overlay/transport/ice.py, overlay/upgrades.py) ---------------------------
    def on_address_change(self) -> None:
        """Our host or server-reflexive addresses changed: the paths ICE chose through them may be dead. Restart
        ICE on each link that is not a tunnel (the link and its place in the ring stay meanwhile)."""
        node = self.node
        for peer, link in list(node.links.links.items()):
            if link.relay is None and link.kind != "host":
                # The link's own path may be dead: signal through a neighbour linked to the peer too. The nearest
                # is often on our own LAN, behind the same NAT, and lost its paths out with ours: each offer sent
                # again goes through the next shared neighbour, then the overlay's own route.
                ways = [*(n for n in self.relay_candidates(peer) if n != peer), None]
                node.links.setup.restart(link.peer_key, node.signalling.route(peer, ways[0], then=ways[1:]))

    def tick_upgrades(self, now: float) -> None:
        """ICE again, now and then, on the tunnel and TURN links this side upgrades (overlay/upgrades.py)."""
        node = self.node
        if node.ice is None:
            return
        links = node.links.links
        stopgaps = [peer for peer, link in links.items() if link.kind in ("tunnel", "relay") and node.id < peer]
        for peer in node.upgrades.due(now, stopgaps):
            node.links.setup.restart(links[peer].peer_key, node.signalling.route(peer), upgrade=True)

    # -- on-demand direct links (overlay/ondemand.py) -----------------------------------------------------------
    def _link_bytes(self, peer: int) -> int | None:
        link = self.node.links.links.get(peer)
        return None if link is None or link.relay is not None else link.tx_bytes + link.rx_bytes

    def tick_on_demand(self, now: float) -> None:
        node = self.node
        actions = node.on_demand.tick(now, self._link_bytes)
        node.router.relayed = node.on_demand.relayed
        for action in actions:
            if isinstance(action, Open):
                node.count("on-demand links asked for")
                log.info("much traffic for %s through relays: asking it for a direct link", format_id(action.peer))
                node.links.setup.offer(action.peer, node.signalling.route(action.peer), xmpp=False)
            else:
                node.count("on-demand links released")
                log.info("on-demand link to %s idle: released", format_id(action.peer))
                node.table.set_role(action.peer, Role.ON_DEMAND, False)
                node.wake()
