"""The router: originates, forwards and delivers routed packets, each hop strictly closer to the destination.

It owns the forwarding caches and applies the pure decisions of `overlay/routing/forwarding.py` to the node's
links. Control traffic (FIND, DHT, signalling) follows the strict watermark rule; data follows the promise
rule when the node is configured for it (docs/topology.md: 1.28x the shortest path instead of 1.42x). A
packet delivered here goes to the handler registered for its kind.

Per frame Python costs ~5 µs whatever its size (ARCHITECTURE.md), so data routes are cached per destination
and a data packet from our own TAP skips building a `Routed` (`data_routes`, read by overlay/datapath.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from overlay.ids import FAR, ring_distance
from overlay.link import Link
from overlay.links import LinkManager
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
from overlay.routing.ring import RingTable
from overlay.superframes import send_unfragmented
from overlay.tap.frames import VNET_HDR_LEN
from overlay.wire import (
    FLAG_EXACT,
    FLAG_JOIN,
    FLAG_PROMISE,
    FLAG_QUIET,
    PROMISE_HOPS_MASK,
    PROMISE_HOPS_SHIFT,
    ROUTED_HEADER,
    DecodeError,
    Kind,
    LinkMsg,
    Routed,
    decode_no_route,
    encode_no_route,
    reroute,
)

DATA_KINDS = (Kind.DATA, Kind.DATA_GSO, Kind.SEALED)
# A sealed body this big is a TCP super-frame (jumbo frames are at most 9,000 bytes): a relay cannot cut it, so
# on a link that does not pass IP fragments it is dropped and its origin told to cut them (overlay/e2e.py).
SEALED_SUPERFRAME = 9216
Handler = Callable[[Routed], None]


class Router:
    def __init__(
        self,
        node_id: int,
        table: RingTable,
        links: LinkManager,
        counters: dict[str, int],
        *,
        lookahead: bool = True,
        promise: bool = True,
    ) -> None:
        self.id = node_id
        self.table = table
        self.links = links
        self.counters = counters
        self.lookahead = lookahead
        self.promise = promise
        self.handlers: dict[int, Handler] = {Kind.NO_ROUTE: self._on_no_route_report}
        # Called with (destination, kind) when a packet we sent cannot reach its exact destination.
        self.on_no_route: Callable[[int, int], None] = lambda dst, kind: None
        # Called with a link a routed packet went out on (data: only the first since the node's last tick):
        # the node watches the link for an answer (maintenance's awaiting) from then on.
        self.on_sent: Callable[[Link, bool], None] = lambda link, data: None
        # Called with (origin, destination) when a sealed super-frame cannot cross the next link.
        self.on_too_big: Callable[[int, int], None] = lambda origin, dst: None
        # Links that carried data and have been silent since (maintenance's suspects): routes avoid them until
        # they answer or are declared dead.
        self.avoid: frozenset[int] = frozenset()
        # Neighbours a join must not be routed through: not in our overlay, or cut off from its leader
        # (overlay/beacon.py), so a join lands in the main ring.
        self.join_unfit: Callable[[], set[int]] = set
        self._route_cache: dict[int, int | None] = {}
        # Destination node -> (next hop, watermark, flags): what _on_routed sent for a DATA packet we
        # originated; forgotten with the other caches whenever links or neighbour lists change.
        self.data_routes: dict[int, tuple[int, int, int]] = {}
        # Told whenever the caches above are forgotten (the compiled data path's flows go with them).
        self.routes_changed: Callable[[], None] = lambda: None
        self._promise_cache: dict[tuple[int, int, int], Decision] = {}
        # Bytes of data we originate that leave through another member, per destination (overlay/ondemand.py);
        # the data path counts its fast-path packets into the same dict.
        self.relayed: dict[int, int] = {}
        # Told when data for a destination first leaves through another member since the last tick: rates are
        # measured per tick, and an idle node's next tick may be 12.5 s away (overlay/ticker.py).
        self.relaying: Callable[[], None] = lambda: None

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def count_relayed(self, dst: int, nbytes: int) -> None:
        sent = self.relayed.get(dst)
        if sent is None:
            sent = 0
            self.relaying()
        self.relayed[dst] = sent + nbytes

    def forget_routes(self) -> None:
        self.count("routes: recomputed after a change")
        self._route_cache.clear()
        self._promise_cache.clear()
        self.data_routes.clear()
        self.routes_changed()

    # -- originating -------------------------------------------------------------------------------------------
    def send_data(self, node_id: int, kind: Kind, body: bytes) -> None:
        """Originate a data packet (DATA or DATA_GSO) for the member with this node ID."""
        flags = FLAG_EXACT | (FLAG_PROMISE if self.promise else 0)
        self.send_routed(node_id, kind, body, flags)

    def send_routed(self, dst: int, kind: Kind, body: bytes, flags: int = FLAG_EXACT, via: int | None = None) -> None:
        """Originate a routed packet. `via`: hand it to this neighbour whatever the table says (the join)."""
        packet = Routed(DEFAULT_TTL, flags, self.id, dst, FAR, kind, body)
        if via is not None:
            link = self.links.links.get(via)
            if link is not None:
                link.send(packet.encode())
            return
        self.on_routed(None, packet)

    def pass_on(self, packet: Routed, dst: int, flags: int) -> None:
        """A received packet sent on to `dst` as if `packet.src` had sent it there: the answer goes to the source."""
        self.on_routed(None, Routed(DEFAULT_TTL, flags, packet.src, dst, FAR, packet.kind, packet.body))

    def data_route(self, dst: int) -> tuple[int, int, int] | None:
        """(next hop, watermark, flags) of the data this node originates for `dst`, as on_routed sends it, and
        cached in data_routes; None when on_routed would do anything but send it to a neighbour by the rules
        (deliver it here, report no route, take a ring still forming's first hop). The compiled data path asks
        it for a flow without a packet to send (overlay/datapath.py flow)."""
        route = self.data_routes.get(dst)
        if route is not None:
            return route
        strict, dropped = True, False
        if self.promise:
            flags = FLAG_EXACT | FLAG_PROMISE
            decision = self._promised_hop(Routed(DEFAULT_TTL, flags, self.id, dst, FAR, Kind.DATA, b""))
            if isinstance(decision, Forward) and decision.promise is not None:
                hops = decision.promise_hops << PROMISE_HOPS_SHIFT
                route = (decision.next_hop, decision.promise, flags | hops)
                strict = False
            elif isinstance(decision, Deliver):
                return None
            dropped = decision is DROP_PROMISE
        if strict:
            own = ring_distance(self.id, dst)
            nh = self._next_hop(dst)
            if nh is None or ring_distance(nh, dst) >= own:
                return None
            decision = decide(self.id, dst, exact=True, watermark=FAR, ttl=DEFAULT_TTL, neighbours=[nh])
            if not isinstance(decision, Forward):
                return None
            route = (decision.next_hop, own, FLAG_EXACT)
        if route is None or route[0] not in self.links.links:
            return None  # on_routed takes it the general way (and counts a promise not kept there)
        if dropped:
            self.count("promise not kept: strict rule")
        self.data_routes[dst] = route
        return route

    def first_hop(self, dst: int) -> int | None:
        """The neighbour a packet we originate for `dst` goes to first (None: delivered here, or no route)."""
        nh = self._next_hop(dst)
        if nh is None or ring_distance(nh, dst) >= ring_distance(self.id, dst):
            nh = self._next_hop_any(dst, None) if dst != self.id else None
        return nh

    # -- next hops ---------------------------------------------------------------------------------------------
    def _neighbours_of(self) -> NeighboursOf | None:
        return self.table.neighbours_of if self.lookahead else None

    def _next_hop(self, dst: int, exclude: frozenset[int] | None = None) -> int | None:
        if exclude is None:
            cached = self._route_cache.get(dst, -1)
            if cached != -1:
                return cached
        nbrs = self.table.neighbours()
        if self.avoid:
            nbrs = [n for n in nbrs if n not in self.avoid]
        look = self._neighbours_of()
        if exclude is not None:
            nbrs = [n for n in nbrs if n not in exclude]
            if look is not None:
                base = look

                def look(n: int) -> list[int]:
                    return [m for m in base(n) if m not in exclude]

        nh = next_hop(self.id, dst, nbrs, look)
        if exclude is None:
            self._route_cache[dst] = nh
        return nh

    def _stuck_at_origin(self, pkt: Routed) -> bool:
        if pkt.exact:
            return pkt.dst != self.id
        closest = self.table.closest_known(pkt.dst)
        return closest is not None and ring_distance(closest, pkt.dst) < ring_distance(self.id, pkt.dst)

    def _next_hop_any(self, dst: int, exclude: frozenset[int] | None) -> int | None:
        """The neighbour nearest `dst` whether or not it is nearer than we are: next_hop seen from the point
        opposite dst on the ring, from where every neighbour is an improvement."""
        nbrs = [n for n in self.table.neighbours() if exclude is None or n not in exclude]
        return next_hop(dst ^ (1 << 63), dst, nbrs, self._neighbours_of())

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
                neighbours=[n for n in self.table.neighbours() if n not in self.avoid],
                neighbours_of=self._neighbours_of(),
            )
            self._promise_cache[key] = decision
        return decision

    # -- forwarding --------------------------------------------------------------------------------------------
    def on_routed(self, came_from: Link | None, pkt: Routed) -> None:
        """A routed packet from a neighbour (`came_from`) or from this node (None): forward, deliver, or
        report that no route exists."""
        if came_from is None and pkt.kind in DATA_KINDS and self._originated_data(pkt):
            route = self.data_route(pkt.dst)
            if route is not None:
                next_hop, watermark, flags = route
                if next_hop != pkt.dst:
                    self.count_relayed(pkt.dst, len(pkt.body))
                self._pass_on(self.links.links[next_hop], replace(pkt, flags=flags), pkt.ttl - 1, watermark)
                return
        if pkt.flags & FLAG_PROMISE:
            decision = self._promised_hop(pkt)
            if isinstance(decision, Forward) and decision.promise is not None:
                link = self.links.links.get(decision.next_hop)
                if pkt.ttl <= 0 or link is None:
                    self.count("drop: ttl expired" if pkt.ttl <= 0 else "drop: next hop vanished")
                    return
                flags = (pkt.flags & ~PROMISE_HOPS_MASK) | (decision.promise_hops << PROMISE_HOPS_SHIFT)
                self._pass_on(link, replace(pkt, flags=flags), pkt.ttl - 1, decision.promise)
                return
            if decision is DROP_PROMISE:
                # Our lists disagree with the previous hop's (a neighbour just left or joined): finish the
                # route under the strict rule. A packet switches once and never back, and each phase only
                # moves closer by its own measure, so the route still cannot loop.
                self.count("promise not kept: strict rule")
                pkt = replace(pkt, flags=pkt.flags & ~(FLAG_PROMISE | PROMISE_HOPS_MASK), watermark=FAR)
            elif isinstance(decision, Deliver):
                self.deliver(pkt)
                return
            else:
                pkt = replace(pkt, flags=pkt.flags & ~(FLAG_PROMISE | PROMISE_HOPS_MASK))
        exclude = frozenset({pkt.src} | self.join_unfit()) if pkt.flags & FLAG_JOIN else None
        own = ring_distance(self.id, pkt.dst)
        if exclude is not None and pkt.dst == self.id and pkt.src != self.id and not pkt.exact:
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
            self._pass_on(link, pkt, pkt.ttl - 1, own)
        elif isinstance(decision, Deliver):
            self.deliver(pkt)
        elif isinstance(decision, NoRoute):
            self.count("no route")
            if pkt.kind != Kind.NO_ROUTE:
                self.send_routed(pkt.src, Kind.NO_ROUTE, encode_no_route(pkt.dst, pkt.kind))
            if came_from is None:
                self.on_no_route(pkt.dst, pkt.kind)
        elif isinstance(decision, Drop):
            self.count(f"drop: {decision.reason}")

    def _originated_data(self, pkt: Routed) -> bool:
        """Data this node originates as send_data makes it: its route is data_route's."""
        flags = FLAG_EXACT | (FLAG_PROMISE if self.promise else 0)
        return pkt.src == self.id and pkt.ttl == DEFAULT_TTL and pkt.flags == flags and pkt.watermark == FAR

    def _pass_on(self, link: Link, pkt: Routed, ttl: int, watermark: int) -> None:
        """Send a routed packet on to the next hop with a new TTL and watermark (as origin or as relay)."""
        if pkt.kind not in DATA_KINDS:
            if not pkt.flags & FLAG_QUIET:
                self.on_sent(link, False)
        elif not link.busy:
            link.busy = True
            self.on_sent(link, True)
        if pkt.kind == Kind.SEALED:
            if not link.fragments_ok and len(pkt.body) > SEALED_SUPERFRAME:
                self.on_too_big(pkt.src, pkt.dst)
                return
            header = ROUTED_HEADER.pack(LinkMsg.ROUTED, ttl, pkt.flags, pkt.src, pkt.dst, watermark, Kind.SEALED)
            link.send_sealed(header, pkt.body)
            return
        if pkt.kind == Kind.DATA_GSO and not link.fragments_ok:
            header = ROUTED_HEADER.pack(LinkMsg.ROUTED, ttl, pkt.flags, pkt.src, pkt.dst, watermark, Kind.DATA)
            body = memoryview(pkt.body)
            send_unfragmented(link, header, body[:VNET_HDR_LEN], body[VNET_HDR_LEN:], self.count)
            return
        link.send(reroute(pkt, ttl, watermark))

    # -- delivering --------------------------------------------------------------------------------------------
    def deliver(self, pkt: Routed) -> None:
        handler = self.handlers.get(pkt.kind)
        if handler is None:
            self.count("drop: routed kind with no handler")
            return
        try:
            handler(pkt)
        except DecodeError:
            self.count("drop: malformed routed body")

    def _on_no_route_report(self, pkt: Routed) -> None:
        dst, kind = decode_no_route(pkt.body)
        self.on_no_route(dst, kind)
