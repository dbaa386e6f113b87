"""Messages on a link (overlay/wire.py LinkMsg): each goes to the part of the node it is for, and what the
overlay's beacon (overlay/beacon.py) hears from each neighbour.

Every byte here comes from a peer: a message that does not decode is counted and dropped (tests/test_node_fuzz.py
feeds any bytes), and an unknown kind is counted, so a newer peer's messages do no harm.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from overlay.ids import format_id
from overlay.link import Link
from overlay.linkevents import PEER_CLOSED
from overlay.router import DATA_KINDS
from overlay.ticker import TIMER_MAX
from overlay.wire import (
    FLAG_JOIN,
    FLAG_PROMISE,
    FLAG_QUIET,
    HELLO_LANES,
    HELLO_TUNNEL,
    ROUTED_HEADER,
    DecodeError,
    LinkMsg,
    decode_beacon,
    decode_neighbours,
    decode_probe,
    decode_relay,
    decode_routed,
    decode_suspect,
    decode_token,
    encode_beacon,
    encode_ping,
)

if TYPE_CHECKING:
    from overlay.node import Node

log = logging.getLogger(__name__)

ACK = bytes([LinkMsg.ACK])


class LinkMessages:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.peer_beacons: dict[int, tuple[int, int]] = {}  # what each neighbour last said of its overlay

    def forget(self, peer: int) -> None:
        self.peer_beacons.pop(peer, None)

    # -- the overlay's beacon (overlay/beacon.py) ---------------------------------------------------------------
    def flood_beacon(self, seq: int, came_from: int | None) -> None:
        node = self.node
        msg = encode_beacon(node.beacon.overlay, seq)
        for peer, link in list(node.links.links.items()):
            if peer != came_from:
                link.send(msg)

    def _hear_beacon(self, peer: int, overlay: int, seq: int, now: float) -> None:
        node = self.node
        self.peer_beacons[peer] = (overlay, seq)
        event = node.beacon.hear(overlay, seq, now)
        if event not in ("rejoin", "migrate"):
            return  # a newer beacon spreads with the gossip; only a move into another ring floods at once
        self.flood_beacon(node.beacon.seq, peer)
        log.info(
            "%s overlay %016x through %s",
            "moving into the older" if event == "migrate" else "cut off from the leader; joining again",
            overlay,
            format_id(peer),
        )
        node.count(f"overlay {event}s")
        node.finder.join(via=peer)
        node.router.forget_routes()
        node.maintenance.relink_now(now)

    def join_unfit(self) -> set[int]:
        """Neighbours whose overlay a join must not go through (overlay/beacon.py fit_for_join)."""
        fit = self.node.beacon.fit_for_join
        return {p for p in self.node.links.links if not fit(*self.peer_beacons.get(p, (0, 0)))}

    # -- dispatch ---------------------------------------------------------------------------------------------
    def on_message(self, link: Link, msg: bytes) -> None:
        node = self.node
        kind = msg[0] if msg else 0
        now = node.heard(link)
        if kind == LinkMsg.ROUTED and len(msg) >= ROUTED_HEADER.size and msg[ROUTED_HEADER.size - 1] in DATA_KINDS:
            _, ttl, flags, _, dst, watermark, data_kind = ROUTED_HEADER.unpack_from(msg)
            if dst == node.id and (watermark != 0 or flags & FLAG_PROMISE) and not flags & FLAG_JOIN:
                # What decide() and decide_promise() answer for a packet at its exact destination (distance 0,
                # below any watermark but 0; promises end here): deliver, without decoding it into a Routed.
                node.datapath.deliver_routed(msg, ttl, data_kind)
                return
        try:
            if kind == LinkMsg.ROUTED:
                # The sender watches its link until it hears from us (maintenance.on_sent): answer at once, in
                # this wake-up, rather than with a pong to the ping it would send 2 s from now (three wake-ups;
                # routed lookups were most of an idle node's pings in bench/scale.py). Data needs none: it
                # flows both ways or is pinged on the busy link's beat.
                routed = decode_routed(msg)
                if not routed.flags & FLAG_QUIET:
                    link.send(ACK)
                node.router.on_routed(link, routed)
            elif kind == LinkMsg.PING:
                link.send(encode_ping(LinkMsg.PONG, decode_token(msg)))
            elif kind == LinkMsg.PONG:
                sent = decode_token(msg) / 1e6
                if 0 <= now - sent < 60:
                    link.rtt = now - sent
                    node.rtt_seconds.observe(link.rtt)
            elif kind == LinkMsg.NEIGHBOURS:
                ids, overlay, seq = decode_neighbours(msg)
                if node.maintenance.on_neighbours(link.peer_id, ids, now):
                    node.router.forget_routes()  # lookahead may choose differently now
                    node.wake(TIMER_MAX)  # a candidate to link to may be new: an idle timer waits up to 12.5 s
                self._hear_beacon(link.peer_id, overlay, seq, now)
            elif kind == LinkMsg.SUSPECT:
                node.maintenance.suspect(decode_suspect(msg), now)
                node.ticker.watch_silence()
            elif kind == LinkMsg.ACK:
                pass  # its arrival is the answer (maintenance.on_rx in node.heard)
            elif kind == LinkMsg.BEACON:
                self._hear_beacon(link.peer_id, *decode_beacon(msg), now)
            elif kind == LinkMsg.RELAY:
                peer, packet = decode_relay(msg)
                onward = node.links.links.get(peer)
                if onward is None or onward.relay is not None:
                    node.count("drop: relay target not a direct link")
                else:
                    onward.send_relay(LinkMsg.RELAYED, link.peer_id, packet)
            elif kind == LinkMsg.RELAYED:
                peer, packet = decode_relay(msg)
                node.links.on_packet(packet, link.peer_id, peer)
            elif kind == LinkMsg.HELLO:
                self._on_hello(link, msg)
            elif kind == LinkMsg.REPLICATE:
                node.dht.on_replica(msg[1:], now)
            elif kind == LinkMsg.PROBE:
                link.send(encode_ping(LinkMsg.PROBE_ACK, decode_probe(msg)))
            elif kind == LinkMsg.PROBE_ACK:
                node.datapath.probes.on_ack(link, decode_token(msg))
            elif kind == LinkMsg.ANCHOR:
                if node.membership is not None and not node.membership.on_recruited(now):
                    node.count("anchor recruits refused")
                    link.send(bytes([LinkMsg.ANCHOR_REFUSED]))
            elif kind == LinkMsg.ANCHOR_REFUSED:
                if node.membership is not None:
                    node.membership.on_refused(link.peer_id, now)
            elif kind == LinkMsg.CLOSE:
                node.links.close(link.peer_id, PEER_CLOSED, notify=False)
            elif kind == LinkMsg.REVOKE:
                if node.trust_service is not None:
                    node.trust_service.on_revoke(link, msg[1:])
            else:
                node.count("drop: unknown link message")
        except DecodeError:
            node.count("drop: malformed link message")

    def _on_hello(self, link: Link, msg: bytes) -> None:
        """The peer's contact, what it uses the link for, and whether it takes TUNNEL packets and lanes."""
        node = self.node
        if len(msg) < 2:
            raise DecodeError("HELLO without flags")
        contact = node.check_contact(msg[2:])
        if contact is not None and contact.public_key == link.peer_key:
            link.contact = contact
            node.maintenance.on_peer_use(link.peer_id, msg[1] & ~(HELLO_TUNNEL | HELLO_LANES))
            tunnels_ok, lanes_ok = bool(msg[1] & HELLO_TUNNEL), bool(msg[1] & HELLO_LANES)
            if (link.tunnels_ok, link.lanes_ok) != (tunnels_ok, lanes_ok):
                link.tunnels_ok, link.lanes_ok = tunnels_ok, lanes_ok
                node.links.on_change(link.peer_id)
