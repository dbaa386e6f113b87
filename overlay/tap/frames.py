"""Codecs for the bytes a TAP device carries: Ethernet II frames, ARP for IPv4, IPv4 and IPv6 headers, ICMP
errors, offload headers and software TCP segmentation (IPv6 neighbour discovery: overlay/tap/ndp.py).

Every decoder here treats its input as hostile and raises exactly one error, `FrameError`, on bad bytes;
anything else escaping a decoder is a bug (the property tests feed arbitrary bytes to check that). Misuse
by our own code (a wrong-length MAC handed to an encoder) raises a plain `ValueError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class FrameError(ValueError):
    """The bytes are not a well-formed frame or packet of the expected kind."""


# From IEEE 802 / the IANA EtherType registry.
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_HEADER_LEN = 14
BROADCAST_MAC = b"\xff" * 6

# RFC 826: hardware type 1 (Ethernet), operation codes.
ARP_HTYPE_ETHERNET = 1
ARP_REQUEST = 1
ARP_REPLY = 2
ARP_LEN = 28

# RFC 791.
IPV4_MIN_HEADER = 20
IPPROTO_ICMP = 1
# RFC 8200.
IPV6_HEADER_LEN = 40

# RFC 792: type 3 = destination unreachable; code 1 = host unreachable.
ICMP_ECHO_REPLY = 0
ICMP_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_HOST_UNREACHABLE = 1
# RFC 1122 §3.2.2: ICMP types that are queries or informational; every other type is an error message,
# and no ICMP error may be sent about an ICMP error.
_ICMP_QUERY_TYPES = frozenset({0, 8, 13, 14, 15, 16, 17, 18})

# Our choice: the TTL of ICMP errors we originate (Linux's default ip_default_ttl).
ICMP_ERROR_TTL = 64

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6sI6sI")
_IPV4_ADDRS = struct.Struct("!II")

Bytes = bytes | bytearray | memoryview


def parse_ethernet(frame: Bytes) -> tuple[bytes, bytes, int, memoryview]:
    """Split an Ethernet II frame into (dst_mac, src_mac, ethertype, payload).

    The payload is a view into `frame` (no copy): a data-path frame is parsed once per packet. It may carry
    trailing padding (802.3 pads frames to 60 bytes); length-aware decoders below ignore it.
    """
    if len(frame) < ETH_HEADER_LEN:
        raise FrameError(f"Ethernet frame of {len(frame)} bytes is shorter than its 14-byte header")
    dst, src, ethertype = _ETH.unpack_from(frame)
    return dst, src, ethertype, memoryview(frame)[ETH_HEADER_LEN:]


def ethernet_frame(dst: bytes, src: bytes, ethertype: int, payload: Bytes) -> bytes:
    if len(dst) != 6 or len(src) != 6:
        raise ValueError(f"MAC addresses must be 6 bytes, got {len(dst)} and {len(src)}")
    return _ETH.pack(dst, src, ethertype) + payload


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """An ARP packet for IPv4 over Ethernet (RFC 826); addresses are 6-byte MACs and integer IPv4."""

    op: int
    sender_mac: bytes
    sender_ip: int
    target_mac: bytes
    target_ip: int


def parse_arp(payload: Bytes) -> ArpPacket:
    if len(payload) < ARP_LEN:
        raise FrameError(f"ARP packet of {len(payload)} bytes is shorter than 28 bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if htype != ARP_HTYPE_ETHERNET or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        raise FrameError(f"ARP hardware {htype}/{hlen}, protocol {ptype:#06x}/{plen} is not Ethernet/IPv4")
    if op not in (ARP_REQUEST, ARP_REPLY):
        raise FrameError(f"ARP operation {op} is neither request (1) nor reply (2)")
    return ArpPacket(op, sha, spa, tha, tpa)


def encode_arp(packet: ArpPacket) -> bytes:
    return _ARP.pack(
        ARP_HTYPE_ETHERNET,
        ETH_P_IP,
        6,
        4,
        packet.op,
        packet.sender_mac,
        packet.sender_ip,
        packet.target_mac,
        packet.target_ip,
    )


def arp_reply(request: ArpPacket, our_mac: bytes) -> bytes:
    """The ARP payload answering `request`: "target_ip is at our_mac", addressed back to the asker."""
    if request.op != ARP_REQUEST:
        raise ValueError(f"only an ARP request can be answered, got operation {request.op}")
    if len(our_mac) != 6:
        raise ValueError(f"MAC address must be 6 bytes, got {len(our_mac)}")
    return encode_arp(
        ArpPacket(
            op=ARP_REPLY,
            sender_mac=our_mac,
            sender_ip=request.target_ip,
            target_mac=request.sender_mac,
            target_ip=request.sender_ip,
        )
    )


def ipv4_header(packet: Bytes) -> tuple[int, int, int, int]:
    """Validate an IPv4 header and return (src, dst, header_len, total_len).

    Checks version, IHL and that total length covers the header and fits in the bytes we have; bytes past
    total length are padding. The header checksum is not checked: the kernel computed it on our side of the
    TAP, and across the overlay the per-link AEAD already protects the packet.
    """
    if len(packet) < IPV4_MIN_HEADER:
        raise FrameError(f"IPv4 packet of {len(packet)} bytes is shorter than the 20-byte header")
    first = packet[0]
    if first >> 4 != 4:
        raise FrameError(f"IP version {first >> 4} is not 4")
    header_len = (first & 0x0F) * 4
    total_len = (packet[2] << 8) | packet[3]
    if header_len < IPV4_MIN_HEADER:
        raise FrameError(f"IPv4 header length {header_len} is below 20 bytes")
    if not header_len <= total_len <= len(packet):
        raise FrameError(
            f"IPv4 total length {total_len} is outside {header_len} (header)..{len(packet)} (bytes present)"
        )
    src, dst = _IPV4_ADDRS.unpack_from(packet, 12)
    return src, dst, header_len, total_len


def ipv4_addresses(packet: Bytes) -> tuple[int, int]:
    """(src, dst) of a validated IPv4 packet, as integers."""
    src, dst, _, _ = ipv4_header(packet)
    return src, dst


def ipv6_header(packet: Bytes) -> tuple[int, int, int]:
    """Validate a fixed IPv6 header (RFC 8200 §3) and return (src, dst, total_len): total_len is the header
    and its payload length; bytes past it are padding. A jumbogram (payload length 0, RFC 2675) is refused:
    no link of ours carries one."""
    if len(packet) < IPV6_HEADER_LEN:
        raise FrameError(f"IPv6 packet of {len(packet)} bytes is shorter than the 40-byte header")
    if packet[0] >> 4 != 6:
        raise FrameError(f"IP version {packet[0] >> 4} is not 6")
    total_len = IPV6_HEADER_LEN + ((packet[4] << 8) | packet[5])
    if total_len > len(packet):
        raise FrameError(f"IPv6 payload length {total_len - IPV6_HEADER_LEN} exceeds the {len(packet)} bytes present")
    src = int.from_bytes(packet[8:24], "big")
    dst = int.from_bytes(packet[24:40], "big")
    return src, dst, total_len


def _word_sum(data: Bytes) -> int:
    """A number congruent, modulo 0xFFFF, to the RFC 1071 sum of `data`'s 16-bit big-endian words (a last odd
    byte padded with zero). The whole of `data` read as one big-endian integer is that number: 2**16 = 1
    (mod 0xFFFF), so every word counts once whatever its position, and pieces of one message that start at even
    offsets may be summed apart and added. ~2.4 µs for a 1,400-byte segment (this machine) against 1.9 µs for
    numpy's 32-bit sum, which is not worth its 11 MB of resident memory in every node (bench/peers.py measures RSS)."""
    total = int.from_bytes(data, "big")
    return total << 8 if len(data) & 1 else total


