"""The data path: frames from the TAP to the overlay and back; the fragment probes (overlay/probes.py) decide
how TCP super-frames cross each link.

Outbound: the virtual NIC turns a frame into an IPv4 or IPv6 packet (or answers ARP or neighbour discovery
itself); the destination address is
resolved through the DHT cache, and the packet goes out on the cached data route (overlay/router.py) or is
handed to the DHT to resolve. Inbound: a DATA body is written to the TAP with an Ethernet header; a DATA_GSO
super-frame keeps its virtio_net_hdr for a TAP with offload, or is segmented in software for one without.

Per frame Python costs ~5 µs whatever its size (ARCHITECTURE.md), so this path reads the clock once per batch,
keys its caches by integers, and takes the routing decision from caches of decide()'s answers.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overlay.link import Link
from overlay.links import LinkManager
from overlay.probes import FragmentProbes
from overlay.router import Router
from overlay.routing.forwarding import DEFAULT_TTL
from overlay.superframes import SEGMENT_DROP, send_unfragmented
from overlay.tap.frames import (
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
    Bytes,
    FrameError,
    complete_checksum,
    icmp_error_allowed,
    icmp_unreachable,
    parse_vnet_header,
    segment_tcp,
)
from overlay.tap.ndp import icmpv6_error_allowed, icmpv6_unreachable
from overlay.tap.vnic import Outbound, Reply, VirtualNic
from overlay.wire import ROUTED_HEADER, Kind, LinkMsg

if TYPE_CHECKING:
    from overlay.dht.service import AddressService
    from overlay.e2e import EndToEnd

ICMP_INTERVAL = 0.1  # our choice: at most 10 host-unreachable replies a second (RFC 1812 4.3.2.8 rate limit)
TAP_BATCH = 64  # frames per TAP wakeup (ARCHITECTURE.md: 64 per wakeup took 0.7-0.9 to 1.2-1.6 Gbit/s)
ADDRESS_TEXT_LIMIT = 1 << 16  # our choice: a /16 of virtual addresses; the cache restarts beyond it
# Packets from a member whose certificate we have not seen yet wait while its address record is looked up (the
# record carries the certificate); our choice: a TCP initial window's worth, as the DHT's outbound queue.
UNVERIFIED_QUEUE = 10
UNVERIFIED_SENDERS = 64
SOURCE_DROP = "drop: inner source address is not the sender's"


class DataPath:
    def __init__(
        self,
        address: str,
        router: Router,
        links: LinkManager,
        counters: dict[str, int],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.address = address
        self.address_int = int(ipaddress.IPv4Address(address))
        self._address6_int: int | None = None
        # The upper 64 bits of our IPv6 address: with certificates, a member's IPv6 address is this prefix and
        # its node ID (overlay/ids.py derived_address6), so its inner IPv6 source is checked without a lookup.
        self._prefix6: int | None = None
        self.router = router
        self.links = links
        self.counters = counters
        self.clock = clock
        self.rng = rng
        self.dht: AddressService | None = None  # set by the node once its DHT exists
        self.e2e: EndToEnd | None = None  # set by the node: data for members we are not linked to
        self.tap: Any = None
        self.vnic: VirtualNic | None = None
        self.hops = [0, 0]  # data packets that arrived over a link for us, and the hops they took
        self._address_text: dict[int, str] = {}
        self._last_icmp = -1e18
        # May each link carry a super-frame whole? (LinkMsg.PROBE; until then they are cut, superframes.py)
        self.probes = FragmentProbes(links, rng, self.count)
        # Cryptokey routing (WireGuard's allowed IPs): the address a sender's certificate gives it, by node ID;
        # None in a group without certificates (then nothing is checked).
        self.source_of: Callable[[int], int | None] | None = None
        self._unverified: dict[int, tuple[int, deque[tuple[bytes, int]]]] = {}  # src -> claimed address, packets
        # The compiled data path (overlay/fastpath.py), when the node runs one: told each destination address
        # this path sent to over a link to its owner, so it sends the next packets there itself.
        self.fast: Any = None

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def attach_tap(
        self, tap: Any, prefix_len: int, address6: str | None = None, network6: ipaddress.IPv6Network | None = None
    ) -> None:
        self.tap = tap
        if address6 is not None and network6 is not None:
            self._address6_int = int(ipaddress.IPv6Address(address6))
            self._prefix6 = self._address6_int >> 64 << 64
            self.vnic = VirtualNic(
                self.address_int, prefix_len, tap.mac, address6=self._address6_int, prefix6_len=network6.prefixlen
            )
        else:
            self.vnic = VirtualNic(self.address_int, prefix_len, tap.mac)

    # -- outbound ------------------------------------------------------------------------------------------------
    def on_tap_readable(self) -> None:
        assert self.tap is not None
        underlay = self.links.underlay
        underlay.hold()  # a batch's datagrams to one peer leave in one send (overlay/transport/underlay.py)
        try:
            self.from_tap(self.tap.read_batch(TAP_BATCH))
        finally:
            underlay.flush()

    def from_tap(self, frames: list[bytes]) -> None:
        """Frames the kernel wrote to the TAP (read here, or passed up by the compiled data path)."""
        assert self.tap is not None and self.vnic is not None
        self._from_tap(frames, self.vnic, self.tap.vnet_hdr, self.clock())

    def _from_tap(self, frames: list[bytes], vnic: VirtualNic, vnet: bool, now: float) -> None:
        for frame in frames:
            result = vnic.from_tap(memoryview(frame)[VNET_HDR_LEN:] if vnet else frame)
            if isinstance(result, Outbound):
                head = frame[:VNET_HDR_LEN] if vnet else b""
                if head and head != ZERO_VNET_HDR:
                    # Offload work left to the receiving kernel (segmentation, checksum): carry the header.
                    self._send(result.dst_ip, Kind.DATA_GSO, head, result.packet, now)
                else:
                    self._send(result.dst_ip, Kind.DATA, b"", result.packet, now)
            elif isinstance(result, Reply):
                self.write_own_frame(result.frame)

    def _send(self, dst_ip: int, kind: Kind, head: bytes, packet: Bytes, now: float) -> None:
        assert self.dht is not None
        address = self._address_text.get(dst_ip)
        if address is None:
            if len(self._address_text) >= ADDRESS_TEXT_LIMIT:
                self._address_text.clear()
            address = self._address_text[dst_ip] = str(ipaddress.ip_address(dst_ip))
        entry = self.dht.cache.get(address, now)
        if entry is not None:
            dst = entry.node_id
            route = self.router.data_route(dst)
            if route is not None:
                link = self.links.links.get(route[0])
                if link is not None:
                    if not link.busy:
                        link.busy = True
                        self.router.on_sent(link, True)
                    if route[0] != dst:
                        self.router.count_relayed(dst, len(packet))
                        self._send_sealed(link, dst, route, kind, head, packet, now)
                        return
                    header = self._direct_header(dst, route, kind)
                    if self.fast is not None:
                        self.fast.set_flow(dst_ip, dst, header)
                    if kind == Kind.DATA_GSO and not link.fragments_ok:
                        header = self._direct_header(dst, route, Kind.DATA)
                        send_unfragmented(link, header, head, packet, self.count)
                        return
                    link.send(b"".join((header, head, packet)))
                    return
        self.dht.resolve_and_send(address, head + bytes(packet), kind)

    def flow(self, dst_ip: int) -> tuple[int, bytes] | None:
        """(peer, routed header) for the data to an address (IPv4 below 2**32, IPv6 above) whose owner we have a
        link to and route to directly, as _send would send it now; None when _send would do anything else."""
        if self.dht is None:
            return None
        entry = self.dht.cache.get(str(ipaddress.ip_address(dst_ip)), self.clock())
        if entry is None:
            return None
        dst = entry.node_id
        route = self.router.data_route(dst)
        if route is None or route[0] != dst or dst not in self.links.links:
            return None
        return dst, self._direct_header(dst, route, Kind.DATA)

    def _direct_header(self, dst: int, route: tuple[int, int, int], kind: Kind) -> bytes:
        """The routed header of data to `dst` on our link to it: exactly what Router.on_routed sends for the
        packet at its origin (_pass_on, TTL - 1)."""
        return ROUTED_HEADER.pack(LinkMsg.ROUTED, DEFAULT_TTL - 1, route[2], self.router.id, dst, route[1], kind)

    def _send_sealed(
        self, link: Link, dst: int, route: tuple[int, int, int], kind: Kind, head: bytes, packet: Bytes, now: float
    ) -> None:
        """Data for a member we reach through relays: sealed for it alone (overlay/e2e.py), the routed header
        exactly what Router.on_routed sends at the origin."""
        assert self.e2e is not None
        body = b"".join((head, packet)) if head else packet
        if kind == Kind.DATA_GSO and (not link.fragments_ok or self.e2e.must_segment(dst, now)):
            self.e2e.send(dst, kind, body, cut=True)
            return
        sealed = self.e2e.seal(dst, kind, body, now)
        if sealed is not None:
            header = ROUTED_HEADER.pack(
                LinkMsg.ROUTED, DEFAULT_TTL - 1, route[2], self.router.id, dst, route[1], Kind.SEALED
            )
            link.send_sealed(header, sealed)

    def host_unreachable(self, body: bytes, kind: Kind, now: float) -> None:
        """Tell our kernel that nobody owns the destination of this data body (rate-limited ICMP)."""
        packet = body[VNET_HDR_LEN:] if kind == Kind.DATA_GSO else body
        if self.vnic is None or self.tap is None or now - self._last_icmp < ICMP_INTERVAL or not packet:
            return
        if packet[0] >> 4 == 6:
            if self._address6_int is None or not icmpv6_error_allowed(packet):
                return
            error = icmpv6_unreachable(packet, self._address6_int)
        else:
            if not icmp_error_allowed(packet):
                return
            error = icmp_unreachable(packet, self.address_int)
        self._last_icmp = now
        self.write_own_frame(self.vnic.to_tap(error))

    def write_own_frame(self, frame: bytes) -> None:
        """A frame we made ourselves (ARP reply, ICMP error): no offload work for the kernel to do."""
        assert self.tap is not None
        if self.tap.vnet_hdr:
            self.tap.write_parts([ZERO_VNET_HDR, frame])
        else:
            self.tap.write(frame)

    # -- inbound -------------------------------------------------------------------------------------------------
    def deliver_routed(self, msg: bytes, ttl: int, kind: int) -> None:
        """A ROUTED link message carrying data for this node, delivered without decoding it into a Routed."""
        self.hops[0] += 1
        self.hops[1] += DEFAULT_TTL - ttl
        if self.source_of is None:  # a group without certificates: nothing to check (the per-packet path)
            self.deliver(memoryview(msg)[ROUTED_HEADER.size :], kind)
        else:
            self.deliver_from(int.from_bytes(msg[3:11], "big"), memoryview(msg)[ROUTED_HEADER.size :], kind)

    def deliver_from(self, src: int, body: Bytes, kind: int) -> None:
        """Data from member `src`: delivered only if its inner source is src's address: for IPv4 the one in
        src's certificate, for IPv6 our prefix with src's node ID (and src must hold a certificate)."""
        source_of = self.source_of
        if source_of is None:
            self.deliver(body, kind)
            return
        base = VNET_HDR_LEN if kind == Kind.DATA_GSO else 0
        v6 = len(body) > base and body[base] >> 4 == 6
        at = base + (8 if v6 else 12)
        width = 16 if v6 else 4
        if len(body) < at + width:
            self.count("drop: data too short")
            return
        inner = int.from_bytes(body[at : at + width], "big")
        allowed = source_of(src)
        if v6:
            if self._prefix6 is None or inner != self._prefix6 | src:
                self.count(SOURCE_DROP)
            elif allowed is not None:
                self.deliver(body, kind)
            else:
                self._hold_unverified(src, inner, bytes(body), kind)
        elif allowed == inner:
            self.deliver(body, kind)
        elif allowed is not None:
            self.count(SOURCE_DROP)
        else:
            self._hold_unverified(src, inner, bytes(body), kind)

    def _hold_unverified(self, src: int, inner: int, body: bytes, kind: int) -> None:
        """A sender we hold no certificate of: ask the DHT for the record of the address it claims (the record
        carries its certificate) and keep a few packets until the answer says whether the address is its."""
        held = self._unverified.get(src)
        if held is None or held[0] != inner:
            if len(self._unverified) >= UNVERIFIED_SENDERS:
                self.count("drop: too many unverified senders")
                return
            held = self._unverified[src] = (inner, deque(maxlen=UNVERIFIED_QUEUE))
            if self.dht is not None:
                self.dht.look_up(str(ipaddress.ip_address(inner)))
        elif len(held[1]) == UNVERIFIED_QUEUE:
            self.count(SOURCE_DROP)
        held[1].append((body, kind))

    def resolved(self, address: int, node_id: int) -> None:
        """The DHT says (with a certificate it checked) that `address` is `node_id`'s: deliver what `node_id`
        sent from it; drop what others sent claiming it."""
        for src, (inner, queue) in list(self._unverified.items()):
            if inner != address:
                continue
            del self._unverified[src]
            source_of = self.source_of
            allowed = source_of(src) if source_of is not None else None
            # An IPv6 source (above 2**32) was checked against src's node ID before it was held.
            if src == node_id and allowed is not None and (inner > 0xFFFFFFFF or allowed == inner):
                for body, kind in queue:
                    self.deliver(body, kind)
            else:
                self.counters[SOURCE_DROP] = self.counters.get(SOURCE_DROP, 0) + len(queue)

    def deliver(self, body: Bytes, kind: int = Kind.DATA) -> None:
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
                        segments = segment_tcp(packet, offload)
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
