"""The node's side of the TAP link: answers ARP and neighbour discovery for the virtual subnets and turns
frames into IP packets.

The overlay carries IP packets (layer 3), not Ethernet frames, so nothing like a virtual switch exists:
to the kernel, every other address in the subnet sits behind one gateway MAC that this class owns. It
answers the kernel's ARP requests for those addresses with that MAC (proxy ARP, RFC 1027), and with an IPv6
prefix its neighbour solicitations the same way (proxy ND, RFC 4389), strips the Ethernet header from what the
kernel sends, and adds one to what the overlay delivers. Pure: no I/O, no clock; the driver reads frames from
the device and acts on the returned decision.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.tap.frames import (
    ARP_REQUEST,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    Bytes,
    FrameError,
    arp_reply,
    ethernet_frame,
    ipv4_header,
    ipv6_header,
    parse_arp,
    parse_ethernet,
)
from overlay.tap.ndp import advertisement, is_multicast6, parse_solicitation

# Our choice: a fixed locally administered unicast MAC (bit 1 of the first octet set, bit 0 clear;
# IEEE 802 §8.2.2) for the gateway every subnet address sits behind. "IPOP" in ASCII follows 0x02.
DEFAULT_GATEWAY_MAC = b"\x02\x49\x50\x4f\x50\x01"


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame to write straight back to the TAP (an ARP answer)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Outbound:
    """An IP packet for `dst_ip`, to send across the overlay: an IPv4 address, or an IPv6 one (then above
    2**32: VirtualNic only lets prefixes from fc00::/7 and 2000::/3 through).

    `packet` is a view into the frame read from the TAP, trimmed to the IP total length (no copy).
    """

    dst_ip: int
    packet: memoryview


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to do; `reason` is also the key counted in `VirtualNic.counters`."""

    reason: str


FromTap = Reply | Outbound | Ignored

MALFORMED = Ignored("malformed")
IPV6 = Ignored("ipv6")
OTHER_ETHERTYPE = Ignored("ethertype")
MULTICAST = Ignored("multicast")
BROADCAST = Ignored("broadcast")
OWN_ADDRESS = Ignored("own-address")
NOT_SUBNET = Ignored("not-subnet")
ARP_NOT_REQUEST = Ignored("arp-reply")
ARP_OWN_ADDRESS = Ignored("arp-own-address")
ARP_NOT_SUBNET = Ignored("arp-not-subnet")
ARP_GRATUITOUS = Ignored("arp-gratuitous")
ND_DUPLICATE_CHECK = Ignored("nd-duplicate-address-detection")
ND_OWN_ADDRESS = Ignored("nd-own-address")
ND_NOT_SUBNET = Ignored("nd-not-subnet")