def _fold(total: int) -> int:
    """The one's-complement 16-bit value of a `_word_sum` total: 0 only for all-zero data (RFC 1071)."""
    folded = total % 0xFFFF
    return folded if folded or not total else 0xFFFF


def internet_checksum(data: Bytes) -> int:
    """RFC 1071 checksum: the one's complement of the one's-complement sum of the 16-bit words."""
    return ~_fold(_word_sum(data)) & 0xFFFF


def ipv4_packet(src: int, dst: int, protocol: int, ttl: int, payload: bytes) -> bytes:
    """An IPv4 packet (20-byte header, checksummed) carrying `payload`: for packets the node makes itself."""
    total_len = IPV4_MIN_HEADER + len(payload)
    header = struct.pack("!BBHHHBBHII", 0x45, 0, total_len, 0, 0, ttl, protocol, 0, src, dst)
    checksum = internet_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def icmp_error_allowed(original: Bytes) -> bool:
    """Whether RFC 1122 §3.2.2 lets us answer `original` (a valid IPv4 packet) with an ICMP error.

    Not about: ICMP errors, fragments other than the first, or packets to multicast/limited broadcast.
    (Subnet broadcast depends on the prefix; `VirtualNic` never forwards those.)
    """
    _, dst, header_len, total_len = ipv4_header(original)
    fragment_offset = ((original[6] << 8) | original[7]) & 0x1FFF
    if fragment_offset or dst >> 28 == 0xE or dst == 0xFFFFFFFF:
        return False
    if original[9] == IPPROTO_ICMP:
        if total_len < header_len + 1:
            return False
        return original[header_len] in _ICMP_QUERY_TYPES
    return True


