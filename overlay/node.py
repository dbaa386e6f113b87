"""The node: the asyncio driver that joins the pure cores (ring, maintenance, forwarding, DHT) to links,
the virtual NIC and the XMPP bootstrap.

Life of a node: log in to XMPP and swap signed contacts with the room's anchors; link to one of them; route a
FIND toward our own ID so the nodes around our ring position learn of us and we of them; publish our address
record; from then on every new link is signalled through the overlay, and XMPP is left (unless we are an
anchor). Packets from the TAP are resolved through the DHT (cached) and routed hop by hop, each hop strictly
closer to the destination ID.

One clock: `now` is wall-clock seconds (records and handshakes cross machines); cores are handed it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from overlay.dht.service import AddressService
from overlay.identity import Identity, verify
from overlay.ids import FAR, format_id, node_id_from_public_key, ring_distance
from overlay.links import Link, LinkCallbacks, LinkManager, Underlay
from overlay.membership import Membership
from overlay.routing.forwarding import (
    DEFAULT_TTL,
    DROP_PROMISE,
    Decision,
    Deliver,
    Drop,
    Forward,
    NeighboursOf,
    NoRoute,
    decide,
    decide_promise,
    next_hop,
)
from overlay.routing.maintenance import (
    DEAD_REASON,
    CloseLink,
    FindLong,
    Maintenance,
    OpenLink,
    Ping,
    SendNeighbours,
    TellUse,
)
from overlay.routing.ring import RingParams, RingTable, Role
from overlay.tap.frames import (
    ETH_HEADER_LEN,
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
    Bytes,
    FrameError,
    complete_checksum,
    icmp_error_allowed,
    icmp_unreachable,
    parse_vnet_header,
    segment_tcp4,
)
from overlay.tap.vnic import Outbound, Reply, VirtualNic
from overlay.wire import (
    FLAG_EXACT,
    FLAG_JOIN,
    FLAG_LONG_LINK,
    FLAG_PROMISE,
    FLAG_REFUSED,
    PROMISE_HOPS_MASK,
    PROMISE_HOPS_SHIFT,
    ROUTED_HEADER,
    Contact,
    DecodeError,
    Kind,
    LinkMsg,
    Routed,
    decode_contact,
    decode_found,
    decode_neighbours,
    decode_no_route,
    decode_probe,
    decode_relay,
    decode_routed,
    decode_token,
    encode_found,
    encode_neighbours,
    encode_no_route,
    encode_ping,
    encode_probe,
    encode_relay,
    reroute,
)

log = logging.getLogger(__name__)

FIND_TIMEOUT = 5.0  # our choice: a FIND crosses ~log N hops of LAN/WAN RTT well inside this
TIMER_MAX = 1.0  # the longest the node sleeps between ticks (lookup retries are 1 s apart)
PEER_CLOSED = "peer closed the link"
ICMP_INTERVAL = 0.1  # our choice: at most 10 host-unreachable replies a second (RFC 1812 4.3.2.8 rate limit)
TAP_BATCH = 64  # frames per TAP wakeup (ARCHITECTURE.md: 64 per wakeup took 0.7-0.9 to 1.2-1.6 Gbit/s)
DATA_KINDS = (Kind.DATA, Kind.DATA_GSO)
ADDRESS_TEXT_LIMIT = 1 << 16  # our choice: a /16 of virtual addresses; the cache restarts beyond it
PROBE_INTERVAL = 60.0  # our choice: a link whose path drops IP fragments costs one 8 KB probe a minute
SEGMENT_DROP = "drop: TCP super-frame that cannot be segmented"


@dataclass
class NodeSettings:
    """What a node needs beyond its key: the group, its virtual address, its topology parameters."""

    room: str
    address: str  # virtual IPv4 with prefix, "10.254.0.1/16"
    ring: RingParams = field(default_factory=RingParams)
    lookahead: bool = True
    promise: bool = True  # data packets follow the promise rule (docs/topology.md: 1.27x vs 1.42x shortest)
    stabilize_interval: float = 5.0


@dataclass
class _Find:
    slot: int | None  # long-link slot, or None for the join
    started: float


class Node:
    def __init__(
        self,
        identity: Identity,
        settings: NodeSettings,
        underlay: Underlay,
        *,
        bootstrap: Any = None,
        tap: Any = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.id = identity.node_id
        self.settings = settings
        iface = ipaddress.IPv4Interface(settings.address)
        self.address = str(iface.ip)
        self.network = iface.network
        self.room = settings.room
        self.underlay = underlay
        self.bootstrap = bootstrap
        self.tap = tap
        self.clock = clock
        self.rng = rng or random.Random()
        self.table = RingTable(self.id, settings.ring)
        self.maintenance = Maintenance(self.table, self.rng, stabilize_interval=settings.stabilize_interval)
        self.links = LinkManager(
            identity,
            underlay,
            LinkCallbacks(
                self._on_link_up,
                self._on_link_down,
                self._on_attempt_failed,
                self._on_message,
                self._relay_candidates,
            ),
            clock,
        )
        self.counters: dict[str, int] = {}
        self.dht = AddressService(self)
        self.vnic: VirtualNic | None = None
        if tap is not None:
            self.attach_tap(tap)
        self.membership = Membership(self, bootstrap) if bootstrap is not None else None
        self._finds: dict[int, _Find] = {}
        self._find_seq = 0
        self._route_cache: dict[int, int | None] = {}
        # Data path: destination node -> (next hop, our distance), the Forward that decide() gave for a DATA
        # packet we originated; forgotten with _route_cache. Lets a data packet skip building a Routed.
        self._data_routes: dict[int, tuple[int, int, int]] = {}  # dst -> (next hop, watermark, flags)
        self._promise_cache: dict[tuple[int, int, int], Decision] = {}
        self.data_hops = [0, 0]  # data packets that arrived over a link for us, and the hops they took
        self._address_text: dict[int, str] = {}
        self.first_link_at = 0.0
        self._last_icmp = -1e18
        # Fragment probes (LinkMsg.PROBE), by peer: when the next is due and the token of the last one sent.
        self._probe_due: dict[int, float] = {}
        self._probe_token: dict[int, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.first_link = asyncio.Event()

    # -- contacts -------------------------------------------------------------------------------------------------
    def contact(self) -> Contact:
        unsigned = Contact(
            self.identity.public_key, self.address, self.underlay.local_endpoint, int(self.clock() * 1000)
        )
        return Contact(
            unsigned.public_key,
            unsigned.address,
            unsigned.endpoint,
            unsigned.timestamp_ms,
            self.identity.sign(unsigned.signed_part(self.room)),
        )

    def check_contact(self, data: bytes) -> Contact | None:
        """A peer's contact if it parses and carries a valid signature for this group, else None (counted)."""
        try:
            contact, rest = decode_contact(data)
        except DecodeError:
            self.count("drop: malformed contact")
            return None
        if rest or not verify(contact.public_key, contact.signed_part(self.room), contact.signature):
            self.count("drop: contact with a bad signature")
            return None
        return contact

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- life cycle --------------------------------------------------------------------------------------------
    def attach_tap(self, tap: Any) -> None:
        """The virtual NIC, once it exists (it is made after XMPP accepted us, so a refusal leaves none)."""
        iface = ipaddress.IPv4Interface(self.settings.address)
        self.tap = tap
        self.vnic = VirtualNic(int(iface.ip), iface.network.prefixlen, tap.mac)

    async def start(self, *, start_bootstrap: bool = True) -> None:
        """Join the group: XMPP login (unless the caller did it), first link, join FIND.

        Raises BootstrapError from the XMPP layer."""
        self._loop = asyncio.get_running_loop()
        self.underlay.start(self.links.on_datagram)
        if self.tap is not None:
            self._loop.add_reader(self.tap.fileno(), self._on_tap_readable)
        self._schedule(self.clock())
        if self.membership is None:
            return
        if start_bootstrap:
            await self.membership.bootstrap.start()
        await self.membership.join()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        self.links.close_all()
        if self.tap is not None and self._loop is not None:
            self._loop.remove_reader(self.tap.fileno())
        self.underlay.close()
        if self.membership is not None:
            await self.membership.stop()

    # -- timers -------------------------------------------------------------------------------------------------
    def _schedule(self, when: float) -> None:
        if self._stopped or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = min(TIMER_MAX, max(0.02, when - self.clock()))
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock()
        deadline = self.links.tick(now)
        for action in self.maintenance.tick(now):
            self._act(action, now)
        deadline = min(deadline, self.maintenance.next_deadline())
        self.dht.tick(now)
        if self.membership is not None:
            self.membership.tick(now)
        self._tick_finds(now)
        self._tick_probes(now)
        self._schedule(min(deadline, now + TIMER_MAX))

    def _act(self, action: Any, now: float) -> None:
        if isinstance(action, Ping):
            link = self.links.links.get(action.peer)
            if link is not None:
                link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        elif isinstance(action, SendNeighbours):
            msg = encode_neighbours(list(action.neighbours))
            for peer in action.peers:
                link = self.links.links.get(peer)
                if link is not None:
                    link.send(msg)
        elif isinstance(action, OpenLink):
            # Signal through the overlay: the peer answers by calling us at the endpoint in our contact.
            self.send_routed(action.peer, Kind.LINK_REQUEST, self.contact().encode(), FLAG_EXACT)
        elif isinstance(action, FindLong):
            self._find(action.target, action.slot, FLAG_LONG_LINK)
        elif isinstance(action, CloseLink):
            self.links.close(action.peer, action.reason)
        elif isinstance(action, TellUse):
            link = self.links.links.get(action.peer)
            if link is not None:
                self._send_hello(link, action.use)

    # -- links -------------------------------------------------------------------------------------------------
    def _relay_candidates(self, peer: int) -> list[int]:
        """Direct neighbours that say they are linked to `peer`: tunnels to it can go through them."""
        cands = [n for n, lk in self.links.links.items() if lk.relay is None and peer in self.table.neighbours_of(n)]
        return sorted(cands, key=lambda n: self.links.links[n].rtt or 1.0)

    def _on_link_up(self, link: Link) -> None:
        now = self.clock()
        self.table.add_link(link.peer_id)
        self.maintenance.on_link_up(link.peer_id, now)
        self._forget_routes()
        link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        self._probe(link, now)
        if not self.first_link.is_set():
            self.first_link.set()
            self.first_link_at = now
            self._find(self.id, None, FLAG_JOIN, via=link.peer_id)
        self.dht.hand_over(link.peer_id)
        self._schedule(now)

    def _send_hello(self, link: Link, use: int) -> None:
        """Our contact, and what we use the link for (maintenance USE_* flags): the peer keeps a link either
        end uses."""
        link.send(bytes([LinkMsg.HELLO, use]) + self.contact().encode())

    def _on_link_down(self, link: Link, reason: str) -> None:
        now = self.clock()
        self.table.remove_link(link.peer_id)
        self._probe_due.pop(link.peer_id, None)
        self._probe_token.pop(link.peer_id, None)
        gone = reason in (PEER_CLOSED, DEAD_REASON)
        self.maintenance.on_link_down(link.peer_id, now, dead=gone)
        if gone:
            self.dht.cache.evict_node(link.peer_id)
        self._forget_routes()
        self._schedule(now)

    def _on_attempt_failed(self, peer: int) -> None:
        self.maintenance.on_attempt_failed(peer, self.clock())

    # -- fragment probes: may this link carry a datagram the underlay splits into IP fragments? ----------------
    # A TSO super-frame travels as one ~60 KB UDP datagram, ~45 IP fragments on a 1500-byte path; a firewall
    # or NAT that drops fragments would lose every one of them, silently. Until a PROBE of PROBE_SIZE bytes
    # is acknowledged, super-frames for the link are segmented first (_send_unfragmented).
    def _probe(self, link: Link, now: float) -> None:
        token = self.rng.getrandbits(64)
        self._probe_token[link.peer_id] = token
        self._probe_due[link.peer_id] = now + PROBE_INTERVAL
        link.send(encode_probe(token))

    def _tick_probes(self, now: float) -> None:
        for link in list(self.links.links.values()):
            # A link replaced by a new handshake starts unproven and is probed again at once.
            if not link.fragments_ok and now >= self._probe_due.get(link.peer_id, now):
                self._probe(link, now)

    def _on_probe_ack(self, link: Link, token: int) -> None:
        if self._probe_token.get(link.peer_id) != token:
            self.count("drop: probe ack for no probe")
            return
        del self._probe_token[link.peer_id]
        link.fragments_ok = True

    # -- link messages -------------------------------------------------------------------------------------------
    def _on_message(self, link: Link, msg: bytes) -> None:
        kind = msg[0] if msg else 0
        now = self.clock()
        self.maintenance.on_rx(link.peer_id, now)
        if kind == LinkMsg.ROUTED and len(msg) >= ROUTED_HEADER.size and msg[ROUTED_HEADER.size - 1] in DATA_KINDS:
            _, ttl, flags, _, dst, watermark, data_kind = ROUTED_HEADER.unpack_from(msg)
            if dst == self.id and (watermark != 0 or flags & FLAG_PROMISE) and not flags & FLAG_JOIN:
                # What decide() and decide_promise() answer for a packet at its exact destination (distance 0,
                # below any watermark but 0; promises end here): deliver, without decoding it into a Routed.
                self.data_hops[0] += 1
                self.data_hops[1] += DEFAULT_TTL - ttl
                self.deliver_data(memoryview(msg)[ROUTED_HEADER.size :], data_kind)
                return
        try:
            if kind == LinkMsg.ROUTED:
                self._on_routed(link, decode_routed(msg))
            elif kind == LinkMsg.PING:
                link.send(encode_ping(LinkMsg.PONG, decode_token(msg)))
            elif kind == LinkMsg.PONG:
                sent = decode_token(msg) / 1e6
                if 0 <= now - sent < 60:
                    link.rtt = now - sent
            elif kind == LinkMsg.NEIGHBOURS:
                self.maintenance.on_neighbours(link.peer_id, decode_neighbours(msg), now)
                self._forget_routes()
            elif kind == LinkMsg.RELAY:
                peer, packet = decode_relay(msg)
                onward = self.links.links.get(peer)
                if onward is None or onward.relay is not None:
                    self.count("drop: relay target not a direct link")
                else:
                    onward.send(encode_relay(LinkMsg.RELAYED, link.peer_id, packet))
            elif kind == LinkMsg.RELAYED:
                peer, packet = decode_relay(msg)
                self.links.on_packet(packet, None, link.peer_id)
            elif kind == LinkMsg.HELLO:
                if len(msg) < 2:
                    raise DecodeError("HELLO without flags")
                contact = self.check_contact(msg[2:])
                if contact is not None and contact.public_key == link.peer_key:
                    link.contact = contact
                    self.maintenance.on_peer_use(link.peer_id, msg[1])
            elif kind == LinkMsg.REPLICATE:
                self.dht.on_replica(msg[1:], now)
            elif kind == LinkMsg.PROBE:
                link.send(encode_ping(LinkMsg.PROBE_ACK, decode_probe(msg)))
            elif kind == LinkMsg.PROBE_ACK:
                self._on_probe_ack(link, decode_token(msg))
            elif kind == LinkMsg.ANCHOR:
                if self.membership is not None:
                    self.membership.on_recruited(now)
            elif kind == LinkMsg.CLOSE:
                self.links.close(link.peer_id, PEER_CLOSED, notify=False)
            else:
                self.count("drop: unknown link message")
        except DecodeError:
            self.count("drop: malformed link message")

    # -- routing -----------------------------------------------------------------------------------------------
    def _forget_routes(self) -> None:
        self._route_cache.clear()
        self._promise_cache.clear()
        self._data_routes.clear()

    def _next_hop(self, dst: int, exclude: int | None = None) -> int | None:
        if exclude is None:
            cached = self._route_cache.get(dst, -1)
            if cached != -1:
                return cached
        nbrs = self.table.neighbours()
        look: NeighboursOf | None = self.table.neighbours_of if self.settings.lookahead else None
        if exclude is not None:
            nbrs = [n for n in nbrs if n != exclude]
            if look is not None:
                base = look

                def look(n: int) -> list[int]:
                    return [m for m in base(n) if m != exclude]

        nh = next_hop(self.id, dst, nbrs, look)
        if exclude is None:
            self._route_cache[dst] = nh
        return nh

    def _stuck_at_origin(self, pkt: Routed) -> bool:
        if pkt.exact:
            return pkt.dst != self.id
        closest = self.table.closest_known(pkt.dst)
        return closest is not None and ring_distance(closest, pkt.dst) < ring_distance(self.id, pkt.dst)

    def _next_hop_any(self, dst: int, exclude: int | None) -> int | None:
        """The neighbour nearest `dst` whether or not it is nearer than we are: next_hop seen from the point
        opposite dst on the ring, from where every neighbour is an improvement."""
        nbrs = [n for n in self.table.neighbours() if n != exclude]
        nof = self.table.neighbours_of if self.settings.lookahead else None
        return next_hop(dst ^ (1 << 63), dst, nbrs, nof)

    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None:
        """Originate a data packet (DATA or DATA_GSO) for the member with this node ID."""
        flags = FLAG_EXACT | (FLAG_PROMISE if self.settings.promise else 0)
        self.send_routed(node_id, kind, body, flags)

    def send_routed(self, dst: int, kind: Kind, body: bytes, flags: int = FLAG_EXACT, via: int | None = None) -> None:
        """Originate a routed packet. `via`: hand it to this neighbour whatever the table says (the join)."""
        packet = Routed(DEFAULT_TTL, flags, self.id, dst, FAR, kind, body)
        if via is not None:
            link = self.links.links.get(via)
            if link is not None:
                link.send(packet.encode())
            return
        self._on_routed(None, packet)

    def _promised_hop(self, pkt: Routed) -> Decision:
        """decide_promise for a data packet, cached per (destination, promise, hops) like _next_hop: every
        packet of a flow carries the same promise at a given relay, so the lookahead runs once per flow."""
        hops = (pkt.flags & PROMISE_HOPS_MASK) >> PROMISE_HOPS_SHIFT
        key = (pkt.dst, pkt.watermark, hops)
        decision = self._promise_cache.get(key)
        if decision is None:
            decision = decide_promise(
                self.id,
                pkt.dst,
                exact=True,
                promise=pkt.watermark,
                promise_hops=hops,
                ttl=DEFAULT_TTL,  # the packet's own TTL is checked by the caller: the answer is cached
                neighbours=self.table.neighbours(),
                neighbours_of=self.table.neighbours_of if self.settings.lookahead else None,
            )
            self._promise_cache[key] = decision
        return decision

    def _on_routed(self, came_from: Link | None, pkt: Routed) -> None:
        if pkt.flags & FLAG_PROMISE:
            decision = self._promised_hop(pkt)
            if isinstance(decision, Forward) and decision.promise is not None:
                link = self.links.links.get(decision.next_hop)
                if pkt.ttl <= 0 or link is None:
                    self.count("drop: ttl expired" if pkt.ttl <= 0 else "drop: next hop vanished")
                    return
                flags = (pkt.flags & ~PROMISE_HOPS_MASK) | (decision.promise_hops << PROMISE_HOPS_SHIFT)
                if came_from is None and pkt.kind in DATA_KINDS and pkt.ttl == DEFAULT_TTL:
                    self._data_routes[pkt.dst] = (decision.next_hop, decision.promise, flags)
                self._pass_on(link, replace(pkt, flags=flags), pkt.ttl - 1, decision.promise)
                return
            if decision is DROP_PROMISE:
                # Our lists disagree with the previous hop's (a neighbour just left or joined): finish the
                # route under the strict rule. A packet switches once and never back, and each phase only
                # moves closer by its own measure, so the route still cannot loop.
                self.count("promise not kept: strict rule")
                pkt = replace(pkt, flags=pkt.flags & ~(FLAG_PROMISE | PROMISE_HOPS_MASK), watermark=FAR)
            elif isinstance(decision, Deliver):
                self._deliver(pkt)
                return
            else:
                pkt = replace(pkt, flags=pkt.flags & ~(FLAG_PROMISE | PROMISE_HOPS_MASK))
        exclude = pkt.src if pkt.flags & FLAG_JOIN else None
        own = ring_distance(self.id, pkt.dst)
        if exclude is not None and pkt.dst == self.id and pkt.src != self.id:
            own = FAR  # a FIND for a joiner whose ID equals ours: nobody nearer than us but the joiner
        if pkt.watermark != FAR and own >= pkt.watermark:
            self.count("drop: watermark")
            return
        nh = self._next_hop(pkt.dst, exclude)
        if nh is not None and ring_distance(nh, pkt.dst) >= own:
            nh = None
        if nh is None and came_from is None and own != 0 and self._stuck_at_origin(pkt):
            # We know a node nearer the destination than us but none of our links is nearer: we are a local
            # minimum of a ring still forming (a joining node has one link). The first hop may then go to the
            # neighbour nearest the target even if it is farther than we are; the watermark starts at FAR, so
            # from that hop on every hop is strictly closer again and the packet can come back at most once.
            nh = self._next_hop_any(pkt.dst, exclude)
            if nh is not None:
                self._pass_on(self.links.links[nh], pkt, pkt.ttl - 1, FAR)
                return
        # decide() over the one neighbour next_hop chose (cached per destination above) answers exactly as over
        # all of them: next_hop would pick the same neighbour again. The watermark was checked above.
        decision = decide(
            self.id,
            pkt.dst,
            exact=pkt.exact,
            watermark=FAR,
            ttl=pkt.ttl,
            neighbours=[nh] if nh is not None else [],
        )
        if isinstance(decision, Forward):
            link = self.links.links.get(decision.next_hop)
            if link is None:
                self.count("drop: next hop vanished")
                return
            if came_from is None and pkt.kind in DATA_KINDS and pkt.flags == FLAG_EXACT and pkt.ttl == DEFAULT_TTL:
                self._data_routes[pkt.dst] = (decision.next_hop, own, FLAG_EXACT)
            self._pass_on(link, pkt, pkt.ttl - 1, own)
        elif isinstance(decision, Deliver):
            self._deliver(pkt)
        elif isinstance(decision, NoRoute):
            self.count("no route")
            if pkt.kind != Kind.NO_ROUTE:
                self.send_routed(pkt.src, Kind.NO_ROUTE, encode_no_route(pkt.dst, pkt.kind))
            if came_from is None:
                self._deliver_no_route(pkt.dst, pkt.kind)
        elif isinstance(decision, Drop):
            self.count(f"drop: {decision.reason}")

    def _pass_on(self, link: Link, pkt: Routed, ttl: int, watermark: int) -> None:
        """Send a routed packet on to the next hop with a new TTL and watermark (as origin or as relay)."""
        if pkt.kind == Kind.DATA_GSO and not link.fragments_ok:
            header = ROUTED_HEADER.pack(LinkMsg.ROUTED, ttl, pkt.flags, pkt.src, pkt.dst, watermark, Kind.DATA)
            body = memoryview(pkt.body)
            self._send_unfragmented(link, header, body[:VNET_HDR_LEN], body[VNET_HDR_LEN:])
            return
        link.send(reroute(pkt, ttl, watermark))

    def _deliver(self, pkt: Routed) -> None:
        now = self.clock()
        kind = pkt.kind
        try:
            if kind in DATA_KINDS:
                self.deliver_data(pkt.body, kind)
            elif kind == Kind.LINK_REQUEST:
                contact = self.check_contact(pkt.body)
                if contact is not None and node_id_from_public_key(contact.public_key) == pkt.src:
                    self.table.learn([pkt.src])
                    self.links.connect(contact.public_key, contact.endpoint, contact)
            elif kind == Kind.FIND:
                self._on_find(pkt, now)
            elif kind == Kind.FOUND:
                self._on_found(pkt, now)
            elif kind == Kind.DHT_PUT:
                self.dht.on_put(pkt.body, now)
            elif kind == Kind.DHT_GET:
                self.dht.on_get(pkt.src, pkt.body, now)
            elif kind == Kind.DHT_VALUE:
                self.dht.on_value(pkt.body, now)
            elif kind == Kind.NO_ROUTE:
                dst, orig_kind = decode_no_route(pkt.body)
                self._deliver_no_route(dst, orig_kind)
        except DecodeError:
            self.count("drop: malformed routed body")

    def _deliver_no_route(self, dst: int, kind: int) -> None:
        if kind == Kind.DATA:
            # The node we resolved an address to is gone: forget it so the next packet looks it up again.
            self.dht.cache.evict_node(dst)

    # -- join and long links: FIND / FOUND -------------------------------------------------------------------
    def _find(self, target: int, slot: int | None, flags: int, via: int | None = None) -> None:
        self._find_seq = (self._find_seq + 1) & 0xFFFFFFFF
        self._finds[self._find_seq] = _Find(slot, self.clock())
        body = self._find_seq.to_bytes(4, "big") + self.contact().encode()
        self.send_routed(target, Kind.FIND, body, flags, via=via)

    def _on_find(self, pkt: Routed, now: float) -> None:
        if len(pkt.body) < 4:
            raise DecodeError("FIND without a request number")
        contact = self.check_contact(pkt.body[4:])
        if contact is None or node_id_from_public_key(contact.public_key) != pkt.src or pkt.src == self.id:
            return
        flags = 0
        if (
            pkt.flags & FLAG_LONG_LINK
            and not self.table.accepts_incoming_long()
            and Role.LONG_IN not in self.table.role(pkt.src)
        ):
            flags = FLAG_REFUSED
        if pkt.flags & FLAG_JOIN:
            # The joiner's ring place is next to us. It has a single link, so a reply routed to it would
            # fail; we call it back instead, and once linked we send it our neighbour list like any link.
            self.table.learn([pkt.src])
            self.links.connect(contact.public_key, contact.endpoint, contact)
            self._schedule(now)
            return
        ring = self.table.successors() + self.table.predecessors()
        body = pkt.body[:4] + bytes([flags]) + encode_found(self.contact(), ring)
        self.send_routed(pkt.src, Kind.FOUND, body)

    def _on_found(self, pkt: Routed, now: float) -> None:
        if len(pkt.body) < 5:
            raise DecodeError("FOUND too short")
        seq = int.from_bytes(pkt.body[:4], "big")
        flags = pkt.body[4]
        contact, ring = decode_found(pkt.body[5:])
        if (
            not verify(contact.public_key, contact.signed_part(self.room), contact.signature)
            or node_id_from_public_key(contact.public_key) != pkt.src
        ):
            self.count("drop: FOUND with a bad contact")
            return
        find = self._finds.pop(seq, None)
        if find is None or find.slot is None:
            return
        self.table.learn(ring)
        if flags & FLAG_REFUSED or pkt.src == self.id:
            self.maintenance.on_long_found(find.slot, None, now)
            return
        self.maintenance.on_long_found(find.slot, pkt.src, now)
        if pkt.src not in self.links.links:
            self.links.connect(contact.public_key, contact.endpoint, contact)
        self._schedule(now)  # the next tick tells the peer it is now one of our long links

    def _tick_finds(self, now: float) -> None:
        for seq, f in list(self._finds.items()):
            if f.slot is None and self.table.successors() and len(self.links.links) > 1:
                del self._finds[seq]  # joined: a node near our ring place called us back
            elif now - f.started > FIND_TIMEOUT:
                del self._finds[seq]
                if f.slot is not None:
                    self.maintenance.on_long_found(f.slot, None, now)
                elif self.links.links:
                    # Nobody called back: the FIND was lost. Try again through any link.
                    self._find(self.id, None, FLAG_JOIN, via=next(iter(self.links.links)))

    def host_unreachable(self, body: bytes, kind: Kind, now: float) -> None:
        """Tell our kernel that nobody owns the destination of this data body (rate-limited ICMP)."""
        packet = body[VNET_HDR_LEN:] if kind == Kind.DATA_GSO else body
        if self.vnic is None or self.tap is None or now - self._last_icmp < ICMP_INTERVAL:
            return
        if not icmp_error_allowed(packet):
            return
        self._last_icmp = now
        self._write_tap(self.vnic.to_tap(icmp_unreachable(packet, int(ipaddress.IPv4Address(self.address)))))

    # -- data path -----------------------------------------------------------------------------------------------
    # Per frame Python costs ~5 µs whatever its size (ARCHITECTURE.md), so this path reads the clock once per
    # batch, keys its caches by integers, and takes the routing decision from caches of decide()'s answers.
    def _on_tap_readable(self) -> None:
        assert self.tap is not None and self.vnic is not None
        tap, vnic = self.tap, self.vnic
        vnet = tap.vnet_hdr
        now = self.clock()
        for frame in tap.read_batch(TAP_BATCH):
            result = vnic.from_tap(memoryview(frame)[VNET_HDR_LEN:] if vnet else frame)
            if isinstance(result, Outbound):
                head = frame[:VNET_HDR_LEN] if vnet else b""
                if head and head != ZERO_VNET_HDR:
                    # Offload work left to the receiving kernel (segmentation, checksum): carry the header.
                    self._send_data(result.dst_ip, Kind.DATA_GSO, head, result.packet, now)
                else:
                    self._send_data(result.dst_ip, Kind.DATA, b"", result.packet, now)
            elif isinstance(result, Reply):
                self._write_tap(result.frame)

    def _send_data(self, dst_ip: int, kind: Kind, head: bytes, packet: Bytes, now: float) -> None:
        address = self._address_text.get(dst_ip)
        if address is None:
            if len(self._address_text) >= ADDRESS_TEXT_LIMIT:
                self._address_text.clear()
            address = self._address_text[dst_ip] = str(ipaddress.IPv4Address(dst_ip))
        entry = self.dht.cache.get(address, now)
        if entry is not None:
            route = self._data_routes.get(entry.node_id)
            if route is not None:
                link = self.links.links.get(route[0])
                if link is not None:
                    # Exactly what _on_routed sends for this packet at its origin (_pass_on with TTL - 1).
                    if kind == Kind.DATA_GSO and not link.fragments_ok:
                        header = ROUTED_HEADER.pack(
                            LinkMsg.ROUTED, DEFAULT_TTL - 1, route[2], self.id, entry.node_id, route[1], Kind.DATA
                        )
                        self._send_unfragmented(link, header, head, packet)
                        return
                    header = ROUTED_HEADER.pack(
                        LinkMsg.ROUTED, DEFAULT_TTL - 1, route[2], self.id, entry.node_id, route[1], kind
                    )
                    link.send(b"".join((header, head, packet)))
                    return
        self.dht.resolve_and_send(address, head + bytes(packet), kind)

    def _send_unfragmented(self, link: Link, header: bytes, head: Bytes, packet: Bytes) -> None:
        """A DATA_GSO body (offload header `head`, IPv4 `packet`) for a link not known to carry IP fragments,
        as DATA packets that each fit one datagram: a super-frame cut into its TCP segments, a checksum-only
        frame with its checksum completed. `header`: the routed header to put in front, kind DATA."""
        try:
            offload = parse_vnet_header(head, ETH_HEADER_LEN + len(packet))
            packets = segment_tcp4(packet, offload) if offload.is_gso else [complete_checksum(packet, offload)]
        except FrameError:
            self.count(SEGMENT_DROP)
            return
        for p in packets:
            link.send(header + p)

    def _write_tap(self, frame: bytes) -> None:
        """A frame we made ourselves (ARP reply, ICMP error): no offload work for the kernel to do."""
        assert self.tap is not None
        if self.tap.vnet_hdr:
            self.tap.write_parts([ZERO_VNET_HDR, frame])
        else:
            self.tap.write(frame)

    def deliver_data(self, body: Bytes, kind: int = Kind.DATA) -> None:
        tap, vnic = self.tap, self.vnic
        if tap is None or vnic is None:
            self.count("data delivered without a TAP")
            return
        try:
            if kind == Kind.DATA_GSO:
                eth, packet = vnic.to_tap_parts(memoryview(body)[VNET_HDR_LEN:])
                offload = parse_vnet_header(body, len(eth) + len(packet))
                if tap.vnet_hdr:
                    tap.write_parts([body[:VNET_HDR_LEN], eth, packet])
                elif offload.is_gso:
                    # The TAP cannot take a super-frame: hand it the segments its kernel would have cut.
                    try:
                        segments = segment_tcp4(packet, offload)
                    except FrameError:
                        self.count(SEGMENT_DROP)
                        return
                    for segment in segments:
                        tap.write_parts([eth, segment])
                else:
                    tap.write_parts([eth, complete_checksum(packet, offload)])
                return
            eth, packet = vnic.to_tap_parts(body)
        except FrameError:
            self.count("drop: data not for our address")
            return
        tap.write_parts([ZERO_VNET_HDR, eth, packet] if tap.vnet_hdr else [eth, packet])

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        links = []
        ring = self.table.ring_peers()
        long_out = self.maintenance.long_link_peers()
        for link in sorted(self.links.links.values(), key=lambda lk: lk.peer_id):
            roles = [
                name
                for name, on in (
                    ("ring", link.peer_id in ring),
                    ("long_out", link.peer_id in long_out),
                    ("long_in", Role.LONG_IN in self.table.role(link.peer_id)),
                )
                if on
            ]
            links.append(
                {
                    "peer_id": format_id(link.peer_id),
                    "peer_address": link.contact.address if link.contact else None,
                    "endpoint": link.describe_endpoint(),
                    "relay": format_id(link.relay) if link.relay is not None else None,
                    "rtt_ms": round(link.rtt * 1000, 3) if link.rtt is not None else None,
                    "tx_bytes": link.tx_bytes,
                    "rx_bytes": link.rx_bytes,
                    "roles": roles,
                }
            )
        return {
            "node_id": format_id(self.id),
            "address": f"{self.address}/{self.network.prefixlen}",
            "room": self.room,
            "endpoint": f"{self.underlay.local_endpoint[0]}:{self.underlay.local_endpoint[1]}",
            "links": links,
            "successors": [format_id(i) for i in self.table.successors()],
            "predecessors": [format_id(i) for i in self.table.predecessors()],
            "dht": {"stored": len(self.dht.store), "cached": len(self.dht.cache)},
            "data_in": {
                "packets": self.data_hops[0],
                "mean_hops": round(self.data_hops[1] / max(1, self.data_hops[0]), 2),
            },
            "counters": dict(sorted({**self.counters, **self.links.counters}.items())),
            "anchor": bool(getattr(self.bootstrap, "is_anchor", False)),
        }