class VirtualNic:
    """Proxy-ARP (and proxy-ND) responder and frame <-> packet conversion for one node's addresses on one TAP
    device: IPv4 `address`/`prefix_len`, and optionally IPv6 `address6`/`prefix6_len`.

    `tap_mac` is the kernel's MAC on the TAP (learnt from the device); it is updated from the sender of
    each ARP request and neighbour solicitation the kernel sends, so a MAC changed by an administrator does
    not strand traffic.
    """

    def __init__(
        self,
        address: int,
        prefix_len: int,
        tap_mac: bytes,
        gateway_mac: bytes = DEFAULT_GATEWAY_MAC,
        address6: int | None = None,
        prefix6_len: int = 64,
    ) -> None:
        if not 0 <= address <= 0xFFFFFFFF:
            raise ValueError(f"IPv4 address {address} is outside 0..2**32-1")
        # /31 and /32 have no broadcast address and no room for peers respectively (RFC 3021); a virtual
        # network needs at least one other host, and /31 is not worth the special cases here.
        if not 1 <= prefix_len <= 30:
            raise ValueError(f"prefix length /{prefix_len} is outside /1../30")
        if len(tap_mac) != 6 or len(gateway_mac) != 6:
            raise ValueError(f"MAC addresses must be 6 bytes, got {len(tap_mac)} and {len(gateway_mac)}")
        self.address = address
        self.prefix_len = prefix_len
        self.tap_mac = tap_mac
        self.gateway_mac = gateway_mac
        self._mask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        self._network = address & self._mask
        self._broadcast = self._network | (~self._mask & 0xFFFFFFFF)
        if address in (self._network, self._broadcast):
            raise ValueError(f"address {address:#010x} is the network or broadcast address of /{prefix_len}")
        self.address6 = address6
        self.prefix6_len = prefix6_len
        self._mask6 = 0
        self._network6 = -1
        if address6 is not None:
            check_address6(address6, prefix6_len)
            self._mask6 = ((1 << prefix6_len) - 1) << (128 - prefix6_len)
            self._network6 = address6 & self._mask6
        self.counters: dict[str, int] = {}

    def in_subnet(self, ip: int) -> bool:
        return ip & self._mask == self._network

    def _ignore(self, result: Ignored) -> Ignored:
        self.counters[result.reason] = self.counters.get(result.reason, 0) + 1
        return result

    def from_tap(self, frame: Bytes) -> FromTap:
        """Decide what to do with one frame the kernel wrote to the TAP."""
        try:
            _, src_mac, ethertype, payload = parse_ethernet(frame)
            if ethertype == ETH_P_IP:
                return self._ipv4_from_tap(payload)
            if ethertype == ETH_P_ARP:
                return self._arp_from_tap(payload)
            if ethertype == ETH_P_IPV6:
                if self.address6 is None:
                    return self._ignore(IPV6)
                return self._ipv6_from_tap(src_mac, payload)
        except FrameError:
            return self._ignore(MALFORMED)
        return self._ignore(OTHER_ETHERTYPE)

    def _ipv4_from_tap(self, payload: memoryview) -> FromTap:
        _, dst, _, total_len = ipv4_header(payload)
        if dst >> 28 == 0xE:  # 224.0.0.0/4, RFC 5771
            return self._ignore(MULTICAST)
        if dst == 0xFFFFFFFF or dst == self._broadcast or dst == self._network:
            return self._ignore(BROADCAST)
        if dst == self.address:
            return self._ignore(OWN_ADDRESS)
        if dst & self._mask != self._network:
            return self._ignore(NOT_SUBNET)
        return Outbound(dst, payload[:total_len])

    def _ipv6_from_tap(self, src_mac: bytes, payload: memoryview) -> FromTap:
        solicitation = parse_solicitation(payload)
        if solicitation is not None:
            # RFC 4862 §5.4.3: a solicitation from the unspecified address checks the kernel's own new address.
            if solicitation.src == 0:
                return self._ignore(ND_DUPLICATE_CHECK)
            if solicitation.target == self.address6:
                return self._ignore(ND_OWN_ADDRESS)
            if solicitation.target & self._mask6 != self._network6 or solicitation.target == self._network6:
                return self._ignore(ND_NOT_SUBNET)
            if not src_mac[0] & 1:
                self.tap_mac = src_mac
            answer = advertisement(solicitation, self.gateway_mac)
            return Reply(ethernet_frame(src_mac, self.gateway_mac, ETH_P_IPV6, answer))
        _, dst, total_len = ipv6_header(payload)
        if is_multicast6(dst):  # router solicitations, MLD reports: nobody on the overlay listens
            return self._ignore(MULTICAST)
        if dst == self.address6:
            return self._ignore(OWN_ADDRESS)
        # The prefix's all-zero address is the subnet-router anycast address (RFC 4291 §2.6.1): no member's.
        if dst & self._mask6 != self._network6 or dst == self._network6:
            return self._ignore(NOT_SUBNET)
        return Outbound(dst, payload[:total_len])

    def _arp_from_tap(self, payload: memoryview) -> FromTap:
        arp = parse_arp(payload)
        if arp.op != ARP_REQUEST:
            return self._ignore(ARP_NOT_REQUEST)
        # Gratuitous ARP / announcements (RFC 5227 §2.3) ask nobody anything.
        if arp.sender_ip == arp.target_ip:
            return self._ignore(ARP_GRATUITOUS)
        if arp.target_ip == self.address:
            return self._ignore(ARP_OWN_ADDRESS)
        target = arp.target_ip
        if target & self._mask != self._network or target in (self._network, self._broadcast):
            return self._ignore(ARP_NOT_SUBNET)
        # Only the kernel writes to our TAP, so the asker's MAC is the kernel's MAC on this device.
        if not arp.sender_mac[0] & 1:
            self.tap_mac = arp.sender_mac
        reply = arp_reply(arp, self.gateway_mac)
        return Reply(ethernet_frame(arp.sender_mac, self.gateway_mac, ETH_P_ARP, reply))

    def to_tap(self, packet: Bytes) -> bytes:
        """Wrap an IP packet that arrived over the overlay into a frame for the TAP.

        Raises FrameError unless it is a valid IPv4 (or, with an IPv6 address, IPv6) packet addressed to this
        node: overlay bytes come from
        peers, and the kernel should never be handed a packet for somebody else. Checking that the source
        address belongs to the sending member is the caller's job (it knows who sent it).
        """
        header, packet = self.to_tap_parts(packet)
        return header + packet

    def to_tap_parts(self, packet: Bytes) -> tuple[bytes, Bytes]:
        """`to_tap` as (Ethernet header, packet trimmed to its total length), for a gather write: the data
        path hands both to writev rather than copying a 64 KB super-frame once more. Same checks."""
        if packet and packet[0] >> 4 == 6 and self.address6 is not None:
            _, dst, total_len = ipv6_header(packet)
            if dst != self.address6:
                raise FrameError(f"IPv6 packet for {dst:#034x} arrived at {self.address6:#034x}")
            ethertype = ETH_P_IPV6
        else:
            _, dst, _, total_len = ipv4_header(packet)
            if dst != self.address:
                raise FrameError(f"IPv4 packet for {dst:#010x} arrived at {self.address:#010x}")
            ethertype = ETH_P_IP
        if total_len != len(packet):
            packet = memoryview(packet)[:total_len]
        return ethernet_frame(self.tap_mac, self.gateway_mac, ethertype, b""), packet


# RFC 4193 unique local (fc00::/7) and RFC 4291 §2.4 global unicast (2000::/3) addresses: what a VPN's
# prefix is drawn from. Everything else (link-local, multicast, loopback, IPv4-mapped) has its own meaning.
_UNICAST6 = ((0xFC << 120, 7), (0x1 << 125, 3))


def check_address6(address: int, prefix_len: int) -> None:
    """Raise ValueError unless `address`/`prefix_len` can be a node's IPv6 address on the VPN."""
    if not 16 <= prefix_len <= 120:
        raise ValueError(f"IPv6 prefix length /{prefix_len} is outside /16../120")
    if not any(address >> (128 - bits) == start >> (128 - bits) for start, bits in _UNICAST6):
        raise ValueError(f"IPv6 address {_text6(address)} is not unique-local (fc00::/7) or global unicast (2000::/3)")
    host = address & ((1 << (128 - prefix_len)) - 1)
    if host == 0:
        raise ValueError(f"IPv6 address {_text6(address)} is its prefix's subnet-router anycast address")


def _text6(address: int) -> str:
    return str(ipaddress.IPv6Address(address))
