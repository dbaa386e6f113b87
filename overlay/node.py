"""The node: joins the pure cores (ring, maintenance, forwarding, DHT) to links, the virtual NIC and the XMPP
bootstrap, and drives them from one timer.

Life of a node: log in to XMPP and swap signed contacts with the room's anchors; link to one of them; route a
FIND toward our own ID so the nodes around our ring place learn of us and we of them (overlay/finds.py); publish
our address record (overlay/dht/service.py); from then on every new link is signalled through the overlay, and
XMPP is left unless we are an anchor (overlay/membership.py). Packets from the TAP are resolved through the DHT
(cached) and routed hop by hop, each hop strictly closer to the destination ID (overlay/datapath.py,
overlay/router.py).

This module owns what ties those together: the node's contact, life cycle, the timer, link events and the
dispatch of link messages, and `status()`.

One clock: `now` is wall-clock seconds (records and handshakes cross machines); cores are handed it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from overlay._fast import GCM
from overlay.beacon import Beacon
from overlay.datapath import DataPath
from overlay.dht.service import AddressService
from overlay.fastpath import FastPath
from overlay.finds import Finder
from overlay.graph import GraphService, NodeView, own_view
from overlay.identity import Identity, verify
from overlay.ids import format_id, node_id_from_public_key
from overlay.links import Link, LinkCallbacks, LinkManager, Underlay
from overlay.membership import Membership
from overlay.metrics import Histogram
from overlay.ondemand import OnDemand, Open
from overlay.remembered import MAX_REMEMBERED, Remembered
from overlay.router import DATA_KINDS, Router
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
from overlay.sealing import Sealing
from overlay.signalling import Signalling
from overlay.tap.frames import Bytes
from overlay.transport.paths import IceSettings, UdpPath
from overlay.transport.underlay import UdpUnderlay
from overlay.trust.issuer import Issuer
from overlay.trust.members import GroupTrust
from overlay.trust.service import TrustService
from overlay.upgrades import TunnelUpgrades
from overlay.wire import (
    FLAG_EXACT,
    FLAG_JOIN,
    FLAG_LONG_LINK,
    FLAG_PROMISE,
    FLAG_QUIET,
    HELLO_TUNNEL,
    ROUTED_HEADER,
    Contact,
    DecodeError,
    Kind,
    LinkMsg,
    Routed,
    decode_beacon,
    decode_contact,
    decode_link_request,
    decode_neighbours,
    decode_probe,
    decode_relay,
    decode_routed,
    decode_suspect,
    decode_token,
    encode_beacon,
    encode_link_request,
    encode_neighbours,
    encode_ping,
    encode_suspect,
)

if TYPE_CHECKING:
    from overlay.transport.ice import IceAgent

log = logging.getLogger(__name__)

TIMER_MAX = 1.0  # the longest the node sleeps between ticks while something is under way (lookups retry at 1 s)
# ... and when nothing is: maintenance says when it next has work. The longest gossip round (7.5-12.5 s), so an
# idle node wakes for its rounds only (DHT checks, STUN refreshes and beacons ride on them).
IDLE_TIMER_MAX = 12.5
# asyncio runs a timer up to its clock resolution early (BaseEventLoop._clock_resolution): a tick woken exactly at
# a deadline could find it not yet passed and sleep again for 20 ms (a quarter of an idle node's ticks).
TIMER_SLACK = 0.002
PEER_CLOSED = "peer closed the link"
ACK = bytes([LinkMsg.ACK])


@dataclass
class NodeSettings:
    """What a node needs beyond its key: the group, its virtual address, its topology parameters."""

    room: str
    address: str  # virtual IPv4 with prefix, "10.254.0.1/16"
    address6: str | None = None  # virtual IPv6 with prefix, "fd00:1::5/64" (config.resolve_address6); None: none
    ring: RingParams = field(default_factory=RingParams)
    lookahead: bool = True
    promise: bool = True  # data packets follow the promise rule (docs/topology.md: 1.27x vs 1.42x shortest)
    stabilize_interval: float = 10.0  # overlay/routing/maintenance.py STABILIZE_INTERVAL
    ice: IceSettings | None = None  # links are set up with ICE (docs/nat-traversal.md); None: direct and tunnels
    anchors: int = 3  # members that stay in the XMPP room to answer joiners
    on_demand_rate: float = 65536.0  # bytes/s through relays that earns a pair a direct link (0: never)
    on_demand_idle: float = 60.0  # seconds an on-demand link may carry (almost) nothing before it goes


class Node:
    def __init__(
        self,
        identity: Identity,
        settings: NodeSettings,
        underlay: Underlay,
        *,
        bootstrap: Any = None,
        tap: Any = None,
        fast_path: bool = False,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        trust: GroupTrust | None = None,
        issuer: Issuer | None = None,
    ) -> None:
        self.identity = identity
        self.trust = trust
        self.id = identity.node_id
        self.settings = settings
        iface = ipaddress.IPv4Interface(settings.address)
        self.address = str(iface.ip)
        self.network = iface.network
        iface6 = ipaddress.IPv6Interface(settings.address6) if settings.address6 else None
        self.address6: str | None = str(iface6.ip) if iface6 else None
        self.network6 = iface6.network if iface6 else None
        self.room = settings.room
        self.underlay = underlay
        self.bootstrap = bootstrap
        self.clock = clock
        self.rng = rng or random.Random()
        self.counters: dict[str, int] = {}
        self.rtt_seconds = Histogram()  # link round trips (overlay/metrics.py)
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
                # A link attempt started outside a tick (an XMPP hello, a signal): its retries are the tick's.
                lambda: self.wake(TIMER_MAX),
                lambda link, header, payload: self.sealing.on_link_packet(link, header, payload),
            ),
            clock,
            credentials=trust,
        )
        self.links.setup.contact_source = self.contact
        self.router = Router(
            self.id, self.table, self.links, self.counters, lookahead=settings.lookahead, promise=settings.promise
        )
        self.datapath = DataPath(self.address, self.router, self.links, self.counters, clock, self.rng)
        self.finder = Finder(self, self.maintenance)
        self.signalling = Signalling(self, self.router.first_hop)
        self.beacon = Beacon()
        self.peer_beacons: dict[int, tuple[int, int]] = {}  # what each neighbour last said of its overlay
        self.router.join_unfit = self._join_unfit
        self.ice: IceAgent | None = None
        if settings.ice is not None:
            # Imported here: aioice (~4 MB resident) loads only in a node that uses ICE (overlay/transport/paths.py).
            from overlay.transport.ice import IceAgent

            self.ice = IceAgent(settings.ice, underlay, self.links.on_packet)
            self.ice.on_address_change = self._on_address_change
            self.links.setup.agent = self.ice
        self.dht = AddressService(self)
        self.datapath.dht = self.dht
        # Data for members we are not linked to is sealed end to end (overlay/sealing.py, overlay/e2e.py).
        self.sealing: Sealing = Sealing(self)
        self.e2e = self.sealing.e2e
        # The group's certificates (overlay/trust/): None in a group without them (then nothing is checked).
        self.trust_service: TrustService | None = None
        if trust is not None:
            self.trust_service = TrustService(self, trust, issuer)
            self.trust_service.purge_records = self.dht.store.purge
            self.trust_service.forget_node = self.sealing.forget
            self.datapath.source_of = self.trust_service.source_of
            self.dht.on_resolved = self.datapath.resolved
        self.on_demand = OnDemand(settings.on_demand_rate, settings.on_demand_idle)
        self.on_demand.relayed = self.router.relayed
        self.upgrades = TunnelUpgrades()
        self.router.on_no_route = self._on_no_route
        self.graph = GraphService(self, self._graph_view)
        self.router.on_sent = self._on_sent
        for kind, handler in (
            (Kind.DATA, self._deliver_data),
            (Kind.DATA_GSO, self._deliver_data),
            (Kind.LINK_REQUEST, self._on_link_request),
            (Kind.FIND, self.finder.on_find),
            (Kind.FOUND, self.finder.on_found),
            (Kind.DHT_PUT, self.dht.on_put),
            (Kind.DHT_GET, self.dht.on_get),
            (Kind.DHT_VALUE, self.dht.on_value),
            (Kind.DHT_VALUE6, self.dht.on_value),
            (Kind.SIGNAL, self.signalling.on_routed),
            (Kind.CERT, self._on_cert),
            (Kind.GRAPH_GET, self.graph.on_get),
            (Kind.GRAPH, self.graph.on_answer),
        ):
            self.router.handlers[kind] = handler
        self.tap: Any = None
        # The compiled data path (overlay/fastpath.py): asked for, with a TAP and a UDP socket, it starts with
        # the node; None otherwise (in-memory underlays, tests of the Python path).
        self.want_fast_path = fast_path
        self.fast: FastPath | None = None
        if tap is not None:
            self.attach_tap(tap)
        self.membership = Membership(self, bootstrap, anchors=settings.anchors) if bootstrap is not None else None
        self.first_link_at = 0.0
        self._timer_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Set by a tick whose timer waits only for a link's silence (maintenance.due_peer): hearing from that
        # peer moves the timer to the next deadline, up to `_tick_bound` (what the rest of the node needs).
        self._timer_for_silence = False
        self._tick_bound = 0.0
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

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    # -- what the services use (overlay/port.py) ---------------------------------------------------------------
    def send_routed(self, dst: int, kind: Kind, body: bytes, flags: int = FLAG_EXACT, via: int | None = None) -> None:
        self.router.send_routed(dst, kind, body, flags, via)

    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None:
        self.sealing.send_data(node_id, kind, body)

    def deliver_data(self, body: Bytes, kind: int = Kind.DATA) -> None:
        self.datapath.deliver(body, kind)

    def host_unreachable(self, body: bytes, kind: Kind, now: float) -> None:
        self.datapath.host_unreachable(body, kind, now)

    def wake(self, within: float = 0.0) -> None:
        now = self.clock()
        if self._timer is None or self._timer_at > now + within:
            self._schedule(now + within)
        else:
            self._timer_for_silence = False  # an earlier timer stays, and is no longer put off by gossip

    def link_to(self, contact: Contact, via: int | None = None) -> None:
        peer = node_id_from_public_key(contact.public_key)
        signal = self.signalling.route(peer, via)
        self.links.setup.connect(contact.public_key, contact.endpoint, contact, signal=signal)

    def _on_address_change(self) -> None:
        """Our host or server-reflexive addresses changed: the paths ICE chose through them may be dead. Restart
        ICE on each link that is not a tunnel (the link and its place in the ring stay meanwhile)."""
        for peer, link in list(self.links.links.items()):
            if link.relay is None and link.kind != "host":
                # The link's own path may be dead: signal through a neighbour linked to the peer too. The nearest
                # is often on our own LAN, behind the same NAT, and lost its paths out with ours: each offer sent
                # again goes through the next shared neighbour, then the overlay's own route.
                ways = [*(n for n in self._relay_candidates(peer) if n != peer), None]
                self.links.setup.restart(link.peer_key, self.signalling.route(peer, ways[0], then=ways[1:]))

    def _tick_upgrades(self, now: float) -> None:
        """ICE again, now and then, on the tunnel links this side upgrades (overlay/upgrades.py)."""
        if self.ice is None:
            return
        links = self.links.links
        tunnels = [peer for peer, link in links.items() if link.relay is not None and self.id < peer]
        for peer in self.upgrades.due(now, tunnels):
            self.links.setup.restart(links[peer].peer_key, self.signalling.route(peer), upgrade=True)

    # -- on-demand direct links (overlay/ondemand.py) -----------------------------------------------------------
    def _link_bytes(self, peer: int) -> int | None:
        link = self.links.links.get(peer)
        return None if link is None or link.relay is not None else link.tx_bytes + link.rx_bytes

    def _tick_on_demand(self, now: float) -> None:
        actions = self.on_demand.tick(now, self._link_bytes)
        self.router.relayed = self.on_demand.relayed
        for action in actions:
            if isinstance(action, Open):
                self.count("on-demand links asked for")
                log.info("much traffic for %s through relays: asking it for a direct link", format_id(action.peer))
                self.links.setup.offer(action.peer, self.signalling.route(action.peer), xmpp=False)
            else:
                self.count("on-demand links released")
                log.info("on-demand link to %s idle: released", format_id(action.peer))
                self.table.set_role(action.peer, Role.ON_DEMAND, False)
                self.wake()

    # -- the overlay's beacon (overlay/beacon.py) ---------------------------------------------------------------
    def flood_beacon(self, seq: int, came_from: int | None) -> None:
        msg = encode_beacon(self.beacon.overlay, seq)
        for peer, link in list(self.links.links.items()):
            if peer != came_from:
                link.send(msg)

    def _hear_beacon(self, peer: int, overlay: int, seq: int, now: float) -> None:
        self.peer_beacons[peer] = (overlay, seq)
        event = self.beacon.hear(overlay, seq, now)
        if event not in ("rejoin", "migrate"):
            return  # a newer beacon spreads with the gossip; only a move into another ring floods at once
        self.flood_beacon(self.beacon.seq, peer)
        if event in ("rejoin", "migrate"):
            log.info(
                "%s overlay %016x through %s",
                "moving into the older" if event == "migrate" else "cut off from the leader; joining again",
                overlay,
                format_id(peer),
            )
            self.count(f"overlay {event}s")
            self.finder.join(via=peer)
            self.router.forget_routes()
            self.maintenance.relink_now(now)

    def _join_unfit(self) -> set[int]:
        fit = self.beacon.fit_for_join
        return {p for p in self.links.links if not fit(*self.peer_beacons.get(p, (0, 0)))}

    @property
    def data_hops(self) -> list[int]:
        """Data packets that arrived over a link for us, and the hops they took."""
        return self.datapath.hops

    @property
    def vnic(self) -> Any:
        return self.datapath.vnic

    # -- life cycle --------------------------------------------------------------------------------------------
    def attach_tap(self, tap: Any) -> None:
        """The virtual NIC, once it exists (it is made after XMPP accepted us, so a refusal leaves none)."""
        self.tap = tap
        self.datapath.attach_tap(tap, self.network.prefixlen, self.address6, self.network6)

    async def start(self, remembered: list[Remembered] | None = None) -> None:
        """Start the node: sockets, timers, and (with a bootstrap) the XMPP login and room entry, which raise
        BootstrapError for a wrong password, a missing room or a non-member. Joining the overlay then goes on
        in the background (overlay/membership.py) and never ends the node.

        `remembered` (the XMPP server is unreachable): link to these members instead of entering the room; the
        first link up runs the join FIND as a link from the room would, and membership keeps trying XMPP."""
        self._loop = asyncio.get_running_loop()
        self.underlay.start(self.links.on_datagram)
        if self.ice is not None:
            self.underlay.on_stun = self.ice.on_stun
            self.ice.start(self.clock())
        if self.tap is not None:
            if self.want_fast_path and isinstance(self.underlay, UdpUnderlay):
                self.fast = FastPath(
                    self.links, self.datapath, self.router, self.underlay, self.heard, self.id, self.network.prefixlen
                )
                self.fast.start()
            else:
                self._loop.add_reader(self.tap.fileno(), self.datapath.on_tap_readable)
        self._schedule(self.clock())
        if remembered:
            for contact in remembered:
                if contact.public_key != self.identity.public_key:
                    self.links.connect(contact.public_key, contact.endpoint)
            if self.membership is not None:
                self.membership.start_without_room(len(remembered))
        elif self.membership is not None:
            await self.membership.start()
        if self.trust_service is not None and self.bootstrap is not None:
            self.trust_service.start_polling(self.bootstrap)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        self.links.close_all()
        if self.fast is not None:
            self.fast.stop()
        elif self.tap is not None and self._loop is not None:
            self._loop.remove_reader(self.tap.fileno())
        self.underlay.close()
        if self.ice is not None:
            await self.ice.close()
        if self.membership is not None:
            await self.membership.stop()
        if self.trust_service is not None:
            await self.trust_service.stop()

    def _graph_view(self) -> NodeView:
        ring = set(self.table.ring_peers())
        return own_view(
            self.address,
            ((p, lk.kind, self.table.role(p), p in ring) for p, lk in self.links.links.items()),
        )

    def remembered(self) -> list[Remembered]:
        """The members to come back through after a restart (overlay/remembered.py): ring neighbours first, then
        the rest of our links; the endpoint our packets went to, or for a tunnel or TURN path the one the member
        announced."""
        ring = set(self.table.ring_peers())
        out = []
        for link in sorted(self.links.links.values(), key=lambda lk: (lk.peer_id not in ring, lk.peer_id)):
            if isinstance(link.path, UdpPath) and link.path.kind != "relay":
                out.append(Remembered(link.peer_key, link.path.endpoint))
            elif link.contact is not None:
                out.append(Remembered(link.peer_key, link.contact.endpoint))
        return out[:MAX_REMEMBERED]

    # -- timers -------------------------------------------------------------------------------------------------
    def _schedule(self, when: float, *, for_silence: bool = False) -> None:
        if self._stopped or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_for_silence = for_silence
        now = self.clock()
        delay = min(IDLE_TIMER_MAX, max(0.02, when - now + TIMER_SLACK))
        self._timer = self._loop.call_later(delay, self._on_timer)
        self._timer_at = now + delay

    def _on_sent(self, link: Link, data: bool) -> None:
        """A routed packet went out on `link` (data: the first since our last tick). Watch it for an answer from
        now, not from our next tick (10 s away when idle): a route through a crashed node's link is then avoided
        within BUSY_PING + 1 s of the first packet lost on it, control packets (DHT lookups, finds) included."""
        now = self.clock()
        if data:
            self.maintenance.on_busy(link.peer_id, now)
        else:
            self.maintenance.on_sent(link.peer_id, now)
        self._wake_for_maintenance()

    def _wake_for_maintenance(self) -> None:
        """A link now needs watching sooner than the timer would wake (its ping, its suspect time)."""
        when = self.maintenance.next_deadline()
        if self._timer is None or self._timer_at > when:
            self._schedule(when, for_silence=True)

    def _on_timer(self) -> None:
        self._timer = None
        if self.fast is not None:
            self.fast.sync()
        now = self.clock()
        deadline = self.links.tick(now)
        for peer, link in self.links.links.items():
            if link.busy:
                link.busy = False
                self.maintenance.on_busy(peer, now)
        for action in self.maintenance.tick(now):
            self._act(action, now)
        suspects = self.maintenance.suspects(now)
        if suspects != self.router.avoid:
            self.router.avoid = suspects
            self.router.forget_routes()
        if self.ice is not None:
            self.ice.tick(now)
        self.dht.tick(now)
        deadline = min(deadline, self.e2e.tick(now))
        if self.trust_service is not None:
            deadline = min(deadline, self.trust_service.tick(now))
        if self.membership is not None:
            self.membership.tick(now)
        self.finder.tick(now)
        self.datapath.tick_probes(now)
        self._tick_on_demand(now)
        self._tick_upgrades(now)
        # Idle nodes tick less often: a hundred on one machine spend their CPU on ticks (bench/scale.py).
        deadline = min(deadline, self.dht.next_deadline(now))
        busy = (
            self.links.setup.attempts
            or not self.links.links  # joining, or alone: membership retries on its own clock
            or self.dht.pending()
            or self.finder.pending()
            or self.on_demand.active()
            or self.maintenance.watching(now)
        )
        self._tick_bound = min(deadline, now + (TIMER_MAX if busy or self.first_link_at == 0 else IDLE_TIMER_MAX))
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        silence = self.maintenance.next_deadline()
        self._schedule(min(self._tick_bound, silence), for_silence=silence < self._tick_bound)

    def _heard_from_due_peer(self) -> None:
        """The link our timer waits on has been heard from: sleep until the next deadline instead."""
        if self._timer_for_silence and self.maintenance.next_deadline() > self._timer_at + 1.0:
            self._schedule_tick()

    def _act(self, action: Any, now: float) -> None:
        if isinstance(action, Ping):
            link = self.links.links.get(action.peer)
            if link is not None:
                link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
                if self.ice is not None and not action.idle:
                    # A busy or ring link silent for a ping interval (gossip keeps those busier than that):
                    # check at once whether our addresses changed rather than at the next periodic STUN round.
                    # Idle links are pinged on a slow beat as a matter of course: no reason to ask.
                    self.ice.refresh_soon(now)
        elif isinstance(action, SendNeighbours):
            msg = encode_neighbours(list(action.neighbours), self.beacon.overlay, max(0, self.beacon.seq))
            for peer in action.peers:
                link = self.links.links.get(peer)
                if link is not None:
                    link.send(msg)
        elif isinstance(action, OpenLink):
            # Signal through the overlay: the peer calls us back (direct, ICE, tunnel), its signals coming to us
            # through our first hop when the ring cannot route to us yet.
            body = encode_link_request(self.contact(), self.router.first_hop(action.peer))
            self.send_routed(action.peer, Kind.LINK_REQUEST, body, FLAG_EXACT)
        elif isinstance(action, FindLong):
            self.finder.find(action.target, action.slot, FLAG_LONG_LINK)
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
        self.router.forget_routes()
        link.send(encode_ping(LinkMsg.PING, int(now * 1e6)))
        self.datapath.probe(link, now)
        if not self.first_link.is_set():
            self.first_link.set()
            self.first_link_at = now
            self.finder.join(via=link.peer_id)
        self.dht.hand_over(link.peer_id)
        if self.trust_service is not None:
            self.trust_service.on_link_up(link)
        if link.relay is None and self.on_demand.linked(link.peer_id, link.tx_bytes + link.rx_bytes):
            self.table.set_role(link.peer_id, Role.ON_DEMAND)
            self.count("on-demand switches")
            log.info("on-demand link to %s up (%s): traffic moves to it", format_id(link.peer_id), link.kind)
        self._schedule(now)

    def _send_hello(self, link: Link, use: int) -> None:
        """Our contact, what we use the link for (maintenance USE_* flags: the peer keeps a link either end
        uses), and that we take TUNNEL packets."""
        link.send(bytes([LinkMsg.HELLO, use | HELLO_TUNNEL]) + self.contact().encode())

    def _on_link_down(self, link: Link, reason: str) -> None:
        now = self.clock()
        was_ring = link.peer_id in self.table.successors() or link.peer_id in self.table.predecessors()
        self.table.remove_link(link.peer_id)
        self.peer_beacons.pop(link.peer_id, None)
        self.datapath.forget_link(link.peer_id)
        gone = reason in (PEER_CLOSED, DEAD_REASON)
        self.maintenance.on_link_down(link.peer_id, now, dead=gone)
        if reason == DEAD_REASON:
            msg = encode_suspect(link.peer_id)
            for other in list(self.links.links.values()):
                other.send(msg)
        if gone:
            self.dht.cache.evict_node(link.peer_id)
            self.dht.on_neighbour_lost(link.peer_id, was_ring, now)
        self.router.forget_routes()
        self._schedule(now)

    def _on_attempt_failed(self, peer: int) -> None:
        self.maintenance.on_attempt_failed(peer, self.clock())

    def _on_link_request(self, pkt: Routed) -> None:
        contact, via = decode_link_request(pkt.body)
        if node_id_from_public_key(contact.public_key) != pkt.src:
            return
        if not verify(contact.public_key, contact.signed_part(self.room), contact.signature):
            self.count("drop: contact with a bad signature")
            return
        if pkt.src in self.links.links:
            # The peer asks for a link we think we have: its end is gone (it closed the link or restarted and our
            # copy of the news was lost), or the request crossed our own. Check ours now, as a busy link, instead
            # of waiting out the keepalive; once it is dead, the peer's next request is answered.
            self.maintenance.suspect(pkt.src, self.clock())
            self._schedule(self.clock())
            return
        self.table.learn([pkt.src])
        self.link_to(contact, via if via != self.id else None)

    # -- routed packets delivered here -----------------------------------------------------------------------
    def _deliver_data(self, pkt: Routed) -> None:
        self.datapath.deliver_from(pkt.src, pkt.body, pkt.kind)

    def _on_cert(self, pkt: Routed) -> None:
        if self.trust_service is None:
            self.count("drop: certificate message in a group without certificates")
        else:
            self.trust_service.on_cert(pkt)

    def _on_no_route(self, dst: int, kind: int) -> None:
        if kind == Kind.DATA:
            # The node we resolved an address to is gone: forget it so the next packet looks it up again.
            self.dht.cache.evict_node(dst)
        elif kind == Kind.SIGNAL:
            self.links.setup.signal_lost(dst)

    # -- link messages -------------------------------------------------------------------------------------------
    def heard(self, link: Link) -> float:
        """A message came on `link` (maintenance's liveness); returns the time."""
        now = self.clock()
        self.maintenance.on_rx(link.peer_id, now)
        if link.peer_id == self.maintenance.due_peer:
            self._heard_from_due_peer()
        return now

    def _on_message(self, link: Link, msg: bytes) -> None:
        kind = msg[0] if msg else 0
        now = self.heard(link)
        if kind == LinkMsg.ROUTED and len(msg) >= ROUTED_HEADER.size and msg[ROUTED_HEADER.size - 1] in DATA_KINDS:
            _, ttl, flags, _, dst, watermark, data_kind = ROUTED_HEADER.unpack_from(msg)
            if dst == self.id and (watermark != 0 or flags & FLAG_PROMISE) and not flags & FLAG_JOIN:
                # What decide() and decide_promise() answer for a packet at its exact destination (distance 0,
                # below any watermark but 0; promises end here): deliver, without decoding it into a Routed.
                self.datapath.deliver_routed(msg, ttl, data_kind)
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
                self.router.on_routed(link, routed)
            elif kind == LinkMsg.PING:
                link.send(encode_ping(LinkMsg.PONG, decode_token(msg)))
            elif kind == LinkMsg.PONG:
                sent = decode_token(msg) / 1e6
                if 0 <= now - sent < 60:
                    link.rtt = now - sent
                    self.rtt_seconds.observe(link.rtt)
            elif kind == LinkMsg.NEIGHBOURS:
                ids, overlay, seq = decode_neighbours(msg)
                if self.maintenance.on_neighbours(link.peer_id, ids, now):
                    self.router.forget_routes()  # lookahead may choose differently now
                    self.wake(TIMER_MAX)  # a candidate to link to may be new: an idle timer waits up to 12.5 s
                self._hear_beacon(link.peer_id, overlay, seq, now)
            elif kind == LinkMsg.SUSPECT:
                self.maintenance.suspect(decode_suspect(msg), now)
                self._wake_for_maintenance()
            elif kind == LinkMsg.ACK:
                pass  # its arrival is the answer (maintenance.on_rx above)
            elif kind == LinkMsg.BEACON:
                self._hear_beacon(link.peer_id, *decode_beacon(msg), now)
            elif kind == LinkMsg.RELAY:
                peer, packet = decode_relay(msg)
                onward = self.links.links.get(peer)
                if onward is None or onward.relay is not None:
                    self.count("drop: relay target not a direct link")
                else:
                    onward.send_relay(LinkMsg.RELAYED, link.peer_id, packet)
            elif kind == LinkMsg.RELAYED:
                peer, packet = decode_relay(msg)
                self.links.on_packet(packet, link.peer_id)
            elif kind == LinkMsg.HELLO:
                if len(msg) < 2:
                    raise DecodeError("HELLO without flags")
                contact = self.check_contact(msg[2:])
                if contact is not None and contact.public_key == link.peer_key:
                    link.contact = contact
                    self.maintenance.on_peer_use(link.peer_id, msg[1] & ~HELLO_TUNNEL)
                    tunnels_ok = bool(msg[1] & HELLO_TUNNEL)
                    if link.tunnels_ok != tunnels_ok:
                        link.tunnels_ok = tunnels_ok
                        self.links.on_change(link.peer_id)
            elif kind == LinkMsg.REPLICATE:
                self.dht.on_replica(msg[1:], now)
            elif kind == LinkMsg.PROBE:
                link.send(encode_ping(LinkMsg.PROBE_ACK, decode_probe(msg)))
            elif kind == LinkMsg.PROBE_ACK:
                self.datapath.on_probe_ack(link, decode_token(msg))
            elif kind == LinkMsg.ANCHOR:
                if self.membership is not None and not self.membership.on_recruited(now):
                    self.count("anchor recruits refused")
                    link.send(bytes([LinkMsg.ANCHOR_REFUSED]))
            elif kind == LinkMsg.ANCHOR_REFUSED:
                if self.membership is not None:
                    self.membership.on_refused(link.peer_id, now)
            elif kind == LinkMsg.CLOSE:
                self.links.close(link.peer_id, PEER_CLOSED, notify=False)
            elif kind == LinkMsg.REVOKE:
                if self.trust_service is not None:
                    self.trust_service.on_revoke(link, msg[1:])
            else:
                self.count("drop: unknown link message")
        except DecodeError:
            self.count("drop: malformed link message")

    def _fast_counters(self) -> dict[str, int]:
        return self.fast.counters() if self.fast is not None else {}

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.fast is not None:
            self.fast.sync()
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
                    ("on_demand", bool(self.table.role(link.peer_id) & (Role.ON_DEMAND | Role.PEER_ON_DEMAND))),
                )
                if on
            ]
            links.append(
                {
                    "peer_id": format_id(link.peer_id),
                    "peer_address": link.contact.address if link.contact else None,
                    "endpoint": link.describe_endpoint(),
                    "relay": format_id(link.relay) if link.relay is not None else None,
                    "kind": link.kind,
                    "rtt_ms": round(link.rtt * 1000, 3) if link.rtt is not None else None,
                    "tx_bytes": link.tx_bytes,
                    "rx_bytes": link.rx_bytes,
                    "roles": roles,
                }
            )
        hops = self.datapath.hops
        ice: dict[str, Any] = {"enabled": self.ice is not None}
        if self.ice is not None:
            ice["counters"] = dict(sorted(self.ice.counters.items()))
            ice["turn"] = [
                {
                    "server": a.server.describe(),
                    "relayed": f"{a.relayed[0]}:{a.relayed[1]}" if a.relayed else None,
                    "counters": dict(sorted(a.counters.items())),
                }
                for a in self.ice.allocations
            ]
            ice["candidates"] = [c.to_sdp() for c in self.ice.host_candidates() + self.ice.srflx_candidates()]
        return {
            "node_id": format_id(self.id),
            "address": f"{self.address}/{self.network.prefixlen}",
            "address6": f"{self.address6}/{self.network6.prefixlen}" if self.network6 else None,
            "room": self.room,
            "endpoint": f"{self.underlay.local_endpoint[0]}:{self.underlay.local_endpoint[1]}",
            "cipher": f"AES-256-GCM, {GCM}",
            "links": links,
            "successors": [format_id(i) for i in self.table.successors()],
            "predecessors": [format_id(i) for i in self.table.predecessors()],
            "dht": {"stored": len(self.dht.store), "cached": len(self.dht.cache), "held": self.dht.held()},
            "data_in": {"packets": hops[0], "mean_hops": round(hops[1] / max(1, hops[0]), 2)},
            "counters": dict(sorted({**self.counters, **self.links.counters, **self._fast_counters()}.items())),
            "anchor": bool(getattr(self.bootstrap, "is_anchor", False)),
            "overlay": {
                "id": f"{self.beacon.overlay:016x}",
                "beacon": self.beacon.seq,
                "beacon_age_s": round(self.clock() - self.beacon.heard, 1) if self.beacon.overlay else None,
            },
            "membership": self.membership.status() if self.membership is not None else None,
            "ice": ice,
            "e2e": self.e2e.status(),
            "trust": self.trust_service.status() if self.trust_service is not None else None,
        }