def icmp_unreachable(original: Bytes, from_ip: int, code: int = ICMP_HOST_UNREACHABLE) -> bytes:
    """An IPv4 ICMP destination-unreachable packet (RFC 792) from `from_ip` to the source of `original`.

    Carries the original IP header plus its first 64 bits of data, as RFC 792 requires. Call
    `icmp_error_allowed` first: this function builds the packet for any valid `original`.
    """
    if not 0 <= code <= 255:
        raise ValueError(f"ICMP code {code} is outside 0..255")
    src, _, header_len, total_len = ipv4_header(original)
    quoted = bytes(original[: min(total_len, header_len + 8)])
    body = struct.pack("!BBHI", ICMP_UNREACHABLE, code, 0, 0) + quoted
    checksum = internet_checksum(body)
    icmp = body[:2] + struct.pack("!H", checksum) + body[4:]
    return ipv4_packet(from_ip, src, IPPROTO_ICMP, ICMP_ERROR_TTL, icmp)


# --- virtio_net_hdr: the offload header a TAP opened with IFF_VNET_HDR puts in front of every frame ---------
# From linux/virtio_net.h (legacy 10-byte layout; TUNSETVNETLE makes it little-endian on every host).
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 0x01  # the checksum at csum_start + csum_offset still has to be completed
VNET_F_DATA_VALID = 0x02  # the checksum was already verified
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80  # modifier bit: the TCP segments carry ECN (CWR handling)
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)
# From Linux (TCP_MIN_SND_MSS, include/net/tcp.h): no kernel cuts TCP segments smaller, and a tiny segment
# size in a peer's header would make our kernel cut one super-frame into thousands of packets.
MIN_GSO_SIZE = 48
_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_VNET_FLAGS = VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID
_VNET_GSO_TYPES = frozenset({VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6})


@dataclass(frozen=True, slots=True)
class VnetHeader:
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int  # offsets count from the start of the Ethernet frame
    csum_offset: int

    def encode(self) -> bytes:
        return _VNET.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)

    @property
    def is_gso(self) -> bool:
        return self.gso_type & ~VNET_GSO_ECN != VNET_GSO_NONE


