"""IPv6 neighbour discovery and ICMPv6 errors on the TAP: the IPv6 counterparts of ARP and ICMP in frames.py.

The node answers the kernel's neighbour solicitations for every other address of its IPv6 prefix with its
gateway MAC (proxy neighbour discovery, RFC 4861 §7.2.8 and RFC 4389), as it answers ARP for IPv4, and tells
the kernel with an ICMPv6 "address unreachable" (RFC 4443 §3.1) when nobody owns a destination. Same rules as
frames.py: decoders raise only `FrameError` on bad bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlay.tap.frames import IPV6_HEADER_LEN, Bytes, FrameError, internet_checksum, ipv6_header

IPPROTO_ICMPV6 = 58
# RFC 4861 §4.3/§4.4: neighbour solicitation and advertisement; §4.6.1: link-layer address options.
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LL_ADDR = 2
ND_HOP_LIMIT = 255  # §7.1.1: a solicitation with any other hop limit did not come from the link
NS_MIN_LEN = 24  # ICMPv6 header (4), reserved (4), target (16)
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000
# RFC 4443 §3.1: destination unreachable, code 3 = address unreachable.
ICMPV6_UNREACHABLE = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
# RFC 4443 §2.4 (c): an error carries as much of the invoking packet as fits the minimum MTU (RFC 8200 §5).
IPV6_MIN_MTU = 1280
# Our choice: the hop limit of errors we originate (Linux's default hop_limit).
ICMPV6_ERROR_HOP_LIMIT = 64

_NA = struct.Struct("!BBHI16sBB6s")  # type, code, checksum, flags, target, option type, option length, MAC


@dataclass(frozen=True, slots=True)
class Solicitation:
    """A neighbour solicitation: who asks (`src`, the unspecified address for duplicate address detection)
    and for which `target` address."""

    src: int
    target: int


def is_multicast6(address: int) -> bool:
    """ff00::/8 (RFC 4291 §2.7)."""
    return address >> 120 == 0xFF


def parse_solicitation(packet: Bytes) -> Solicitation | None:
    """The solicitation in an IPv6 packet, or None when the packet is not one (another protocol or ICMPv6
    type). Raises FrameError for a solicitation that RFC 4861 §7.1.1 says to discard. Extension headers are
    not followed: the kernel sends solicitations without them."""
    src, _, total_len = ipv6_header(packet)
    if packet[6] != IPPROTO_ICMPV6 or total_len < IPV6_HEADER_LEN + 1 or packet[IPV6_HEADER_LEN] != ND_NEIGHBOR_SOLICIT:
        return None
    if packet[7] != ND_HOP_LIMIT:
        raise FrameError(f"neighbour solicitation with hop limit {packet[7]}, not {ND_HOP_LIMIT}")
    if total_len < IPV6_HEADER_LEN + NS_MIN_LEN:
        raise FrameError(f"neighbour solicitation of {total_len - IPV6_HEADER_LEN} bytes, at least {NS_MIN_LEN}")
    if packet[IPV6_HEADER_LEN + 1] != 0:
        raise FrameError(f"neighbour solicitation with code {packet[IPV6_HEADER_LEN + 1]}")
    target = int.from_bytes(packet[IPV6_HEADER_LEN + 8 : IPV6_HEADER_LEN + 24], "big")
    if is_multicast6(target):
        raise FrameError("neighbour solicitation for a multicast target")
    return Solicitation(src, target)


def _icmpv6_packet(src: int, dst: int, hop_limit: int, message: bytearray) -> bytes:
    """An IPv6 packet carrying ICMPv6 `message` (checksum field zero), the checksum filled in over the
    pseudo-header (RFC 4443 §2.3, RFC 8200 §8.1)."""
    addresses = src.to_bytes(16, "big") + dst.to_bytes(16, "big")
    pseudo = addresses + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6)
    struct.pack_into("!H", message, 2, internet_checksum(pseudo + message))
    header = struct.pack("!IHBB", 6 << 28, len(message), IPPROTO_ICMPV6, hop_limit)
    return header + addresses + message


def advertisement(solicitation: Solicitation, mac: bytes) -> bytes:
    """The neighbour advertisement (an IPv6 packet) that answers `solicitation`: `target` is at `mac`.

    Solicited and Override set, Router clear (RFC 4861 §7.2.4); sent from the target address to the asker, with
    the Target Link-Layer Address option the kernel needs to fill its neighbour entry."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    target = solicitation.target.to_bytes(16, "big")
    message = bytearray(
        _NA.pack(ND_NEIGHBOR_ADVERT, 0, 0, NA_SOLICITED | NA_OVERRIDE, target, ND_OPT_TARGET_LL_ADDR, 1, mac)
    )
    return _icmpv6_packet(solicitation.target, solicitation.src, ND_HOP_LIMIT, message)


def icmpv6_error_allowed(original: Bytes) -> bool:
    """Whether RFC 4443 §2.4 (e) lets us answer `original` (an IPv6 packet) with an error: not about an ICMPv6
    error (types below 128), nor a packet from the unspecified or a multicast address, nor to a multicast one."""
    src, dst, total_len = ipv6_header(original)
    if src == 0 or is_multicast6(src) or is_multicast6(dst):
        return False
    if original[6] == IPPROTO_ICMPV6:
        return total_len > IPV6_HEADER_LEN and original[IPV6_HEADER_LEN] >= 128
    return True


def icmpv6_unreachable(original: Bytes, from_ip: int) -> bytes:
    """An ICMPv6 address-unreachable error from `from_ip` to the source of `original`, quoting as much of it as
    fits the IPv6 minimum MTU. Call `icmpv6_error_allowed` first."""
    src, _, total_len = ipv6_header(original)
    quoted = bytes(original[: min(total_len, IPV6_MIN_MTU - IPV6_HEADER_LEN - 8)])
    message = bytearray(struct.pack("!BBHI", ICMPV6_UNREACHABLE, ICMPV6_ADDRESS_UNREACHABLE, 0, 0) + quoted)
    return _icmpv6_packet(from_ip, src, ICMPV6_ERROR_HOP_LIMIT, message)
