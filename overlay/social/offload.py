"""SocialVPN data with TAP offload: TCP super-frames and checksums left to complete (virtio_net_hdr).

With offload a social node's TAP hands it TCP super-frames (TSO) and TCP and UDP packets whose checksum the kernel
left to complete (CHECKSUM_PARTIAL: the field holds the pseudo-header's sum). The compiled data path rewrites
them whole into the friend device's view and sends them as DATA_GSO with their virtio header, the partial
checksum updated as Linux's inet_proto_csum_replace4 updates one (overlay/_from_tap.h rewrite_head), to friends whose
fragment probe came back (overlay/probes.py). Whatever comes up to Python is cut first (`packets`): the packets a
NIC would have sent, each with its checksum complete, which overlay/social/translate.py translates as before. A
friend's DATA_GSO is checked (`check`) before our kernel sees its header.
"""

from __future__ import annotations

from overlay.social.translate import IPPROTO_UDP
from overlay.tap.frames import (
    ETH_HEADER_LEN,
    IPPROTO_TCP,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_ECN,
    VNET_GSO_TCPV4,
    VNET_HDR_LEN,
    Bytes,
    FrameError,
    VnetHeader,
    ipv4_header,
    nic_packets,
    parse_vnet_header,
)

# RFC 793 and RFC 768: where TCP's and UDP's checksums sit in their headers, and the headers' least length.
_CHECKSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
_HEADER_MIN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8}
_IP_MF_AND_OFFSET = 0x3FFF  # RFC 791


def packets(head: Bytes, packet: Bytes) -> list[bytes]:
    """IPv4 `packet` as the packets a NIC would send for its virtio header `head` (none from a TAP without
    offload): a TCP super-frame's segments, or the packet with the checksum its kernel left to offload completed.
    Raises FrameError."""
    return nic_packets(head, packet) if head else [bytes(packet)]


def check(head: Bytes, packet: Bytes) -> VnetHeader:
    """The virtio header `head` of a friend's IPv4 `packet` (DATA_GSO), if it is the offload work a SocialVPN
    rewrite carries, as the Engine's social_offload decides: the TCP or UDP checksum right after the IP header
    left to complete, and at most segmentation of TCP over IPv4, of a packet that is no fragment. Raises
    FrameError otherwise."""
    if len(head) != VNET_HDR_LEN:
        raise FrameError(f"virtio_net_hdr of {len(head)} bytes, expected {VNET_HDR_LEN}")
    _, _, header_len, total = ipv4_header(packet)
    offload = parse_vnet_header(head, ETH_HEADER_LEN + total)
    protocol = packet[9]
    at = _CHECKSUM_AT.get(protocol)
    if (
        offload.flags != VNET_F_NEEDS_CSUM
        or at is None
        or offload.csum_start != ETH_HEADER_LEN + header_len
        or offload.csum_offset != at
        or header_len + _HEADER_MIN[protocol] > total
        or int.from_bytes(packet[6:8], "big") & _IP_MF_AND_OFFSET
    ):
        raise FrameError(f"offload header {offload} is not a social packet's own checksum")
    if offload.is_gso and (offload.gso_type & ~VNET_GSO_ECN != VNET_GSO_TCPV4 or protocol != IPPROTO_TCP):
        raise FrameError(f"segmentation type {offload.gso_type:#04x} of IP protocol {protocol}")
    return offload