def parse_vnet_header(data: Bytes, frame_len: int) -> VnetHeader:
    """Check the virtio_net_hdr at the start of `data` against an Ethernet frame of `frame_len` bytes.

    The header travels from one member's kernel to another's, so it is peer bytes: only TCP segmentation
    and checksum offload are accepted, and every offset must fall inside the frame. (The kernel checks
    again in virtio_net_hdr_to_skb; this keeps a bad header from reaching it at all.)
    """
    if len(data) < VNET_HDR_LEN:
        raise FrameError(f"virtio_net_hdr of {len(data)} bytes, expected {VNET_HDR_LEN}")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(data)
    if flags & ~_VNET_FLAGS:
        raise FrameError(f"virtio_net_hdr flags {flags:#04x} are not NEEDS_CSUM/DATA_VALID")
    if gso_type & ~VNET_GSO_ECN not in _VNET_GSO_TYPES:
        raise FrameError(f"virtio_net_hdr GSO type {gso_type:#04x} is not TCPv4/TCPv6 segmentation")
    header = VnetHeader(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    if header.is_gso and (gso_size < MIN_GSO_SIZE or not flags & VNET_F_NEEDS_CSUM):
        raise FrameError(f"virtio_net_hdr asks for segmentation with segment size {gso_size} and no checksum")
    if flags & VNET_F_NEEDS_CSUM and not ETH_HEADER_LEN <= csum_start <= csum_start + csum_offset + 2 <= frame_len:
        raise FrameError(f"virtio_net_hdr checksum at {csum_start}+{csum_offset} is outside a {frame_len}-byte frame")
    if hdr_len > frame_len:
        raise FrameError(f"virtio_net_hdr header length {hdr_len} exceeds the {frame_len}-byte frame")
    return header


def complete_checksum(packet: Bytes, header: VnetHeader) -> bytes:
    """The IPv4 packet with the checksum the sender's kernel left to offload filled in (for a TAP without
    IFF_VNET_HDR). The kernel stores the pseudo-header sum in the field, so summing from csum_start on
    and complementing gives the final value (RFC 1071; the same as skb_checksum_help)."""
    if not header.flags & VNET_F_NEEDS_CSUM:
        return bytes(packet)
    start = header.csum_start - ETH_HEADER_LEN
    where = start + header.csum_offset
    if not 0 <= start <= where <= len(packet) - 2:
        raise FrameError(f"checksum at {start}+{header.csum_offset} is outside a {len(packet)}-byte packet")
    out = bytearray(packet)
    value = internet_checksum(out[start:])
    out[where : where + 2] = struct.pack("!H", value)
    return bytes(out)


# --- software TCP segmentation: what the kernel's tcp_gso_segment does, for a path that cannot take the whole --
IPPROTO_TCP = 6
TCP_MIN_HEADER = 20
TCP_CSUM_OFFSET = 16  # RFC 793: the checksum field's place in the TCP header
_TCP_FIN = 0x01
_TCP_PSH = 0x08
_TCP_CWR = 0x80
_IP_MF_AND_OFFSET = 0x3FFF  # RFC 791: More Fragments flag and fragment offset


def segment_tcp(packet: Bytes, header: VnetHeader) -> list[bytes]:
    """Cut an IPv4/TCP or IPv6/TCP super-frame (TSO, virtio_net_hdr `header`) into the packets a NIC would
    have sent.

    As Linux's tcp_gso_segment/inet_gso_segment/ipv6_gso_segment: the payload is cut into `gso_size` pieces;
    each segment gets its own IPv4 total length (IPv6 payload length), for IPv4 an IP ID one more than the
    previous and a fresh header checksum, a sequence number advanced by the bytes before it, and a full TCP
    checksum over the pseudo-header (RFC 793 §3.1, RFC 8200 §8.1, RFC 1071). FIN and PSH stay on the last
    segment only, CWR on the first only (RFC 3168 §6.1.2: CWR is set once per window reduction). IPv6
    extension headers are refused (Linux's TCP sends none). Anything that does not add up raises FrameError:
    the super-frame may come from a peer.
    """
    gso_type = header.gso_type & ~VNET_GSO_ECN
    if gso_type not in (VNET_GSO_TCPV4, VNET_GSO_TCPV6):
        raise FrameError(f"GSO type {header.gso_type:#04x} is not TCP segmentation")
    mss = header.gso_size
    if mss < MIN_GSO_SIZE:
        raise FrameError(f"TCP segment size {mss} is below {MIN_GSO_SIZE}")
    v6 = gso_type == VNET_GSO_TCPV6
    if v6:
        _, _, total_len = ipv6_header(packet)
        ip_len = IPV6_HEADER_LEN
        if packet[6] != IPPROTO_TCP:
            raise FrameError(f"IPv6 next header {packet[6]} is not TCP in a TCP super-frame")
    else:
        _, _, ip_len, total_len = ipv4_header(packet)
        if packet[9] != IPPROTO_TCP:
            raise FrameError(f"IP protocol {packet[9]} is not TCP in a TCP super-frame")
        if ((packet[6] << 8) | packet[7]) & _IP_MF_AND_OFFSET:
            raise FrameError("a TCP super-frame cannot be an IP fragment")
    if (
        not header.flags & VNET_F_NEEDS_CSUM
        or header.csum_start != ETH_HEADER_LEN + ip_len
        or header.csum_offset != TCP_CSUM_OFFSET
    ):
        raise FrameError(
            f"checksum offload at {header.csum_start}+{header.csum_offset} is not the TCP checksum "
            f"at {ETH_HEADER_LEN + ip_len}+{TCP_CSUM_OFFSET}"
        )
    if total_len < ip_len + TCP_MIN_HEADER:
        raise FrameError(f"IP packet of {total_len} bytes has no room for a TCP header")
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    data_start = ip_len + tcp_len
    if tcp_len < TCP_MIN_HEADER or data_start > total_len:
        raise FrameError(f"TCP header length {tcp_len} does not fit a {total_len}-byte packet")
    payload = memoryview(packet)[data_start:total_len]

    ip_head = bytearray(packet[:ip_len])
    tcp_head = bytearray(packet[ip_len:data_start])
    ip_id = 0 if v6 else (ip_head[4] << 8) | ip_head[5]
    seq = int.from_bytes(tcp_head[4:8], "big")
    flags = tcp_head[13]
    # The fields that change per segment are zeroed in the templates and added to their sums per segment.
    if v6:
        ip_head[4:6] = b"\x00\x00"
    else:
        ip_head[2:6] = b"\x00\x00\x00\x00"
        ip_head[10:12] = b"\x00\x00"
    tcp_head[4:8] = b"\x00\x00\x00\x00"
    tcp_head[13] = 0
    tcp_head[16:18] = b"\x00\x00"
    ip_base = _word_sum(ip_head)
    # Pseudo-header: source, destination, protocol, TCP length (added per segment). RFC 793 §3.1 for IPv4
    # (addresses at 12..20), RFC 8200 §8.1 for IPv6 (addresses at 8..40).
    tcp_base = _word_sum(packet[8:40] if v6 else packet[12:20]) + IPPROTO_TCP + _word_sum(tcp_head)

    count = max(1, -(-len(payload) // mss))
    segments = []
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        seg_flags = flags if i == count - 1 else flags & ~(_TCP_FIN | _TCP_PSH)
        if i:
            seg_flags &= ~_TCP_CWR
        seg_seq = (seq + i * mss) & 0xFFFFFFFF
        seg_tcp_len = tcp_len + len(chunk)
        tcp_sum = tcp_base + seg_tcp_len + (seg_seq >> 16) + (seg_seq & 0xFFFF) + seg_flags + _word_sum(chunk)
        struct.pack_into("!I", tcp_head, 4, seg_seq)
        tcp_head[13] = seg_flags
        struct.pack_into("!H", tcp_head, 16, ~_fold(tcp_sum) & 0xFFFF)
        if v6:
            struct.pack_into("!H", ip_head, 4, seg_tcp_len)
        else:
            seg_total = ip_len + seg_tcp_len
            seg_id = (ip_id + i) & 0xFFFF
            struct.pack_into("!HH", ip_head, 2, seg_total, seg_id)
            struct.pack_into("!H", ip_head, 10, ~_fold(ip_base + seg_total + seg_id) & 0xFFFF)
        segments.append(b"".join((ip_head, tcp_head, chunk)))
    return segments


def nic_packets(head: Bytes, packet: Bytes) -> list[bytes]:
    """What a NIC sends for IPv4 or IPv6 `packet` and its virtio_net_hdr `head` (the offload work left to it): a
    super-frame's TCP segments, or the packet with its checksum completed. Raises FrameError (peer bytes)."""
    offload = parse_vnet_header(head, ETH_HEADER_LEN + len(packet))
    return segment_tcp(packet, offload) if offload.is_gso else [complete_checksum(packet, offload)]
