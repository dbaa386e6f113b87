"""The node: joins the pure cores (ring, maintenance, forwarding, DHT) to links, the virtual NIC and the XMPP
bootstrap, and drives them from one timer.

Life of a node: log in to XMPP and swap signed contacts with the room's anchors; link to one of them; route a
FIND toward our own ID so the nodes around our ring place learn of us and we of them (overlay/finds.py); publish
our address record (overlay/dht/service.py); from then on every new link is signalled through the overlay, and
XMPP is left unless we are an anchor (overlay/membership.py). Packets from the TAP are resolved through the DHT
(cached) and routed hop by hop, each hop strictly closer to the destination ID (overlay/datapath.py,
overlay/router.py).

This module owns what ties those together: the node's contact, its life cycle and its tick, and the members the
services use (overlay/port.py). Its parts each have a module: when the tick runs (overlay/ticker.py), link events
and maintenance's actions (overlay/linkevents.py), messages on a link (overlay/linkmsgs.py), `status()`
(overlay/status.py).

One clock: `now` is wall-clock seconds (records and handshakes cross machines); cores are handed it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from overlay.beacon import Beacon
from overlay.datapath import DataPath
from overlay.dht.service import AddressService
from overlay.fastpath import FastPath
from overlay.finds import Finder
from overlay.graph import GraphService, NodeView, own_view
from overlay.identity import Identity, verify
from overlay.link import Link
from overlay.linkevents import LinkEvents
from overlay.linkmsgs import LinkMessages
from overlay.links import LinkCallbacks, LinkManager, Underlay
from overlay.membership import Membership
from overlay.metrics import Histogram
from overlay.ondemand import OnDemand
from overlay.remembered import MAX_REMEMBERED, Remembered
from overlay.router import Router
from overlay.routing.maintenance import Maintenance
from overlay.routing.ring import RingParams, RingTable
from overlay.sealing import Sealing
from overlay.signalling import Signalling
from overlay.status import node_status
from overlay.tap.frames import Bytes
from overlay.ticker import IDLE_TIMER_MAX, TIMER_MAX, Ticker
from overlay.transport.paths import IceSettings, UdpPath
from overlay.transport.underlay import UdpUnderlay
from overlay.trust.issuer import Issuer
from overlay.trust.members import GroupTrust
from overlay.trust.service import TrustService
from overlay.upgrades import PathUpgrades
from overlay.wire import FLAG_EXACT, Contact, DecodeError, Kind, Routed, decode_contact

if TYPE_CHECKING:
    from overlay.transport.ice import IceAgent


@dataclass
class NodeSettings:
    """What a node needs beyond its key: the group, its virtual address, its topology parameters."""

    room: str
    address: str  # virtual IPv4 with prefix, "10.254.0.1/16"
    address6: str | None = None  # virtual IPv6 with prefix, "fd00:1::5/64" (configvalues.resolve_address6); None: none
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
        self.ticker = Ticker(clock, self.tick, self.maintenance.next_deadline)
        self.events = LinkEvents(self)  # link events and maintenance's actions (overlay/linkevents.py)
        self.messages = LinkMessages(self)  # what comes on a link (overlay/linkmsgs.py)
        self.links = LinkManager(
            identity,
            underlay,
            LinkCallbacks(
                self.events.on_link_up,
                self.events.on_link_down,
                self.events.on_attempt_failed,
                self.messages.on_message,
                self.events.relay_candidates,
                # A link attempt started outside a tick (an XMPP hello, a signal): its retries are the tick's.
                lambda: self.ticker.wake(TIMER_MAX),
                lambda link, header, payload: self.sealing.on_link_packet(link, header, payload),
                self.events.on_peer_renewed,
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
        self.router.join_unfit = self.messages.join_unfit
        self.ice: IceAgent | None = None
        if settings.ice is not None:
            # Imported here: aioice (~4 MB resident) loads only in a node that uses ICE (overlay/transport/paths.py).
            from overlay.transport.ice import IceAgent

            self.ice = IceAgent(settings.ice, underlay, self.links.on_packet)
            self.ice.on_address_change = self.events.on_address_change
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
        if settings.on_demand_rate > 0:
            # Relayed data wakes an idle node's tick within a second, so the rate is measured from its start.
            self.router.relaying = lambda: self.ticker.wake(TIMER_MAX)
        self.upgrades = PathUpgrades()
        self.router.on_no_route = self.events.on_no_route
        self.graph = GraphService(self, self._graph_view)
        self.router.on_sent = self.events.on_sent
        for kind, handler in (
            (Kind.DATA, self._deliver_data),
            (Kind.DATA_GSO, self._deliver_data),
            (Kind.LINK_REQUEST, self.events.on_link_request),
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
        self._loop: asyncio.AbstractEventLoop | None = None
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

    def pass_on(self, packet: Routed, dst: int, flags: int) -> None:
        self.router.pass_on(packet, dst, flags)

    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None:
        self.sealing.send_data(node_id, kind, body)

    def deliver_data(self, body: Bytes, kind: int = Kind.DATA) -> None:
        self.datapath.deliver(body, kind)

    def host_unreachable(self, body: bytes, kind: Kind, now: float) -> None:
        self.datapath.host_unreachable(body, kind, now)

    def wake(self, within: float = 0.0) -> None:
        self.ticker.wake(within)

    def link_to(self, contact: Contact, via: int | None = None) -> None:
        self.events.link_to(contact, via)

    def flood_beacon(self, seq: int, came_from: int | None) -> None:
        self.messages.flood_beacon(seq, came_from)

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
        self.underlay.on_unreachable = self.events.on_unreachable
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
        self.ticker.start(self._loop)
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

    @property
    def stopped(self) -> bool:
        return self.ticker.stopped

    async def stop(self) -> None:
        if self.ticker.stopped:
            return
        self.ticker.stop()
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

    # -- the tick (overlay/ticker.py says when) -------------------------------------------------------------
    def tick(self) -> None:
        if self.fast is not None:
            self.fast.sync()
        now = self.clock()
        deadline = self.links.tick(now)
        for peer, link in self.links.links.items():
            if link.busy:
                link.busy = False
                self.maintenance.on_busy(peer, now)
        for action in self.maintenance.tick(now):
            self.events.act(action, now)
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
        self.datapath.probes.tick(now)
        deadline = min(deadline, self.datapath.probes.next_due())
        self.events.tick_on_demand(now)
        self.events.tick_upgrades(now)
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
        self.ticker.rest(min(deadline, now + (TIMER_MAX if busy or self.first_link_at == 0 else IDLE_TIMER_MAX)))

    # -- routed packets delivered here -----------------------------------------------------------------------
    def _deliver_data(self, pkt: Routed) -> None:
        self.datapath.deliver_from(pkt.src, pkt.body, pkt.kind)

    def _on_cert(self, pkt: Routed) -> None:
        if self.trust_service is None:
            self.count("drop: certificate message in a group without certificates")
        else:
            self.trust_service.on_cert(pkt)

    def heard(self, link: Link) -> float:
        """A message came on `link` (maintenance's liveness); returns the time."""
        now = self.clock()
        self.maintenance.on_rx(link.peer_id, now)
        if link.peer_id == self.maintenance.due_peer:
            self.ticker.heard_from_watched()
        return now

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return node_status(self)
